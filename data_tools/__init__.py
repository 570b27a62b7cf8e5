"""Command-line tools: `python -m data_tools.preprocess` and `python -m data_tools.convert`."""
import contextlib
import signal
from typing import Iterator

EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the tool works, SIGTERM and SIGHUP (`kill`, `timeout`, a closed terminal, a batch
    system's stop) raise KeyboardInterrupt as Ctrl-C does, so the tool's cleanup runs (its
    staging directory is removed, the outputs are left as they were) instead of the process
    dying on the spot. Outside the main thread nothing changes."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, interrupt)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
