"""A run's console lines, mirrored into `<run dir>/train.log`.

`echo(line)` prints a line (through `tqdm.write`, so an active progress bar stays below it) and
appends the same line to every log file opened by `run_log(run_dir)`. Hydra's job logging
writes third-party log records into the same file (it is Hydra's `<job name>.log`), so train.log
holds what the console showed, in order. Each process opens its own handle: ranks that print
(rank 0: checkpoints; the logging rank: iteration and eval lines) append whole lines.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Dict, Iterator, Optional

_files: Dict[str, IO[str]] = {}

LOG_NAME = "train.log"


@contextlib.contextmanager
def run_log(run_dir: Optional[str]) -> Iterator[Optional[str]]:
    """Mirror `echo` lines into `<run_dir>/train.log` inside the block (re-entrant: an in-process
    worker inside the launching process shares its handle). Yields the path (None: no run dir)."""
    if not run_dir:
        yield None
        return
    path = os.path.join(os.path.abspath(run_dir), LOG_NAME)
    if path in _files:
        yield path
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a", encoding="utf-8", buffering=1)
    _files[path] = f
    try:
        yield path
    finally:
        _files.pop(path, None)
        f.close()


def echo(line: str, err: bool = False) -> None:
    """Print `line` on stdout (stderr with `err`) and append it to the open train.log files."""
    stream = sys.stderr if err else sys.stdout
    try:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(line, file=stream)
    stream.flush()
    for f in list(_files.values()):
        try:
            f.write(line + "\n")
        except (OSError, ValueError):  # a full disk must not stop training
            pass
