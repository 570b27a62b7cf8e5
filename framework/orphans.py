"""No forked child outlives the training process.

megatron-core's checkpoint writer forks worker processes that write the checkpoint's files
(`filesystem_async.write_preloaded_data_multiproc`). When the training process is killed with
SIGKILL during a save (the OOM killer, `kill -9`, a node agent), such a worker was left behind
(seen on CPU with gpt2_small): adopted by init, holding the memory it was forked with (2.4 GB),
catching SIGTERM with the trainer's stop handler (so a plain `kill` did nothing) and asleep on a
futex for good. It also held the run lock (`framework/locking.py`: an flock is shared with
forked children), so every resume of that run was refused as "in use by another run" (naming the
dead trainer's pid) until someone found and killed it.

`with forks_die_with_this_process():` (around a rank's training) asks the kernel (Linux
`prctl(PR_SET_PDEATHSIG, SIGKILL)`) to kill every child the process forks from Python *in its
main thread* when that thread ends, that is when the process dies; a child whose parent is
already gone by the time it runs the hook exits at once. The kernel ties the signal to the
forking thread, so forks from other threads (a plugin's, a library's worker threads) are left
alone: they would be killed when their short-lived thread ends. Children of a living trainer
run and end as before; `subprocess` children are not touched unless started with `preexec_fn`
(then the hook runs and the signal outlives their exec). Outside the `with`, nothing is set.
The checkpoint a killed writer was writing is a staging directory, which the next save
removes; the committed ones are untouched (framework/checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

PR_SET_PDEATHSIG = 1
_state = {"hooked": False, "active": 0, "parent": 0, "main": False, "prctl": None}


def _before_fork() -> None:
    _state["parent"] = os.getpid()
    _state["main"] = threading.current_thread() is threading.main_thread()


def _in_child() -> None:
    prctl = _state["prctl"]
    if prctl is None or not _state["active"] or not _state["main"]:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != _state["parent"]:  # the parent died before the line above
        os._exit(1)


def _install() -> bool:
    """The fork hooks, once per process (Linux; elsewhere nothing). True if installed."""
    if _state["hooked"]:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:  # loaded here, before any fork: a child must not load a library itself
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    _state["prctl"] = prctl
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
    _state["hooked"] = True
    return True


@contextlib.contextmanager
def forks_die_with_this_process() -> Iterator[bool]:
    """While inside: children forked from the main thread die with this process (see the module
    docstring). Yields whether that is in effect (Linux)."""
    on = _install()
    _state["active"] += 1
    try:
        yield on
    finally:
        _state["active"] -= 1
