"""Coverage of every process a test starts, for a coverage run only (README, "Set up"):
with this folder on PYTHONPATH and COVERAGE_PROCESS_START set, each Python process (pytest,
its xdist workers, fresh interpreters, the warm server of tests/zygote.py, spawned workers)
starts coverage.py as it starts; pyproject.toml's [tool.coverage.run] `patch = fork, _exit`
carries it into forked children (the server's processes, forked TP/DP workers) and saves their
data at os._exit. Not on the path otherwise: the test command does not load it."""
import os

if os.environ.get("COVERAGE_PROCESS_START"):
    try:
        import coverage
    except ImportError:  # the `test` extra installs it
        pass
    else:
        coverage.process_startup()
