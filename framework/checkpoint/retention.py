"""`checkpoint.keep_last`: prune old committed checkpoints after a newer one is committed."""
from __future__ import annotations

import os
import shutil
from typing import List, Optional

from framework.checkpoint.reader import committed_iterations, latest_iteration

def prune_checkpoints(ckpt_dir: str, keep_last: Optional[int],
                      failed: Optional[List[str]] = None) -> List[str]:
    """Keep the newest `keep_last` committed checkpoints (and always the tracker's). Rank 0,
    after the tracker names the newest one. Returns the paths removed; those that could not be
    (read-only) are appended to `failed`."""
    if keep_last is None or not os.path.isdir(ckpt_dir):
        return []
    latest = latest_iteration(ckpt_dir)
    if latest is None:
        return []
    # committed ones only: an `iter_N` folder that is not a checkpoint (a user's) is not ours
    # to delete (the plan refuses a checkpoint.dir holding one)
    iters = committed_iterations(ckpt_dir)
    keep = set(i for i in iters if i <= latest)
    keep = set(sorted(keep)[-keep_last:]) | {latest}
    removed = []
    for it in iters:
        if it not in keep and it < latest:
            path = os.path.join(ckpt_dir, f"iter_{it:07d}")
            # renamed to a staging name first: a prune stopped halfway (a kill, a read-only
            # file) leaves a `.tmp` directory the next save's `stage` removes, not an iter_N
            # without its framework.json that later runs would refuse as not a checkpoint
            gone = f"{path}.tmp-pruned"
            try:
                os.rename(path, gone)
            except OSError:
                gone = path
            shutil.rmtree(gone, ignore_errors=True)
            if not os.path.lexists(gone):
                removed.append(path)
            elif failed is not None:  # (a read-only one stays: not reported as removed)
                failed.append(gone)
    return removed
