"""Several workers (TP2 over gloo, self-launched by train.py): stop signals and hangs.

* SIGTERM and SIGUSR1, each sent to the parent, to one worker (rank 1, not the logging rank) and
  to the whole process group: every stop saves once and exits 0, and resuming after each of the
  six stops gives the uninterrupted run's losses bit for bit.
* A worker stalled inside a collective: the watchdog names rank, iteration and phase within
  `train.watchdog_seconds` and the whole run exits non-zero, leaving no process behind.
* A worker killed by a signal it cannot handle (SIGKILL): the run exits non-zero within seconds,
  naming the rank, leaving no process behind.

Pipeline parallelism is refused on CPU (megatron-core's schedules need CUDA), so these run at TP2.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

# several minutes of spawned TP2 workers (40 steps with six stops and resumes, a watchdog
# timeout): the slow tier. The README command keeps test_resilience's SIGTERM of a TP2 run
# (parent and process group) and the watchdog's unit test.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.seq_length=32", "model.hidden_dropout=0.1", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.progress_bar=false", "train.log_interval=1",
        "train.eval_interval=0", "train.device=cpu", "parallel=tp2"]
# workers spawned, as in users' runs (conftest.py forks them elsewhere in the CPU suite)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           FW_WORKER_START_METHOD="spawn")


def _cmd(tmp, name, *overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), *TINY,
            f"hydra.run.dir={tmp}/{name}", *overrides]


def _start(cmd, cwd):
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=ENV)


def _losses(path):
    out = {}
    for line in open(path):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _wait_for_step(proc, metrics, step, timeout=600):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before step {step}: "
                                 f"{out[-1500:]}{err[-3000:]}")
        if os.path.exists(metrics):
            try:
                if max(_losses(metrics), default=0) >= step:
                    return
            except json.JSONDecodeError:  # a line being written
                pass
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


def _worker_pid(parent: int, rank: int) -> int:
    """The self-launched worker of local `rank`: torch elastic spawns the workers of `parent` in
    rank order (multiprocessing's spawn_main children; RANK is set only after the exec, so it is
    not in /proc/<pid>/environ), ordered here by start time."""
    for _ in range(100):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(fields[1]) == parent and b"spawn_main" in cmdline:
                found.append((int(fields[19]), int(pid)))  # starttime, pid
        if len(found) >= rank + 1:
            return sorted(found)[rank][1]
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def _finish(p, timeout, failure):
    """(stderr, seconds) of run `p` waited for up to `timeout` s; past that its process group is
    killed and the test fails with `failure`."""
    t0 = time.time()
    try:
        _out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError(failure)
    return err, time.time() - t0


def _nothing_left(pgid: int) -> None:
    for _ in range(100):  # mcore's writer-results manager exits once its parent is gone
        left = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
        if not left.stdout.strip():
            return
        time.sleep(0.2)
    for pid in left.stdout.split():  # do not leave them to the next test
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    raise AssertionError(f"processes outlived the run: {left.stdout.split()}")


# each stop after a periodic save in the same process (every EVERY steps), so that the stop's
# save also runs with mcore's checkpoint-writer helper already started (a group signal reaches it)
STOPS = [(signal.SIGTERM, "parent"), (signal.SIGUSR1, "worker"), (signal.SIGUSR1, "group"),
         (signal.SIGUSR1, "parent"), (signal.SIGTERM, "worker"), (signal.SIGTERM, "group")]
N, EVERY = 40, 2


def test_stops_from_every_direction_save_once_and_resume_bit_identical(tmp_path):
    common = [f"train.max_steps={N}", f"optimizer.lr_decay_steps={N}",
              f"checkpoint.save_interval={EVERY}"]
    # the reference saves nothing (a save does not change training; resuming is checked below)
    ref = subprocess.run(_cmd(tmp_path, "ref", f"checkpoint.dir={tmp_path}/ref_ck", *common,
                              "checkpoint.save=false"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(want) == list(range(1, N + 1))

    ck, got, stopped_at = tmp_path / "ck", {}, 0
    for i, (sig, target) in enumerate(STOPS):
        name = f"seg{i}"
        p = _start(_cmd(tmp_path, name, f"checkpoint.dir={ck}", *common), tmp_path)
        # the first step after this process's first periodic save
        first_save = (stopped_at // EVERY + 1) * EVERY
        _wait_for_step(p, str(tmp_path / name / "metrics.jsonl"), first_save + 1)
        if target == "parent":
            os.kill(p.pid, sig)
        elif target == "worker":
            os.kill(_worker_pid(p.pid, 1), sig)
        else:
            os.killpg(p.pid, sig)
        t0 = time.time()
        out, err = p.communicate(timeout=300)
        why = f"{sig.name} to the {target}: {out[-1500:]}{err[-3000:]}"
        assert p.returncode == 0, why
        assert time.time() - t0 < 120, why  # no 30 s SIGKILL fallbacks
        _nothing_left(p.pid)
        step = int((ck / "latest_checkpointed_iteration.txt").read_text())
        assert first_save < step < N, why
        # one save for the stop (besides the periodic ones), and the stop named its signal
        saves = [int(s) for s in re.findall(r"saved checkpoint \S*iter_(\d+)", out)]
        periodic = list(range(first_save, step + 1, EVERY))
        assert saves == periodic + ([step] if step % EVERY else []), (saves, why)
        seen = sig.name if target != "worker" else f"{sig.name} on another rank"
        assert f"stopping at iteration {step}: {seen} received" in out, why
        if target != "worker":  # the parent itself was signalled
            assert f"stopped by {sig.name}: the workers saved a checkpoint at iteration {step}" \
                in out, why
        seg = _losses(tmp_path / name / "metrics.jsonl")
        assert sorted(seg) == list(range(stopped_at + 1, step + 1)), (seg, why)
        got.update(seg)
        stopped_at = step

    last = subprocess.run(_cmd(tmp_path, "last", f"checkpoint.dir={ck}", *common,
                               f"checkpoint.save_interval={N}"),  # no periodic saves
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {ck}/iter_{stopped_at:07d}" in last.stdout
    got.update(_losses(tmp_path / "last" / "metrics.jsonl"))
    assert sorted(got) == list(range(1, N + 1))
    assert [got[s] for s in range(1, N + 1)] == [want[s] for s in range(1, N + 1)]  # exact


def test_worker_stalled_in_a_collective_is_named_and_the_run_fails(tmp_path):
    timeout = 30
    p = _start(_cmd(tmp_path, "run", f"checkpoint.dir={tmp_path}/ck", "checkpoint.save=false",
                    "train.max_steps=100", f"train.watchdog_seconds={timeout}",
                    "train.step._target_=tests.hang_step.StallInCollective", "+train.step.at=5",  # micro-batch 5: step 3
                    "+train.step._allowed_prefixes_=[tests.]"), tmp_path)
    _wait_for_step(p, str(tmp_path / "run" / "metrics.jsonl"), 2)
    err, elapsed = _finish(p, timeout + 150, "the stalled run did not end")
    print(f"\nstalled at step 3: exit {p.returncode} {elapsed:.0f} s after step 2 was logged; "
          f"stderr:\n" + "\n".join(l for l in err.splitlines() if l.startswith("error")))
    assert p.returncode not in (0, None), err[-3000:]
    # rank 1 waits in the collective only it entered; rank 0 in forward's TP all-reduce
    for rank in (0, 1):
        m = re.search(rf"error: rank {rank}: no progress for (\d+) s in forward/backward at "
                      rf"iteration 3 ", err)
        assert m and timeout <= int(m.group(1)) < timeout + 10, err[-3000:]
    assert "its watchdog found no progress" in err, err[-2000:]
    assert elapsed < timeout + 60, elapsed  # the watchdog, not the agent's or gloo's timeout
    _nothing_left(p.pid)


def test_worker_killed_by_an_unhandled_signal_fails_the_run_promptly(tmp_path):
    """SIGKILL to one worker (no handler can save): the agent sees the worker die, stops the
    other one and the run exits non-zero, long before the watchdog's limit."""
    timeout = 120
    p = _start(_cmd(tmp_path, "run", f"checkpoint.dir={tmp_path}/ck", "checkpoint.save=false",
                    "train.max_steps=1000", f"train.watchdog_seconds={timeout}"), tmp_path)
    _wait_for_step(p, str(tmp_path / "run" / "metrics.jsonl"), 2)
    os.kill(_worker_pid(p.pid, 1), signal.SIGKILL)
    err, elapsed = _finish(p, timeout + 60, "the run outlived its killed worker")
    print(f"\nworker killed: exit {p.returncode} after {elapsed:.1f} s")
    assert p.returncode not in (0, None), err[-3000:]
    assert "worker failed (rank 1, exit -9)" in err, err[-3000:]
    assert elapsed < timeout, elapsed  # the agent noticed, not the watchdog
    _nothing_left(p.pid)
