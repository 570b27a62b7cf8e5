"""Stop requests: SIGTERM / SIGUSR1 on any rank, or the `train.max_minutes` wall-clock budget,
become a flag that every rank agrees on (one tiny all-reduce per step, read one step later when
step stats are deferred); the loop then saves a checkpoint and returns, and the process exits 0.
A self-launching parent learns of a clean stop through the file named by `STOP_FILE_ENV`.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from framework.training.host_copy import HostCopy

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE_ENV = "FW_STOP_FILE"  # set by the self-launching parent: rank 0 reports a clean stop


class StopRequest:
    """Collects local reasons to stop; `agreed()` makes every rank see the same answer."""

    def __init__(self, max_minutes: Optional[float] = None, start: Optional[float] = None,
                 device: Optional[torch.device] = None):
        self.deadline = None if max_minutes is None else \
            (time.time() if start is None else start) + 60.0 * max_minutes
        self.device = device or torch.device("cpu")
        self.signum: Optional[int] = None
        self._previous = {}
        self._inflight: Optional[HostCopy] = None  # agreed(deferred=True): last step's flag

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # `kill -USR2 <pid>` prints every thread's Python stack (to diagnose a hang)
        faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def local_reason(self) -> Optional[str]:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self.deadline is not None and time.time() >= self.deadline:
            return "time"
        return None

    def agreed(self, deferred: bool = False) -> Optional[str]:
        """The stop reason if any rank has one (collective over the world: call on every rank).

        `deferred` (GPU): return what the previous call's all-reduce agreed, and start this
        call's without waiting for it, so the host does not wait for the GPU; a stop then comes
        one step later, on every rank alike."""
        reason = self.local_reason()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return reason
        # 0: go on, 1: time, 2 + n: signal n (the other ranks can name it)
        code = {None: 0, "time": 1}.get(reason, 2 + (self.signum or 0))
        flag = torch.full((1,), code, dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if deferred and self.device.type == "cuda":
            previous, self._inflight = self._inflight, HostCopy(flag)
            got = 0 if previous is None else int(previous.read()[0])
        else:
            got = int(flag.item())
        if got == 0:
            return None
        if reason is not None:
            return reason
        if got == 1:
            return "time"
        try:
            return f"{signal.Signals(got - 2).name} on another rank"
        except ValueError:
            return "signal on another rank"


def describe_stop(reason: str, max_minutes: Optional[float]) -> str:
    if reason == "time":
        return f"train.max_minutes={max_minutes} reached"
    return f"{reason} received"


_stopped: List[str] = []  # the reason of a stop agreed in this process (see release_after_stop)


def report_clean_stop(step: int, reason: str, rank: int) -> None:
    """Record a deliberate stop; rank 0 tells a self-launching parent (through its stop file)."""
    _stopped.append(reason)
    path = os.environ.get(STOP_FILE_ENV)
    if path and rank == 0:
        with open(path, "w") as f:
            f.write(f"{step} {reason}\n")


def release_after_stop() -> None:
    """In a self-launched (torch elastic) worker after a deliberate stop, just before the worker
    function returns: make that return end the process, whatever the agent is doing.

    torch elastic's worker wrapper (`_wrap`) puts the function's return value in a queue, then
    waits for an event that the agent sets only from its monitor loop, once it has every rank's
    return value. Two cases:
    * the stop came through the agent (the parent or its process group was signalled): the agent
      is shutting down, not polling, so it never sets that event; a worker waiting for it would
      be killed `shutdown_s` later, orphaning mcore's checkpoint-writer manager process;
    * the stop came from one worker (a signal to that worker alone, agreed by the stop-flag
      all-reduce) or from the time budget: the agent is polling and must get every return value.
      Leaving with `os._exit` before the wrapper has put it (what this function replaced) left
      the agent polling forever: exit code 0 with no return value is neither done nor failed.
    Setting the event here serves both: each worker's wrapper puts its value, does not wait, and
    the process exits normally. Only workers that have stopped wait on that event, so no rank is
    released early. Without the wrapper (another torch), leave after a grace period instead."""
    if not _stopped:
        return
    event = _elastic_finished_event()
    if event is not None:
        event.set()
        return
    threading.Thread(target=_exit_later, args=(10.0,), name="fw-exit-after-stop",
                     daemon=True).start()


def _elastic_finished_event():
    """The `queue_finished_reading_event` of torch elastic's `_wrap` below us, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "_wrap" and frame.f_globals.get("__name__", "")
                == "torch.distributed.elastic.multiprocessing.api"):
            event = frame.f_locals.get("queue_finished_reading_event")
            return event if hasattr(event, "set") else None
        frame = frame.f_back
    return None


def _exit_later(delay: float) -> None:
    time.sleep(delay)
    import multiprocessing.util

    sys.stdout.flush()
    sys.stderr.flush()
    multiprocessing.util._exit_function()  # stops helper processes (mcore's writer manager)
    os._exit(0)
