"""Helpers shared by the Hydra entry points (train.py, generate.py)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from datetime import datetime
from typing import Callable, TypeVar

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


def default_checkpoint_dir(override_dirname: str, cwd: str) -> str:
    """checkpoints/<overrides>: the same command resumes, a different one does not."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(name) > 120:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return os.path.join(cwd, "checkpoints", name)


def report_errors(fn: Callable[[], T]) -> T:
    """Run `fn`; a config or input error becomes one line on stderr and exit code 2."""
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
