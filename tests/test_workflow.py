"""Research workflow with the real train.py: sweeps (-m) with a failing job and a summary,
W&B (offline) and TensorBoard logging, resume into the same W&B run, a custom train step from the
config, profiler traces, secrets kept out of every file, files not world-writable."""
import csv
import glob
import json
import os

import pytest

from helpers import FAST as CPU, TRAIN, run, run_train

FAST = [*CPU, "train.max_steps=2", "train.eval_interval=2"]
SECRET = "secret-xyz"


def _run(cwd, args, env=None, expect=0):
    return run_train(*args, cwd=cwd, name=None, fast=False, env=dict(os.environ, **(env or {})),
                     umask=0o022, expect=expect)


def _wandb_records(path):
    """Records of an offline W&B run file (LevelDB log format: 7-byte header, 32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks; type 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            buf = (buf if kind == 3 else b"") + chunk
        elif kind == 4:
            yield buf + chunk


def _read_wandb_offline(path):
    """(history keys, run config {key: json}) of an offline W&B run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config = set(), {}
    for raw in _wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
        elif kind in ("run", "config"):
            upd = rec.run.config.update if kind == "run" else rec.config.update
            config.update({it.key or "/".join(it.nested_key): it.value_json for it in upd})
    return history, config


def _records(path):
    return [json.loads(l) for l in open(path)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    # the tp2 jobs are model-parallel (each starts 2 workers over gloo); pp2 fails on a CPU
    r = _run(cwd, ["-m", "optimizer.lr=1e-3,3e-4", "parallel=tp2,pp2", "model=gpt_tiny",
                   *FAST, "checkpoint.save=false", f"hydra.sweep.dir={cwd}/sw"],
             expect=1)  # the two pp2 jobs fail on a CPU: the sweep goes on, then exits 1
    return cwd, r


def test_sweep_runs_every_job_and_summarizes(sweep):
    cwd, r = sweep
    rows = list(csv.DictReader(open(cwd / "sw" / "sweep_summary.csv")))
    assert [x["job"] for x in rows] == ["0", "1", "2", "3"]
    by = {(x["overrides"].split()[0], x["overrides"].split()[1]): x for x in rows}
    for lr in ("optimizer.lr=0.001", "optimizer.lr=0.0003"):  # as Hydra spells them
        ok, bad = by[(lr, "parallel=tp2")], by[(lr, "parallel=pp2")]
        assert ok["status"] == "completed" and float(ok["train_loss"]) > 0
        assert float(ok["eval_loss"]) > 0 and float(ok["tokens_per_sec_per_gpu"]) > 0
        assert ok["steps"] == "2"
        # pp2 on a CPU fails validation; the sweep went on with the next job
        assert bad["status"] == "failed" and "pipeline" in bad["error"], bad
        assert bad["train_loss"] == ""
    # each job has its own run dir with its own metrics
    assert len(_records(cwd / "sw" / "0" / "metrics.jsonl")) == 3
    assert len(_records(cwd / "sw" / "2" / "metrics.jsonl")) == 3
    lr0 = [x["lr"] for x in _records(cwd / "sw" / "0" / "metrics.jsonl") if "lr" in x]
    lr2 = [x["lr"] for x in _records(cwd / "sw" / "2" / "metrics.jsonl") if "lr" in x]
    assert lr0[0] == pytest.approx(1e-3) and lr2[0] == pytest.approx(3e-4)
    # both tp2 jobs ran at TP=2 and trained: their lr took effect (different eval losses)
    assert r.stdout.count("lcm(make_vocab_size_divisible_by=8, TP=2)") == 2
    evals = [by[(lr, "parallel=tp2")]["eval_loss"] for lr in ("optimizer.lr=0.001",
                                                               "optimizer.lr=0.0003")]
    assert evals[0] != evals[1], evals
    # the table on stdout shows what differs between jobs
    assert "train loss" in r.stdout and "parallel=pp2" in r.stdout and "failed" in r.stdout
    assert "2 of 4 jobs did not complete" in r.stderr


def test_a_sweep_jobs_printed_command_continues_that_job(tmp_path):
    """A sweep job's "train longer" command left out -m, so its single run named another
    checkpoint directory (sweep jobs name theirs from all their overrides) and trained from step
    0. Now it names the job's checkpoint.dir, and running it resumes that job."""
    import shlex
    import subprocess
    import sys

    r = _run(tmp_path, ["-m", "optimizer.lr=1e-3,3e-4", *FAST, "train.max_steps=2",
                        "train.eval_interval=0", f"hydra.sweep.dir={tmp_path}/sw"])
    cmds = [line.split("train longer: ", 1)[1] for line in r.stdout.splitlines()
            if "train longer: " in line]
    assert len(cmds) == 2 and all("checkpoint.dir=" in c for c in cmds), r.stdout[-2000:]
    argv = shlex.split(cmds[0])
    assert argv[:2] == ["python", "train.py"]
    done = subprocess.run([sys.executable, TRAIN, *argv[2:], f"hydra.run.dir={tmp_path}/more"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from checkpoints/optimizer.lr=0.001," in done.stdout, done.stdout[-2000:]


def test_single_run_config_error_still_exits_2(tmp_path):
    r = _run(tmp_path, [*FAST, "parallel=pp2", f"hydra.run.dir={tmp_path}/r"], expect=2)
    assert r.stderr.strip().splitlines()[-1].startswith("error: parallel=pp2 needs GPUs for "
                                                        "pipeline parallelism")


def test_trackers_custom_step_profile_secrets_and_resume(sweep, tmp_path):
    """One run exercises W&B offline + TensorBoard, the keytoken step, the profiler and
    secret masking; a second run resumes into the same W&B run."""
    ck = tmp_path / "ck"
    args = [*FAST, "logging.wandb=true", "logging.tensorboard=true", f"checkpoint.dir={ck}",
            "train.step._target_=examples.keytoken_weighted_loss.KeytokenWeightedStep",
            "+train.step.alpha=0.25", f"+train.step.hf_token={SECRET}",
            "train.profile.steps=[2,2]"]
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"}
    r = _run(tmp_path, [*args, f"hydra.run.dir={tmp_path}/run"], env=env)
    run = tmp_path / "run"
    recs = _records(run / "metrics.jsonl")
    train = [x for x in recs if "loss" in x]

    # custom step: the loss weighs samples by their "=" count, so it is visibly larger than the
    # plain loss of the same initial model on the same batch (sweep job 0, same seed and lr;
    # job 0 ran at TP2, whose loss equals TP1's)
    base = [x for x in _records(sweep[0] / "sw" / "0" / "metrics.jsonl") if "loss" in x]
    assert train[0]["loss"] > 1.3 * base[0]["loss"], (train[0], base[0])

    # W&B offline run: the resolved (masked) config and the logged keys
    wdirs = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(wdirs) == 1
    history, config = _read_wandb_offline(glob.glob(os.path.join(wdirs[0], "run-*.wandb"))[0])
    assert {"loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mem_gb", "eval_loss",
            "eval_ppl"} <= history, history
    assert json.loads(config["model"])["name"] == "gpt_tiny"
    assert json.loads(config["train"])["step"]["hf_token"] == "***"
    run_id = (ck / "wandb_run_id.txt").read_text().strip()
    assert wdirs[0].endswith(run_id)

    # TensorBoard event files hold the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mem_gb", "eval_loss",
            "eval_ppl"} <= tags, tags
    assert [e.step for e in ev.Scalars("loss")] == [1, 2]
    assert ev.Scalars("loss")[0].value == pytest.approx(train[0]["loss"], rel=1e-6)

    # profiler trace of step 2 in the run dir
    traces = glob.glob(str(run / "profile" / "rank0_steps2-2.json"))
    assert traces and "train_step_2" in open(traces[0]).read()

    # resume continues the same W&B run
    _run(tmp_path, [*args, "train.max_steps=3", "train.profile.steps=[]",
                    f"hydra.run.dir={tmp_path}/run2"], env=env)
    wdirs2 = glob.glob(str(tmp_path / "run2" / "wandb" / "offline-run-*"))
    assert len(wdirs2) == 1 and wdirs2[0].endswith(run_id)
    assert (ck / "wandb_run_id.txt").read_text().strip() == run_id

    # the secret (env and override) is in no file and no file name of the whole tree
    leaks = []
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            if SECRET in name:
                leaks.append(os.path.join(root, name))
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and SECRET.encode() in open(path, "rb").read():
                leaks.append(path)
    assert not leaks, leaks
    assert SECRET not in r.stdout + r.stderr
    hydra_overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "hf_token=***" in hydra_overrides

    # under umask 022 nothing we wrote is world-writable
    writable = []
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p) and os.stat(p).st_mode & 0o002:
                writable.append(p)
    assert not writable, writable


def test_cfg_job_masks_secrets(tmp_path):
    r = run(TRAIN, "--cfg", "job",
            "train.step._target_=examples.keytoken_weighted_loss.KeytokenWeightedStep",
            f"+train.step.hf_token={SECRET}", f"logging.wandb_name=x-{SECRET}", cwd=tmp_path,
            timeout=120, env={**os.environ, "WANDB_API_KEY": SECRET})
    assert r.returncode == 0, r.stderr
    assert "hf_token: '***'" in r.stdout and "KeytokenWeightedStep" in r.stdout
    assert SECRET not in r.stdout + r.stderr


def test_sweep_summary_from_files(tmp_path):
    from framework.sweep import summarize_sweep, write_job_status

    (tmp_path / "0").mkdir()
    with open(tmp_path / "0" / "metrics.jsonl", "w") as f:
        for s, tps in ((1, 10.0), (2, 30.0), (3, 50.0)):
            f.write(json.dumps({"step": s, "loss": 3.0 - s, "tokens_per_sec_per_gpu": tps}) + "\n")
        f.write(json.dumps({"step": 3, "eval_loss": 1.5, "eval_ppl": 4.48}) + "\n")
        f.write('{"step": 4, "lo')  # a killed job's partial line
    write_job_status(str(tmp_path / "0"), "completed", None, overrides=["a=1", "b=2"])
    write_job_status(str(tmp_path / "1"), "failed", "boom", overrides=["a=2", "b=2"])
    out = open(tmp_path / "table.txt", "w")
    rows = summarize_sweep(str(tmp_path), out=out)
    out.close()
    assert rows[0]["train_loss"] == 0.0 and rows[0]["eval_loss"] == 1.5
    assert rows[0]["tokens_per_sec_per_gpu"] == 40.0 and rows[0]["steps"] == 3
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "boom"
    table = (tmp_path / "table.txt").read_text()
    assert "a=2" in table and "b=2" not in table and "job 1 failed: boom" in table


def test_run_dir_is_the_same_on_every_rank(monkeypatch):
    from framework import cli

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    monkeypatch.setenv("RANK", "3")
    assert cli._run_dir("outputs") == os.path.join("outputs", "job-abc123")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert cli._run_dir("multirun") == os.path.join("multirun", "job-777")
    # only rank 0 writes .hydra/
    cli.register_resolvers()
    from omegaconf import OmegaConf

    assert OmegaConf.create({"s": "${fw_output_subdir:}"}).s is None
    monkeypatch.setenv("RANK", "0")
    assert OmegaConf.create({"s": "${fw_output_subdir:}"}).s == ".hydra"


def test_slurm_launcher_config_composes(tmp_path):
    """conf/hydra/launcher/slurm.yaml on top of hydra-submitit-launcher (extra `sweeps`)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = run(TRAIN, "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SlurmLauncher" in r.stdout and "partition: gpu" in r.stdout
    assert "tasks_per_node: 8" in r.stdout and "MASTER_ADDR" in r.stdout


def test_slurm_launcher_without_slurm_is_one_line_and_a_single_run_says_it_runs_here(tmp_path):
    """`-m hydra/launcher=slurm` on a machine without sbatch/srun was submitit's 30-line
    traceback; without -m the launcher was ignored without a word."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    r = run(TRAIN, "-m", "hydra/launcher=slurm", "optimizer.lr=1e-3,2e-3",
            f"hydra.sweep.dir={tmp_path}/sw", cwd=tmp_path, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == [
        "error: hydra/launcher=slurm submits the jobs with sbatch, which this machine does not "
        "have: run the sweep on a SLURM login node, or use hydra/launcher=slurm_local to run "
        "the same jobs here"], r.stderr[-2000:]
    r = run_train("hydra/launcher=slurm", "train.max_steps=1", "train.eval_interval=0",
                  "checkpoint.save=false", cwd=tmp_path)
    assert "note: hydra/launcher=slurm launches -m sweeps only; this single run runs here" \
        in r.stdout


def test_profiler_steps_and_ranks(tmp_path):
    import torch

    from framework.config import ConfigError, ProfileConfig
    from framework.training.profiling import build_profiler

    cpu = torch.device("cpu")
    assert build_profiler(ProfileConfig(), str(tmp_path), 0, cpu) is None
    assert build_profiler(ProfileConfig(steps=[2, 3]), str(tmp_path), 1, cpu) is None  # rank 0
    assert build_profiler(ProfileConfig(steps=[5, 6]), str(tmp_path), 0, cpu, max_steps=4) is None
    with pytest.raises(ConfigError):
        build_profiler(ProfileConfig(steps=[3, 2]), str(tmp_path), 0, cpu)
    p = build_profiler(ProfileConfig(steps=[2, 9], ranks=None), str(tmp_path), 1, cpu,
                       max_steps=3)
    assert (p.first, p.last) == (2, 3)
    x = torch.randn(64, 64)
    for step in (1, 2, 3):
        p.step_begin(step)
        x = torch.tanh(x @ x)
        p.step_end(step)
    assert p.path == str(tmp_path / "profile" / "rank1_steps2-3.json")
    trace = open(p.path).read()
    assert "train_step_2" in trace and "train_step_3" in trace and "train_step_1" not in trace


def test_summary_names_no_wandb_directory_when_wandb_is_disabled(tmp_path, monkeypatch, capsys):
    """logging.wandb with W&B disabled (logging.wandb_mode or WANDB_MODE) writes no wandb
    directory, and the closing summary says so instead of listing one."""
    from framework.config import Config, LoggingConfig
    from framework.training import summary

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for mode, env, want in ((None, None, "wandb:       " + summary.show_path(
                                 str(tmp_path / "wandb"))),
                            ("disabled", None, "none (W&B was disabled: logging.wandb_mode="
                                               "disabled)"),
                            (None, "disabled", "none (W&B was disabled: WANDB_MODE=disabled)")):
        if env:
            monkeypatch.setenv("WANDB_MODE", env)
        cfg = Config(logging=LoggingConfig(wandb=True, wandb_mode=mode))
        cfg.run_dir = str(tmp_path)
        cfg.checkpoint.save = False
        summary.print_summary(cfg, [])
        out = capsys.readouterr().out
        assert want in out, (mode, env, out)
