"""Hydra sweeps (`python train.py -m a=1,2 b=x,y`) and the callback registered in conf/train.yaml.

Each job of a sweep launches its own workers and writes into its own directory
(`<sweep dir>/<job number>`). A failed job writes `job_status.json` with its error and the sweep
goes on. At the end, `SweepCallback.on_multirun_end` reads every job's `metrics.jsonl` and
`job_status.json`, prints a summary table and writes `<sweep dir>/sweep_summary.csv`. The summary
is built from files only, so it works the same with launchers that run jobs elsewhere (SLURM).

The callback also masks secrets in the files Hydra writes into `<run dir>/.hydra/`.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from framework.cli import checkpoint_overrides, default_checkpoint_dir, task_overrides
from framework.job_status import STATUS_FILE, read_json, write_job_status  # noqa: F401
from framework.launch_env import env_rank

SUMMARY_FILE = "sweep_summary.csv"
COLUMNS = ["job", "overrides", "train_loss", "eval_loss", "tokens_per_sec_per_gpu", "steps",
           "status", "error"]


def job_summary(job_dir: str) -> Dict[str, Any]:
    """One row of the sweep summary from a job directory."""
    st = read_json(os.path.join(job_dir, STATUS_FILE)) or {}
    train = evals = None
    steps = 0
    tps: List[float] = []
    path = os.path.join(job_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a partly written last line of a killed job
                if r.get("loss") is not None:
                    train = r["loss"]
                    steps = max(steps, int(r.get("step") or 0))
                    if r.get("tokens_per_sec_per_gpu") is not None:
                        tps.append(float(r["tokens_per_sec_per_gpu"]))
                if r.get("eval_loss") is not None:
                    evals = r["eval_loss"]
    # the first logged window includes start-up; leave it out when there are others
    tokens = sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None)
    status = st.get("status") or ("unknown" if train is None else "incomplete")
    return {"job": os.path.basename(job_dir.rstrip("/")),
            "overrides": " ".join(st.get("overrides") or []),
            "train_loss": train, "eval_loss": evals, "tokens_per_sec_per_gpu": tokens,
            "steps": steps, "status": status, "error": st.get("error") or ""}


def summarize_sweep(sweep_dir: str, out=sys.stdout) -> List[Dict[str, Any]]:
    """Print the summary table of the jobs under `sweep_dir` and write sweep_summary.csv."""
    jobs = [os.path.join(sweep_dir, d) for d in os.listdir(sweep_dir)
            if os.path.isfile(os.path.join(sweep_dir, d, STATUS_FILE))
            or os.path.isfile(os.path.join(sweep_dir, d, "metrics.jsonl"))]
    jobs.sort(key=lambda p: (not os.path.basename(p).isdigit(),
                             int(os.path.basename(p)) if os.path.basename(p).isdigit() else 0,
                             os.path.basename(p)))
    rows = [job_summary(j) for j in jobs]
    with open(os.path.join(sweep_dir, SUMMARY_FILE), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    print(format_table(rows), file=out, flush=True)
    print(f"sweep summary: {os.path.join(sweep_dir, SUMMARY_FILE)}", file=out, flush=True)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}")
    return str(v)


def format_table(rows: List[Dict[str, Any]]) -> str:
    cols = [("job", "job"), ("overrides", "overrides"), ("train_loss", "train loss"),
            ("eval_loss", "eval loss"), ("tokens_per_sec_per_gpu", "tok/s/gpu"),
            ("status", "status")]
    # the table shows the overrides that differ between jobs (the CSV has them all)
    toks = [r["overrides"].split() for r in rows]
    common = set.intersection(*map(set, toks)) if len(toks) > 1 else set()
    shown = [" ".join(t for t in ts if t not in common) for ts in toks]
    cells = [[h for _, h in cols]] + [
        [sh if k == "overrides" else
         (f"{r[k]:.0f}" if k == "tokens_per_sec_per_gpu" and r[k] is not None else _fmt(r[k]))
         for k, _ in cols] for r, sh in zip(rows, shown)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r["status"] == "failed" and r["error"]:
            lines.append(f"job {r['job']} failed: {r['error']}")
    return "\n".join(lines)


_SWEEP_ARTIFACTS = ("multirun.yaml", SUMMARY_FILE)
_JOB_ARTIFACTS = (STATUS_FILE, "metrics.jsonl", "train.log", ".hydra")


def check_sweep_start(config: DictConfig) -> None:
    """Refuse, before any job runs, a sweep that would mix or lose output: a `hydra.sweep.dir`
    that already holds an earlier sweep's jobs (their metrics and logs would be appended to and
    their status overwritten), a `hydra.sweep.subdir` that is the same for every job, and two jobs
    that would share one checkpoint directory (the second would resume the first's checkpoint
    instead of training: jobs that differ only in run-control keys such as train.log_interval,
    a repeated value, or one explicit checkpoint.dir for all)."""
    from framework.errors import ConfigError

    launcher = config.hydra.runtime.choices.get("hydra/launcher")
    if launcher == "slurm":
        import shutil

        if shutil.which("sbatch") is None:  # (srun runs inside the job, on the cluster)
            raise ConfigError("hydra/launcher=slurm submits the jobs with sbatch, which this "
                              "machine does not have: run the sweep on a SLURM login node, or "
                              "use hydra/launcher=slurm_local to run the same jobs here")
    sweep_dir = str(config.hydra.sweep.dir)
    # where every rank runs the sweep (torchrun), the others may already see rank 0's new files
    if env_rank() == 0 and os.path.isdir(sweep_dir) and not _same_sweep(config, sweep_dir):
        found = [n for n in _SWEEP_ARTIFACTS if os.path.exists(os.path.join(sweep_dir, n))]
        for name in sorted(os.listdir(sweep_dir)):
            sub = os.path.join(sweep_dir, name)
            if os.path.isdir(sub) and any(os.path.exists(os.path.join(sub, a))
                                          for a in _JOB_ARTIFACTS):
                found.append(name + "/")
        if found:
            raise ConfigError(
                f"hydra.sweep.dir={sweep_dir} already holds an earlier sweep "
                f"({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): its jobs' metrics "
                f"and logs would be appended to and their records overwritten; give a new "
                f"hydra.sweep.dir (jobs still resume from their checkpoint directories), or move "
                f"that one away")
    jobs = sweep_jobs(config)
    default_dir = _raw(config, "checkpoint.dir")
    chdir = bool(OmegaConf.select(config, "hydra.job.chdir", default=False))
    raw_subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", ""))
    if len(jobs) > 1 and "${" not in raw_subdir:
        raise ConfigError(
            f"hydra.sweep.subdir={raw_subdir} is the same for all {len(jobs)} jobs of this sweep, "
            f"so they would write into one directory: use an interpolation that differs per job, "
            f"such as ${{hydra.job.num}} (the default)")
    seen: Dict[str, int] = {}
    for i, job in enumerate(jobs):
        if any(o.replace(" ", "").lower() == "checkpoint.save=false" for o in job):
            continue  # saves nothing for another job to resume
        d = job_checkpoint_dir(job, str(config.hydra.runtime.cwd or os.getcwd()),
                               default=default_dir, chdir=chdir)
        if d is None:
            continue
        if d in seen:
            j = seen[d]
            raise ConfigError(
                f"jobs {j} ({' '.join(jobs[j]) or 'no overrides'}) and {i} ({' '.join(job)}) of "
                f"this sweep would share checkpoint.dir={d}, so job {i} would resume job {j}'s "
                f"checkpoint instead of training: sweep over settings that change the run "
                f"(run-control keys such as train.log_interval do not name the directory), drop "
                f"the repeated value, or give each job its own directory, e.g. "
                f"'checkpoint.dir=checkpoints/sweep/${{hydra:job.num}}'")
        seen[d] = i


def check_sweep_configs(config: DictConfig, conf_dir: str) -> None:
    """Compose every job of the sweep as the launcher will, and run train.py's config checks on
    it (`cli.config_from_hydra`: group choices, unknown keys, types, the dataclasses' validation,
    overrides that would have no effect), before the first job starts. Hydra's basic sweeper only
    composes each job; our checks would otherwise first run when that job starts, after the jobs
    before it have trained. Checks that read files (checkpoints, data, tokenizers) stay with each
    job: an earlier job may write what a later one reads."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    from hydra.errors import HydraException

    from framework.cli import _omegaconf_line, config_from_hydra, hydra_error_line
    from framework.config import Config
    from framework.errors import ConfigError

    jobs = sweep_jobs(config)
    if len(jobs) < 2 or not GlobalHydra.instance().is_initialized():
        return  # one job checks itself before it trains
    loader = GlobalHydra.instance().config_loader()
    holder = HydraConfig.instance()
    saved = holder.cfg
    try:
        for i, job in enumerate(jobs):
            try:
                jc = loader.load_sweep_config(config, list(job))
                with open_dict(jc):  # as Hydra's launcher numbers the job and names its dir
                    jc.hydra.job.id = i
                    jc.hydra.job.num = i
                    jc.hydra.runtime.output_dir = os.path.abspath(os.path.join(
                        str(jc.hydra.sweep.dir), str(jc.hydra.sweep.subdir)))
                holder.set_config(jc)  # `${hydra:...}` in the job's config reads this job's
                task = copy.deepcopy(jc)  # the task's config, as Hydra's run_job makes it
                with read_write(task), open_dict(task):
                    del task["hydra"]
                config_from_hydra(task, jc.hydra, conf_dir, multirun=True)
            except (ConfigError, OmegaConfBaseException, HydraException) as e:
                # HydraException: e.g. a group option that does not exist
                line = str(e) if isinstance(e, ConfigError) else _omegaconf_line(e) \
                    if isinstance(e, OmegaConfBaseException) else hydra_error_line(e, Config)
                if line is None:
                    raise
                raise ConfigError(f"job {i} ({' '.join(job) or 'no overrides'}) of this sweep: "
                                  f"{line}") from None
    finally:
        holder.cfg = saved


def _raw(config: DictConfig, key: str) -> Optional[str]:
    """A config value as written (an interpolation left as text), or None."""
    node = OmegaConf.select(config, key.rsplit(".", 1)[0], default=None)
    if node is None:
        return None
    value = OmegaConf.to_container(node, resolve=False).get(key.rsplit(".", 1)[1])
    return None if value is None else str(value)


def _same_sweep(config: DictConfig, sweep_dir: str) -> bool:
    """True when `sweep_dir` holds this very sweep (the same command line): a requeued SLURM job,
    a torchrun restart, or the command run again after a stop. Its jobs resume from their
    checkpoints and go on in their own directories, as one resumed run does."""
    try:
        earlier = OmegaConf.load(os.path.join(sweep_dir, "multirun.yaml"))
        theirs = OmegaConf.to_container(earlier.hydra.overrides.task, resolve=False)
    except Exception:  # noqa: BLE001 (none, or not readable: not shown to be the same)
        return False
    return [str(o) for o in theirs] == task_overrides(config.hydra)


def sweep_jobs(config: DictConfig) -> List[List[str]]:
    """Each job's overrides, as Hydra's basic sweeper will give them (an empty list for another
    sweeper, which chooses its jobs as it goes)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if not target.endswith("BasicSweeper"):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = task_overrides(config.hydra)
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params:
        args = [f"{k}={v}" for k, v in OmegaConf.to_container(params, resolve=False).items()] + \
            args
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 (e.g. a glob() sweep needs Hydra's config loader)
        return []


def job_checkpoint_dir(job: List[str], cwd: str, default: Optional[str] = None,
                       chdir: bool = False) -> Optional[str]:
    """The checkpoint directory a job of a sweep will use, or None where only the job itself can
    tell (a checkpoint.dir with an interpolation; a relative one under hydra.job.chdir=true,
    which each job resolves in its own directory). `default`: checkpoint.dir as the config
    files set it (null: the name train.py builds from the job's overrides)."""
    value = default
    for o in job:
        key, _, v = o.partition("=")
        if key.lstrip("+") == "checkpoint.dir":
            # Hydra's sweeper gives a job's values with its grammar's characters escaped
            # (`$\{hydra\:job.num\}`); a quoted value comes as it was typed
            v = v.strip()
            value = v[1:-1] if v[:1] in "'\"" and v[-1:] == v[:1] else re.sub(r"\\(.)", r"\1", v)
    if value is not None and value.strip().lower() not in ("null", "none", ""):
        value = value.strip("'\"")
        if "${" in value or (chdir and not os.path.isabs(value)):
            return None
        return os.path.abspath(os.path.join(cwd, value))
    # (the default name is built from the launch directory, hydra.runtime.cwd, even under chdir)
    return os.path.abspath(default_checkpoint_dir(checkpoint_overrides(job, multirun=True), cwd))


class SweepCallback(Callback):
    """Registered in conf/train.yaml under `hydra.callbacks`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and goes on, so refuse here
        from framework.errors import ConfigError
        from framework.security.masking import mask_text

        try:
            check_sweep_start(config)
            check_sweep_configs(config, os.path.join(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))), "conf"))
        except ConfigError as e:
            print(f"error: {mask_text(str(e))}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._mask_hydra_files(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        from framework.security.masking import mask_secrets

        self._mask_hydra_files(config)
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        out_dir = config.hydra.runtime.output_dir
        overrides = mask_secrets(task_overrides(config.hydra))
        st = read_json(os.path.join(out_dir, STATUS_FILE)) or {}
        status = error = None
        if "status" not in st:  # the task did not record its outcome (it raised)
            from hydra.core.utils import JobStatus

            failed = getattr(job_return, "status", None) == JobStatus.FAILED
            status = "failed" if failed else "completed"
            if failed:
                error = repr(getattr(job_return, "_return_value", None))
        write_job_status(out_dir, status, error, overrides=overrides)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        if not os.path.isdir(sweep_dir):
            return
        rows = summarize_sweep(sweep_dir)
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs did not complete", file=sys.stderr,
                  flush=True)
            sys.exit(1)  # after the summary: a script or CI step sees that the sweep failed

    @staticmethod
    def _mask_hydra_files(config: DictConfig) -> None:
        from framework.security.masking import mask_hydra_dir

        sub = config.hydra.output_subdir
        if sub is None:
            return
        overrides = task_overrides(config.hydra)
        mask_hydra_dir(os.path.join(config.hydra.runtime.output_dir, str(sub)), overrides)
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:  # <sweep dir>/multirun.yaml
            mask_hydra_dir(str(config.hydra.sweep.dir), overrides)
