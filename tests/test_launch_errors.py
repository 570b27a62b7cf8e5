"""Self-launched workers failing on bad input: each distinct error line once, whole, and none of
torch elastic's agent tracebacks (the worker printed its line; the launcher names rank and exit)."""
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "tests", "launch_error_worker.py")


def _run(kind, tmp_path):
    env = dict(os.environ, FW_WORKER_START_METHOD="fork", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, SCRIPT, kind], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: worker failed (rank ") and \
        lines[-1].endswith(", exit 2): stopped on the error printed above"), lines
    assert not [f for f in os.listdir(tmp_path) if f.startswith("fw-stop-")]  # cleaned up
    return lines[:-1]


def test_the_same_error_on_every_rank_is_printed_once(tmp_path):
    assert _run("same", tmp_path) == ["error: the same damaged file on every rank"]


def test_errors_that_differ_are_each_printed_whole(tmp_path):
    lines = _run("per-rank", tmp_path)
    assert sorted(lines) == [f"error: rank {r} alone " + "x" * 200 for r in (0, 1)], lines
