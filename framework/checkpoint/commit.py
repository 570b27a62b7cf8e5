"""The commit protocol: how a checkpoint becomes the latest, atomically.

Every writer of a checkpoint directory (`state.save_checkpoint`, `data_tools.convert` through
`framework.interop.megatron_files.write_checkpoint`) uses it:

1. `stage(ckpt_dir, iteration)` makes `iter_XXXXXXX.tmp` (after removing the staging
   directories a killed save left behind), where the files are written;
2. `commit(tmp, ckpt_dir, iteration)` fsyncs every file in it, renames it to `iter_XXXXXXX`
   (replacing an earlier save of the same iteration), fsyncs the directory, and only then
   replaces the tracker `latest_checkpointed_iteration.txt` through a temp file.

A kill at any point leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import List

from framework.checkpoint.reader import TRACKER, iter_dir

_TMP = re.compile(r"^iter_\d+\.tmp")


def staging_dir(ckpt_dir: str, iteration: int) -> str:
    """Where a save of `iteration` is written before `commit`."""
    return f"{iter_dir(ckpt_dir, iteration)}.tmp"


def stage(ckpt_dir: str, iteration: int) -> str:
    """Create `ckpt_dir` if needed, remove stale staging directories, make an empty staging
    directory for `iteration` and return it. One process (rank 0) calls it."""
    os.makedirs(ckpt_dir, exist_ok=True)
    remove_stale_tmp(ckpt_dir)
    tmp = staging_dir(ckpt_dir, iteration)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, ckpt_dir: str, iteration: int) -> str:
    """Make the staged directory `tmp` the committed checkpoint `iteration` and the latest one;
    returns its path. One process (rank 0) calls it, after every rank has written."""
    final = iter_dir(ckpt_dir, iteration)
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):  # re-saving the same iteration: replace it
        # two renames, then the slow delete: the window in which the tracker may name a missing
        # directory is that of a rename, not of deleting a whole checkpoint (the old copy's name
        # is a staging name, so a killed commit's leftover goes with the next `stage`)
        old = f"{tmp}-replaced"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    write_tracker(ckpt_dir, iteration)
    if old is not None:
        shutil.rmtree(old)
    return final


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tracker(ckpt_dir: str, iteration: int) -> None:
    """Name `iteration` as the latest checkpoint: temp file, fsync, rename, fsync the dir."""
    path = os.path.join(ckpt_dir, TRACKER)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(ckpt_dir)


def remove_stale_tmp(ckpt_dir: str) -> List[str]:
    """Delete `iter_*.tmp*` directories (left by a save that was killed). Rank 0, before a save."""
    removed = []
    if not os.path.isdir(ckpt_dir):
        return removed
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if _TMP.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
