"""Helpers shared by the Hydra entry points (train.py, generate.py)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from datetime import datetime
from typing import Callable, List, Optional, TypeVar

from omegaconf import OmegaConf

T = TypeVar("T")


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _run_dir(root: str) -> str:
    """One run directory for every rank: under torchrun/SLURM the job id names it, because
    `${now:}` resolves differently on each rank (hydra issue 2070)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job != "none":
        return os.path.join(root, f"job-{job}")
    return os.path.join(root, datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fw_run_dir"):
        OmegaConf.register_new_resolver("fw_run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("fw_output_subdir"):
        # only rank 0 writes .hydra/
        OmegaConf.register_new_resolver("fw_output_subdir",
                                        lambda: ".hydra" if _rank() == 0 else None)


# Overrides that leave the checkpoint directory name alone: how long a run goes, how it reports,
# where and how often it saves, and the device. The same run continues under them (e.g.
# `train.max_steps=4000 logging=wandb` resumes checkpoints/default). A key matches itself and
# every key below it (`train.profile` covers `train.profile.steps`). Every other override (model,
# parallel, optimizer, data, seed, batch sizes, checkpoint.load...) names a different run.
RUN_CONTROL_KEYS = (
    "train.max_steps", "train.max_minutes", "train.log_interval", "train.eval_interval",
    "train.eval_iters", "train.progress_bar", "train.profile", "train.spike_factor",
    "train.defer_step_stats", "train.device", "logging", "checkpoint.dir", "checkpoint.save",
    "checkpoint.save_interval", "checkpoint.keep_last", "checkpoint.allow_pickle",
    "data.num_workers", "data.path_to_cache",
)
# ...except in a sweep (-m), where jobs of different lengths must not continue one another
SWEEP_NAMED_KEYS = ("train.max_steps",)


def _override_key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _is_run_control(key: str, multirun: bool) -> bool:
    if multirun and key in SWEEP_NAMED_KEYS:
        return False
    return any(key == k or key.startswith(k + ".") for k in RUN_CONTROL_KEYS)


def checkpoint_overrides(task_overrides: List[str], multirun: bool = False) -> str:
    """The part of the command line that names the checkpoint directory: the overrides that
    change what is computed, sorted, joined by "," (Hydra's override_dirname format)."""
    lines = sorted(o for o in task_overrides if not _is_run_control(_override_key(o), multirun))
    return ",".join(lines)


def default_checkpoint_dir(override_dirname: str, cwd: str) -> str:
    """checkpoints/<overrides> (`checkpoint_overrides`): the same run resumes, another does not."""
    from framework.security import is_secret_name, mask_text

    # a secret given as an override must not become part of a directory name
    parts = []
    for part in mask_text(override_dirname).split(","):
        key, eq, val = part.partition("=")
        if eq and is_secret_name(key.lstrip("+~")):
            val = "masked-" + hashlib.sha1(val.encode()).hexdigest()[:8]
        parts.append(key + eq + val)
    override_dirname = ",".join(parts)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(name) > 120:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return os.path.join(cwd, "checkpoints", name)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_errors(fn: Callable[[], T], job_dir: Optional[str] = None) -> Optional[T]:
    """Run `fn`; a config or input error becomes one line on stderr and exit code 2.

    With `job_dir` (one job of a `-m` sweep) nothing exits: the outcome is written to
    `<job_dir>/job_status.json` for the sweep summary and the sweep goes on with the next job.
    """
    if job_dir is not None:
        return _record_job(fn, job_dir)
    from omegaconf.errors import OmegaConfBaseException

    from framework.config import ConfigError

    try:
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
    except OmegaConfBaseException as e:
        msg = str(e).strip().splitlines()[0]
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            msg = str(cause)
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _record_job(fn: Callable[[], T], job_dir: str) -> Optional[T]:
    import traceback

    from omegaconf.errors import OmegaConfBaseException

    from framework.config import ConfigError
    from framework.security import mask_text
    from framework.sweep import write_job_status

    try:
        out = fn()
    except (ConfigError, OmegaConfBaseException) as e:
        cause = e.__cause__ or e.__context__
        msg = str(cause if isinstance(cause, ConfigError) else e).strip().splitlines()[0]
        print(f"error: {mask_text(msg)}", file=sys.stderr, flush=True)
        write_job_status(job_dir, "failed", f"config error: {mask_text(msg)}")
        return None
    except Exception as e:  # a crashed job must not end the sweep
        traceback.print_exc()
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(f"error: job failed: {mask_text(msg)}", file=sys.stderr, flush=True)
        write_job_status(job_dir, "failed", mask_text(f"{type(e).__name__}: {msg}"))
        return None
    write_job_status(job_dir, "completed", None)
    return out


def install_masked_cfg_printing() -> None:
    """`--cfg job|hydra|all` prints the composed config with secrets masked."""
    import contextlib
    import io

    from hydra._internal.hydra import Hydra

    if getattr(Hydra.show_cfg, "_fw_masked", False):
        return
    real = Hydra.show_cfg

    def show_cfg(self, config_name, overrides: List[str], *args, **kwargs):
        from framework.security import mask_hydra_output

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            real(self, config_name, overrides, *args, **kwargs)
        sys.stdout.write(mask_hydra_output(buf.getvalue(), overrides))

    show_cfg._fw_masked = True
    Hydra.show_cfg = show_cfg
