"""Helpers shared by the GPU test files."""
import json
import os

from helpers import ROOT


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


def log_parity(line: str) -> None:
    """Print a result line and append it to results/gpu/parity.log (kept by
    tests/run_gpu_suite.sh)."""
    print(line)
    os.makedirs(os.path.join(ROOT, "results", "gpu"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "gpu", "parity.log"), "a") as f:
        f.write(line + "\n")


def compare(ref, got, rtol, label):
    """Per-step losses of a layout against the reference: max relative difference <= rtol, and
    the reference learns. The line also goes to results/gpu/parity.log."""
    steps = sorted(ref)
    assert sorted(got) == steps
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    line = (f"{label}: {len(steps)} steps, max rel diff {worst:.2e} (tol {rtol}), "
            f"loss {ref[steps[0]]:.4f}->{ref[steps[-1]]:.4f} ref, {got[steps[-1]]:.4f} got")
    log_parity(line)
    assert worst <= rtol, line
    assert ref[steps[-1]] < ref[steps[0]] - 0.3  # it learns
