"""Runs that would mix or lose each other's output are refused in one line before any training.

* A sweep (`train.py -m`, framework/sweep.py `check_sweep_start`): a reused `hydra.sweep.dir`, one
  `hydra.sweep.subdir` for every job, and two jobs that would share one checkpoint directory.
* Two runs saving into one checkpoint directory at once (framework/locking.py `run_lock`)."""
import os

import pytest
from omegaconf import OmegaConf

from framework.sweep import job_checkpoint_dir, sweep_jobs
from helpers import ROOT, run_train

FAST = ["train.max_steps=1", "train.progress_bar=false"]


def _refused(tmp_path, *args):
    r = run_train("-m", *FAST, *args, cwd=tmp_path, name=None, fast=False, expect=2)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("args, want", [
    # run-control keys do not name the checkpoint directory: job 1 would resume job 0
    (["train.log_interval=1,2"], "jobs 0 (train.max_steps=1 train.progress_bar=False "
                                 "train.log_interval=1) and 1"),
    (["train.seed=5,5"], "would share checkpoint.dir="),
    (["train.seed=5,6", "checkpoint.dir=CK"], "would share checkpoint.dir=CK"),
    (["train.seed=5,6", "hydra.sweep.subdir=x"], "hydra.sweep.subdir=x is the same for all 2 jobs"),
])
def test_sweeps_that_would_mix_jobs_are_refused_before_any_job(tmp_path, args, want):
    args = [a.replace("CK", str(tmp_path / "ck")) for a in args]
    line = _refused(tmp_path, *args, f"hydra.sweep.dir={tmp_path}/sw")
    assert want.replace("CK", str(tmp_path / "ck")) in line, line
    assert not (tmp_path / "sw").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("args, want", [
    # our own checks (train.py's config_from_hydra), which Hydra's sweeper does not run: each
    # used to fail only when its job started, after the jobs before it had trained
    (["train.micro_batch_size=1,3", "train.global_batch_size=4"],
     "job 1 (train.max_steps=1 train.progress_bar=False train.micro_batch_size=3 "
     "train.global_batch_size=4) of this sweep: train.global_batch_size=4 must be divisible by "
     "train.micro_batch_size=3"),
    (["model=gpt_tiny,model_schema"], "job 1 (train.max_steps=1 train.progress_bar=False "
                                      "model=model_schema) of this sweep: model=model_schema is "
                                      "the schema"),
    # a group option that does not exist (Hydra's own error, which used to escape the check as a
    # 30-line warning before the same line came again)
    (["model=gpt_tiny,gpt2_xxl"], "job 1 (train.max_steps=1 train.progress_bar=False "
                                  "model=gpt2_xxl) of this sweep: model=gpt2_xxl: no such model "
                                  "config; choose one of"),
    (["train.seed=1,2", "model.default_lr=0.1", "optimizer.lr=0.01"],
     "job 0 (train.max_steps=1 train.progress_bar=False train.seed=1 model.default_lr=0.1 "
     "optimizer.lr=0.01) of this sweep: model.default_lr=0.1 has no effect"),
])
def test_a_job_with_a_bad_config_stops_the_sweep_before_any_job(tmp_path, args, want):
    line = _refused(tmp_path, *args, f"hydra.sweep.dir={tmp_path}/sw")
    assert line.startswith("error: " + want), line
    assert not (tmp_path / "sw").exists() and not (tmp_path / "checkpoints").exists()


def test_per_job_interpolations_are_checked_as_each_job_will_see_them(tmp_path):
    """`${hydra:job.num}` resolves to each job's own number while the jobs are checked, and the
    sweep then runs as before."""
    r = run_train("-m", *FAST, "train.seed=1,2", f"hydra.sweep.dir={tmp_path}/sw",
                  f"checkpoint.dir={tmp_path}/ck/${{hydra:job.num}}", cwd=tmp_path, name=None,
                  fast=False, expect=0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["0", "1"], r.stdout[-2000:]


def test_a_sweep_dir_with_an_earlier_sweep_is_refused_and_kept(tmp_path):
    job = tmp_path / "sw" / "0"
    job.mkdir(parents=True)
    (job / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    line = _refused(tmp_path, "train.seed=1,2", f"hydra.sweep.dir={tmp_path}/sw")
    assert f"hydra.sweep.dir={tmp_path}/sw already holds an earlier sweep (0/)" in line, line
    assert (job / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert sorted(os.listdir(tmp_path / "sw")) == ["0"]


def test_the_same_sweep_run_again_goes_on_in_its_directory(tmp_path):
    """A requeued SLURM job, a torchrun restart or the same command after a stop: its jobs resume
    from their checkpoints (here: already finished) in their own directories."""
    args = ["-m", *FAST, "train.seed=1,2", f"hydra.sweep.dir={tmp_path}/sw"]
    run_train(*args, cwd=tmp_path, name=None, fast=False, expect=0)
    again = run_train(*args, cwd=tmp_path, name=None, fast=False, expect=0)
    assert again.stdout.count("nothing to train") == 2, again.stdout[-2000:]
    # another sweep into it is still refused
    assert "already holds an earlier sweep" in _refused(
        tmp_path, "train.seed=3,4", f"hydra.sweep.dir={tmp_path}/sw")


def _config(task, sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    return OmegaConf.create({"hydra": {"overrides": {"task": task},
                                       "sweeper": {"_target_": sweeper, "params": None}}})


def test_jobs_and_their_checkpoint_dirs(tmp_path):
    jobs = sweep_jobs(_config(["train.seed=1,2", "model=gpt_tiny,llama_tiny", "train.max_steps=3"]))
    assert jobs == [["train.seed=1", "model=gpt_tiny", "train.max_steps=3"],
                    ["train.seed=1", "model=llama_tiny", "train.max_steps=3"],
                    ["train.seed=2", "model=gpt_tiny", "train.max_steps=3"],
                    ["train.seed=2", "model=llama_tiny", "train.max_steps=3"]]
    dirs = {job_checkpoint_dir(j, str(tmp_path)) for j in jobs}
    assert len(dirs) == 4  # train.max_steps names the directory in a sweep; the rest differ
    # an interpolation only the job can resolve (per-job dirs) is not judged here
    assert job_checkpoint_dir(["checkpoint.dir=ck/${hydra:job.num}"], str(tmp_path)) is None
    # ... also as Hydra's sweeper gives it to the jobs: escaped (this was taken for one literal
    # directory shared by every job, and the sweep refused)
    esc = sweep_jobs(_config(["train.seed=1,2", "checkpoint.dir=a b/ck:1/${hydra:job.num}"]))
    assert esc[0][1] == r"checkpoint.dir=a\ b/ck\:1/$\{hydra\:job.num\}", esc
    assert job_checkpoint_dir(esc[0], str(tmp_path)) is None
    esc = sweep_jobs(_config(["train.seed=1,2", "checkpoint.dir=a b/ck:1"]))
    assert job_checkpoint_dir(esc[0], str(tmp_path)) == str(tmp_path / "a b" / "ck:1")
    assert job_checkpoint_dir(["checkpoint.dir=ck"], str(tmp_path)) == str(tmp_path / "ck")
    # another sweeper chooses its jobs as it goes: nothing to check up front
    assert sweep_jobs(_config(["train.seed=1,2"], sweeper="some.OtherSweeper")) == []


def test_a_second_run_into_a_checkpoint_dir_in_use_is_refused(tmp_path):
    from framework.errors import ConfigError
    from framework.locking import RUN_LOCK, run_lock

    ck = tmp_path / "ck"
    with run_lock(str(ck)):
        assert f"pid {os.getpid()} on " in (ck / RUN_LOCK).read_text()
        with pytest.raises(ConfigError, match="is in use by another run"):
            with run_lock(str(ck)):
                pass
        r = run_train(*FAST, f"checkpoint.dir={ck}", cwd=tmp_path, name="second", fast=False,
                      expect=2)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            f"error: checkpoint.dir={ck} is in use by another run (pid {os.getpid()} on "), lines
        assert sorted(os.listdir(ck)) == [RUN_LOCK]  # nothing trained or saved
    with run_lock(str(ck)):  # released with the holder
        pass
    # a run that saves nothing takes no lock
    with run_lock(str(ck)):
        run_train(*FAST, f"checkpoint.dir={ck}", "checkpoint.save=false", cwd=tmp_path,
                  name="nosave", fast=False, expect=0)


def test_a_resume_says_that_checkpoint_load_is_not_used(tmp_path):
    for name in ("seed", "run"):
        run_train(*FAST, f"checkpoint.dir={tmp_path / name}", cwd=tmp_path, name=name, fast=False)
    r = run_train("train.max_steps=2", "train.progress_bar=false",
                  f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.load={tmp_path / 'seed'}",
                  cwd=tmp_path, name="resume", fast=False)
    assert f"resumed from {tmp_path / 'run'}/iter_0000001" in r.stdout
    assert (f"note: checkpoint.load={tmp_path / 'seed'} not used: a checkpoint in "
            f"checkpoint.dir={tmp_path / 'run'} is resumed instead") in r.stdout, r.stdout[-2000:]
    # the same command again (a fine-tune resumed after a stop): its checkpoint stored that load
    r = run_train("train.max_steps=3", "train.progress_bar=false",
                  f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.load={tmp_path / 'seed'}",
                  cwd=tmp_path, name="again", fast=False)
    assert "resumed from" in r.stdout and "not used" not in r.stdout, r.stdout[-2000:]


def test_a_lock_left_to_the_children_of_a_dead_run_is_waited_for(tmp_path):
    """A killed rank 0's forked DataLoader workers share its flock for a moment: a restart on the
    same host waits for them instead of refusing (the recorded pid is dead)."""
    import subprocess
    import sys
    import time

    from framework.locking import run_lock

    ck = str(tmp_path / "ck")
    code = (f"import os, sys, time\nsys.path.insert(0, {ROOT!r})\n"
            f"from framework.locking import run_lock\n"
            f"with run_lock({ck!r}):\n"
            f"    if os.fork() == 0:\n        time.sleep(2)\n        os._exit(0)\n"
            f"    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.monotonic()
    with run_lock(ck):
        assert 1.0 < time.monotonic() - start < 20


def test_a_lock_kept_by_a_stuck_child_of_a_dead_run_names_that_child(tmp_path, monkeypatch):
    """A child of a dead run that keeps its flock past the wait (a stuck process): the refusal
    names that child's pid, which the user can stop, instead of the dead run's."""
    import signal
    import subprocess
    import sys

    from framework import locking

    monkeypatch.setattr(locking._flock_or_wait_for_the_dead, "__defaults__", (1.0,))
    ck = str(tmp_path / "ck")
    pid_file = tmp_path / "child.pid"
    code = (f"import os, sys, time\nsys.path.insert(0, {ROOT!r})\n"
            f"from framework.locking import run_lock\n"
            f"with run_lock({ck!r}):\n"
            f"    pid = os.fork()\n"
            f"    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
            f"    open({str(pid_file)!r}, 'w').write(str(pid))\n"
            f"    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    child = int(pid_file.read_text())
    try:
        with pytest.raises(locking.ConfigError) as e:
            with locking.run_lock(ck):
                pass
        msg = str(e.value)
        assert f"checkpoint.dir={ck} is still locked, and the run that took the lock (pid " \
            in msg, msg
        assert f"lock file open: pid {child} (" in msg and "kill -9 <pid>" in msg, msg
    finally:
        os.kill(child, signal.SIGKILL)
