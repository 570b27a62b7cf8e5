"""Command-line tools: `python -m data_tools.preprocess` and `python -m data_tools.convert`."""
import contextlib
import signal
from typing import Iterator

EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_state = {"published": False}


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the tool works, SIGTERM and SIGHUP (`kill`, `timeout`, a closed terminal, a batch
    system's stop) raise KeyboardInterrupt as Ctrl-C does, so the tool's cleanup runs (its
    staging directory is removed, the outputs are left as they were) instead of the process
    dying on the spot. A signal the tool was started ignoring (SIGHUP under `nohup`) stays
    ignored; outside the main thread nothing changes."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    _state["published"] = False
    old = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, interrupt)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def mark_published() -> None:
    """The outputs are in place: an interrupt from now on only stops the cleanup after it."""
    _state["published"] = True


def interrupted_line(stop: BaseException) -> str:
    """The one line a tool prints when a stop signal or Ctrl-C ended it."""
    why = str(stop) or "SIGINT"
    if _state["published"]:
        return (f"error: interrupted ({why}) after the outputs were in place (they are "
                f"complete); a hidden staging or .old-* directory beside them may be left")
    return (f"error: interrupted ({why}); its staging files are removed, and earlier outputs "
            f"are kept")
