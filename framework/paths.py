"""Path checks shared by the entry points and tools: whether a directory can be written, and
whether one path lies inside another. Standard library only (data_tools import it early)."""
from __future__ import annotations

import os
import tempfile
from typing import Optional


def inside(a: str, b: str) -> bool:
    """`a` is `b` or lies below it, symlinks and `..` resolved."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def unwritable_dir(path: str) -> Optional[str]:
    """None when `path` is a writable directory or can be created as one; else why not. Probes by
    creating (and removing) a temporary file or directory: permission bits do not tell (root,
    read-only mounts, /proc), and nothing is left behind."""
    if not str(path).strip():
        return "is empty: name a directory"
    path = os.path.abspath(path)
    probe, missing = path, []
    while not os.path.exists(probe):
        if os.path.islink(probe):
            return f"{probe} is a symbolic link to a missing target"
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        missing.append(os.path.basename(probe))
        probe = parent
    if os.path.isdir(probe):  # names the probe below would not try (it makes a short one)
        try:
            longest = os.pathconf(probe, "PC_NAME_MAX")
        except (OSError, ValueError):
            longest = 255
        too_long = [m for m in missing if len(os.fsencode(m)) > longest]
        if too_long:
            return (f"the name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} bytes "
                    f"long; this filesystem takes at most {longest}")
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    try:
        if probe == path:
            fd, name = tempfile.mkstemp(prefix=".fw-write-test-", dir=path)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".fw-write-test-", dir=probe))
    except OSError as e:
        where = "is not writable" if probe == path else f"cannot be created in {probe}"
        return f"{where} ({e.strerror or e})"
    return None
