"""What the launcher's environment says about this process, read without torch: its rank
(`RANK` under torchrun and self-launched workers, `SLURM_PROCID` under SLURM, else 0)."""
from __future__ import annotations

import os


def env_rank() -> int:
    """This process's global rank as the launcher set it; 0 in a plain `python train.py`."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0
