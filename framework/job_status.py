"""The record a job of a sweep keeps of its outcome (`<job dir>/job_status.json`): written by the
job itself (framework/cli.py `report_errors`) or by the sweep callback (framework/sweep.py), read
by the sweep summary. A module of its own so that both can use it without importing each other."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from framework.launch_env import env_rank

STATUS_FILE = "job_status.json"


def write_job_status(job_dir: str, status: str, error: Optional[str],
                     overrides: Optional[List[str]] = None) -> None:
    """Create or update `<job_dir>/job_status.json` (fields given here win over stored ones).
    Where every rank runs the job (SLURM: one task per rank), rank 0 alone keeps the record; a
    failure elsewhere reaches rank 0 as a failed collective (its own error is in its log)."""
    if env_rank() != 0:
        return
    os.makedirs(job_dir, exist_ok=True)
    path = os.path.join(job_dir, STATUS_FILE)
    rec: Dict[str, Any] = read_json(path) or {}
    if status is not None:
        rec["status"] = status
        rec["error"] = error
    if overrides is not None:
        rec["overrides"] = overrides
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
