"""`Watchdog`: a thread that reports which rank is stuck in which phase of which step when nothing
moves for longer than `train.watchdog_seconds` (by default the collective timeout plus a grace
minute), then ends the process (exit 3)."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # annotations only
    from framework.config import Config

SAVE_PATIENCE = 6.0  # a checkpoint save may take this many watchdog timeouts


def watchdog_seconds(cfg: "Config") -> float:
    """train.watchdog_seconds, or the collective timeout plus a grace minute."""
    if cfg.train.watchdog_seconds is not None:
        return float(cfg.train.watchdog_seconds)
    return 60.0 * (cfg.parallel.distributed_timeout_minutes + 1)


class Watchdog:
    """Reports rank, step and phase when no phase change happens within `timeout_s`."""

    def __init__(self, timeout_s: float, rank: int,
                 on_timeout: Optional[Callable[[str], None]] = None, poll_s: float = 1.0):
        self.timeout_s, self.rank, self.poll_s = timeout_s, rank, poll_s
        self.on_timeout = on_timeout or _die
        self.step, self.phase, self.since, self.patience = 0, "start", time.monotonic(), 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fw-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def mark(self, step: int, phase: str, patience: float = 1.0) -> None:
        """Entering `phase`; it may take `patience` x the timeout (long for big saves)."""
        self.step, self.phase, self.since, self.patience = step, phase, time.monotonic(), patience

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            stuck = time.monotonic() - self.since
            if stuck > self.timeout_s * self.patience:
                self.on_timeout(
                    f"rank {self.rank}: no progress for {stuck:.0f} s in {self.phase} at "
                    f"iteration {self.step} (a collective is probably waiting for a rank that "
                    f"died or hangs; train.watchdog_seconds sets this limit, by default "
                    f"parallel.distributed_timeout_minutes + 1 minute)")
                return


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(3)
