"""Multi-node launch without a cluster, through the real train.py on CPU (gloo):

* two "nodes" on localhost, each `torchrun --nnodes 2 --nproc-per-node 2` with one c10d
  rendezvous: TP4 spanning both nodes, then DP2 x TP2 resuming its checkpoint, give the per-step
  losses of the single-process run from the same (perturbed) seed checkpoint; every rank uses one
  run directory and rank 0 alone writes `.hydra/`;
* conf/hydra/launcher/slurm.yaml run by submitit's local executor (`hydra/launcher=slurm_local`):
  a TP2 sweep whose two SLURM "nodes" join through slurm.yaml's own `setup` lines and SLURM's
  task variables; a broken `setup` is caught.

Every process a test starts (torchrun agents, their workers, submitit's controllers and tasks)
is gone when the test ends: each test kills whatever is left that names its tmp_path.
"""
import csv
import glob
import json
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from helpers import ROOT, TRAIN, free_port, losses, read_metrics, run_train
from perturb import perturb_checkpoint

FAST = ["train.progress_bar=false", "train.log_interval=1", "train.micro_batch_size=4",
        "train.global_batch_size=16", "train.eval_iters=2", "train.device=cpu", "model=gpt_tiny"]
# warmup 0 and a fixed decay: every step updates, and runs of 2 and 4 steps share one schedule
SCHEDULE = ["optimizer.lr_warmup_steps=0", "optimizer.lr_decay_steps=4", "train.eval_interval=0"]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


def _leftovers(tag):
    """Processes (not this one) whose command line names `tag` (this test's tmp_path)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and tag in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


@pytest.fixture
def reaper(tmp_path):
    """Yields tmp_path; afterwards kills every process left that names it, and fails the test
    if there was one (nothing may outlive a test)."""
    yield tmp_path
    left = _leftovers(str(tmp_path))
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    assert not left, f"processes outlived the test: {[p.info['cmdline'] for p in left]}"


def _train(cwd, *overrides, name):
    return run_train(*FAST, *overrides, cwd=cwd, name=name, fast=False, env=_env()).losses


def _losses(path):
    return losses(read_metrics(path))


def _two_nodes(cwd, overrides, rdzv_id=None, name="nodes"):
    """Two torchrun agents (node ranks 0 and 1) of one c10d rendezvous on localhost, 2 workers
    each; returns their outputs."""
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
               *(["--rdzv-id", rdzv_id] if rdzv_id else []),
               TRAIN, *FAST, *overrides]
        log = open(cwd / f"{name}{node}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      env=_env(OMP_NUM_THREADS="1")))
    codes = [p.wait(timeout=600) for p in procs]  # on a timeout the reaper ends them
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    return outs


@pytest.mark.slow  # two torchrun agents, eight fresh workers
def test_two_nodes_torchrun_match_single_process(reaper):
    tmp = reaper
    _train(tmp, "train.max_steps=0", f"checkpoint.dir={tmp}/seed", name="seed")
    perturb_checkpoint(str(tmp / "seed"))  # non-zero biases, non-unit norms
    run = [*SCHEDULE, f"checkpoint.load={tmp}/seed"]
    single = _train(tmp, *run, "train.max_steps=4", "checkpoint.save=false", name="single")

    # TP4: every TP group spans both nodes. No --rdzv-id (run id "none"): the ranks agree on the
    # run directory's time through torchrun's store. Saves at step 2 from both nodes.
    outs = _two_nodes(tmp, [*run, "parallel.tensor_model_parallel_size=4",
                               "train.max_steps=2", f"checkpoint.dir={tmp}/ck",
                               "checkpoint.save_interval=2"], name="tp4_")
    assert (tmp / "ck" / "latest_checkpointed_iteration.txt").read_text() == "2"
    dirs = [os.path.dirname(p) for p in glob.glob(str(tmp / "outputs" / "*" / "*" / "train.log"))]
    assert len(dirs) == 1, dirs  # not one per rank
    tp4 = _losses(os.path.join(dirs[0], "metrics.jsonl"))
    assert os.path.isdir(os.path.join(dirs[0], ".hydra"))

    # DP2 x TP2 (TP inside a node, DP across), resuming the TP4 checkpoint; --rdzv-id names the
    # run directory
    _two_nodes(tmp, [*run, "parallel=tp2", "train.max_steps=4", f"checkpoint.dir={tmp}/ck",
                     "checkpoint.save=false"], rdzv_id="mn42", name="dp2tp2_")
    dp2tp2 = _losses(tmp / "outputs" / "job-mn42" / "metrics.jsonl")
    assert (tmp / "outputs" / "job-mn42" / ".hydra" / "config.yaml").is_file()

    print("single:", single, "\n2 nodes, TP4:", tp4, "\n2 nodes, DP2xTP2 resumed:", dp2tp2)
    assert sorted(tp4) == [1, 2] and sorted(dp2tp2) == [3, 4], (tp4, dp2tp2)
    for step, loss in {**tp4, **dp2tp2}.items():
        assert abs(loss - single[step]) < 2e-5, (step, loss, single[step])
    assert single[4] < single[1]  # the steps did update the weights
    # rank 0 is on whichever node the rendezvous made node 0
    assert "padded to 24 (+5: a multiple of lcm(make_vocab_size_divisible_by=8, TP=4))" in \
        "".join(outs)


# --------------------------------------------------------------------------------------------
# conf/hydra/launcher/slurm.yaml on submitit's local executor
# --------------------------------------------------------------------------------------------
def _slurm_local(cwd, *args):
    """`train.py -m hydra/launcher=slurm_local ...`; the tasks import this checkout."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher (extras `test`, `sweeps`) not installed")
    return run_train("-m", "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=10", *FAST,
                     "train.max_steps=2", "checkpoint.save=false", *args, cwd=cwd, name=None,
                     fast=False, expect=None, timeout=900, env=_env(PYTHONPATH=ROOT))


@pytest.mark.slow  # two sweep jobs of two SLURM tasks each, fresh interpreters
def test_slurm_config_runs_on_submitit_local(reaper):
    """Two jobs (lr 1e-3, 3e-3), each TP2 over two SLURM "nodes" of one task: the tasks join
    through slurm.yaml's setup (MASTER_ADDR from `scontrol show hostnames`, MASTER_PORT from the
    job id) and SLURM_PROCID/SLURM_NTASKS, as on a cluster. No hydra.sweep.dir: the submitter and
    every task must agree on the default one."""
    tmp = reaper
    r = _slurm_local(tmp, "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
                     "parallel=tp2", "optimizer.lr=1e-3,3e-3", "train.eval_interval=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = glob.glob(str(tmp / "multirun" / "*" / "*" / "sweep_summary.csv"))
    assert len(summaries) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    sweep = os.path.dirname(summaries[0])
    rows = list(csv.DictReader(open(summaries[0])))
    assert [x["status"] for x in rows] == ["completed", "completed"], rows
    assert [x["steps"] for x in rows] == ["2", "2"]
    assert rows[0]["eval_loss"] != rows[1]["eval_loss"]  # the lr of each job took effect

    # the sbatch script SLURM would get carries slurm.yaml's setup lines as they are
    script = open(os.path.join(sweep, ".submitit", "slurm_job.sh")).read()
    slurm_yaml = yaml.safe_load(open(os.path.join(ROOT, "conf/hydra/launcher/slurm.yaml")))
    assert slurm_yaml["setup"] and all(line in script for line in slurm_yaml["setup"])
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script

    # each job: task 0 joined as rank 0 of 2 at the address and port the setup lines made;
    # task 1 logged nothing of its own (it is rank 1, not a second run)
    jobs = sorted(d for d in glob.glob(os.path.join(sweep, ".submitit", "*"))
                  if os.path.basename(d).isdigit())
    assert len(jobs) == 2, jobs
    for d in jobs:
        job_id = int(os.path.basename(d))
        out0 = open(os.path.join(d, f"{job_id}_0_log.out")).read()
        port = 20000 + job_id % 20000
        assert (f"joining SLURM job {job_id}: 2 tasks on 2 node(s), rendezvous at "
                f"localhost:{port}") in out0, out0[-2000:]
        assert "TP=2" in out0 and "iter      2/2" in out0
        assert "iter " not in open(os.path.join(d, f"{job_id}_1_log.out")).read()
    for job in ("0", "1"):  # rank 0 alone writes .hydra/ and the status
        assert os.path.isfile(os.path.join(sweep, job, ".hydra", "config.yaml"))
        assert json.load(open(os.path.join(sweep, job, "job_status.json")))["status"] == \
            "completed"


def test_slurm_config_with_broken_setup_fails_in_one_line(reaper):
    """A setup line that no longer exports MASTER_ADDR: the job is recorded as failed with the
    reason, as it would be on the cluster."""
    tmp = reaper
    r = _slurm_local(tmp, "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={tmp}/sw",
                     "hydra.launcher.setup=['export MASTER_PORT=29999']", "parallel=tp2")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the sweep's job failed
    rows = list(csv.DictReader(open(tmp / "sw" / "sweep_summary.csv")))
    assert [x["status"] for x in rows] == ["failed"], rows
    assert "under SLURM, set MASTER_ADDR and MASTER_PORT (MASTER_ADDR unset" in rows[0]["error"]
