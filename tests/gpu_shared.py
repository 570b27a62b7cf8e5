"""Helpers shared by the GPU test files."""
import json
import os


def shared_once(key, build):
    """`build(dir)` once per suite run, even with pytest-xdist workers (`-n 4`): the first
    worker builds under a file lock, the others wait and reuse. Returns build's JSON result."""
    import fcntl
    import tempfile

    base = os.path.join(tempfile.gettempdir(), f"gpu_suite_{os.getpid()}_{key}")
    if os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        base = os.path.join(tempfile.gettempdir(),
                            f"gpu_suite_{os.environ['PYTEST_XDIST_TESTRUNUID']}_{key}")
    os.makedirs(base, exist_ok=True)
    with open(base + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = os.path.join(base, "result.json")
        if not os.path.exists(done):
            result = build(base)
            with open(done, "w") as f:
                json.dump(result, f)
        with open(done) as f:
            return json.load(f)
