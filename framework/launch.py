"""Launching workers: `launch(worker_fn, arg, world)` runs `worker_fn(arg)` on every rank.

* No WORLD_SIZE in the environment (a plain `python train.py`): start `world` workers with
  torch's elastic launcher API and wait for them. One worker runs in-process.
* Under torchrun (WORLD_SIZE set) or SLURM (SLURM_PROCID/SLURM_NTASKS): use that environment.

Stop signals reach the workers, which save a checkpoint and exit 0 (framework.training.stop); a
worker's one-line error (exit 2) becomes one line of the parent's (`WorkerFailed`).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import signal
import sys
import tempfile
from typing import Any, Callable

import torch

from framework.distributed import free_port
from framework.errors import ConfigError
from framework.training.console import echo
from framework.training.stop import STOP_FILE_ENV, release_after_stop


def resolve_device(kind: str, key: str = "train.device") -> str:
    """"auto" -> cuda when a GPU is visible, else cpu; `key` names the setting in errors."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible; `{key}=auto` (the default) "
                          f"runs on the CPU here")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind


def launched_externally() -> bool:
    return "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ


def launch(worker_fn: Callable[[Any], None], arg: Any, world: int,
           shutdown_s: float = 30.0, saves: bool = True) -> None:
    """Run `worker_fn(arg)` on every rank: join torchrun/SLURM, run in-process for one rank, or
    start `world` workers (`worker_fn` and `arg` must pickle: a module-level function).
    `shutdown_s`: how long the workers have to exit after a stop signal before they are killed.
    `saves`: the workers save a checkpoint when stopped (training), which a stop then reports.
    A stop signal that ends the workers raises KeyboardInterrupt (one line from `report_errors`)."""
    if launched_externally():
        _slurm_env()
        worker_fn(arg)
    elif world == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        try:
            worker_fn(arg)
        finally:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
    else:
        _elastic_launch(worker_fn, arg, world, shutdown_s, saves)


def _slurm_env() -> None:
    if "WORLD_SIZE" in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"under SLURM, set MASTER_ADDR and MASTER_PORT ({' and '.join(missing)} "
                          f"unset or empty; e.g. the first host of `scontrol show hostnames "
                          f"$SLURM_JOB_NODELIST` and a port from $SLURM_JOB_ID, as "
                          f"conf/hydra/launcher/slurm.yaml's setup does)")
    if os.environ["RANK"] == "0":
        print(f"joining SLURM job {os.environ.get('SLURM_JOB_ID', '?')}: "
              f"{os.environ['WORLD_SIZE']} tasks on {os.environ.get('SLURM_NNODES', '?')} "
              f"node(s), rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
              flush=True)


def _elastic_launch(worker_fn: Callable[[Any], None], arg: Any, world: int,
                    shutdown_s: float = 30.0, saves: bool = True) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent forwards these to the workers (SIGTERM by default; add SIGUSR1), which save a
    # checkpoint and exit 0; rank 0 leaves a note in the stop file so we know it was clean.
    # newer torch (2.13 here) takes them from LaunchConfig.signals_to_handle and overwrites the
    # variable with it (SIGUSR1 then killed this process); older torch reads only the variable
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = signals
    _start_resource_tracker_immune_to(signal.SIGUSR1)
    fd, stop_file = tempfile.mkstemp(prefix="fw-stop-")
    os.close(fd)
    os.environ[STOP_FILE_ENV] = stop_file
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"fw{os.getpid()}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                      max_restarts=0, monitor_interval=0.5, start_method=_start_method(),
                      shutdown_timeout=max(1, int(shutdown_s)),
                      **({"signals_to_handle": signals}
                         if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {}))
    quiet = _WorkerExitedFilter()
    elastic_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    elastic_log.addFilter(quiet)
    try:
        elastic_launch(lc, _worker_entry)(worker_fn, arg)
    except SignalException as e:
        note = open(stop_file).read().split()
        if not note:
            raise KeyboardInterrupt(
                signal_name(e.sigval) + (" before the workers saved a checkpoint" if saves
                                         else "")) from None
        echo(f"stopped by {signal_name(e.sigval)}: the workers saved a checkpoint at iteration "
             f"{note[0]} and exited")
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        msg = first.message
        if isinstance(msg, dict):  # elastic's error record: {'message': ..., 'extraInfo': ...}
            msg = msg.get("message", "")
        msg = str(msg).strip().splitlines()[-1] if msg else ""
        if first.exitcode == 2:  # _worker_entry printed the one-line error itself
            msg = "stopped on the error printed above"
        elif first.exitcode == 3:  # training.watchdog: a hang, named in its error line
            msg = "its watchdog found no progress (rank, iteration and phase: the error above)"
        elif "To enable traceback" in msg:  # elastic's text when the worker left no record
            msg = ""
        raise WorkerFailed(f"worker failed (rank {first.local_rank}, exit {first.exitcode}): "
                           f"{msg or 'see the log above'}") from None
    finally:
        elastic_log.removeFilter(quiet)
        os.environ.pop(STOP_FILE_ENV, None)
        for marker in glob.glob(glob.escape(stop_file) + ".*"):  # _first_to_report's
            os.unlink(marker)
        os.unlink(stop_file)


class _WorkerExitedFilter(logging.Filter):
    """Drops torch elastic's log of a worker that exited with code 2 (its one-line error) or 3
    (the watchdog's line): the record carries the agent's own traceback, not the worker's, and
    the worker has printed why. Any other exit, and a worker that raised, keep elastic's record."""

    def filter(self, record: logging.LogRecord) -> bool:
        import torch.multiprocessing as tmp

        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, tmp.ProcessExitedException) and exc.exit_code in (2, 3))


def _start_method() -> str:
    """How the workers start: "spawn" (a fresh interpreter each; the default, and what every
    user run does). The CPU test suite sets FW_WORKER_START_METHOD=fork where a test is about
    what the workers compute, not how they start: a forked worker inherits the parent's imports
    (torch, megatron-core) instead of paying ~10 s of CPU to import them again."""
    method = os.environ.get("FW_WORKER_START_METHOD", "spawn")
    if method not in ("spawn", "fork", "forkserver"):
        raise ConfigError(f"FW_WORKER_START_METHOD={method}: one of spawn, fork, forkserver")
    return method


def _start_resource_tracker_immune_to(sig) -> None:
    """Start multiprocessing's resource tracker (the helper process that the agent's and the
    workers' queues and events register with) with `sig` blocked, which it inherits and keeps.
    It ignores SIGINT and SIGTERM itself, but a SIGUSR1 sent to the process group killed it; its
    replacement, started at the next semaphore's release, did not know that semaphore and printed
    a KeyError traceback for each. Does nothing if this process already runs one."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerFailed(ConfigError):
    """A self-launched worker failed; reported as one line (its own output is above)."""


def signal_name(sig) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _first_to_report(message: str) -> bool:
    """True for the first self-launched worker to report `message` (ranks that fail alike say it
    once): a marker file beside the launch's stop file, made exclusively."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if not stop_file:
        return True
    digest = hashlib.sha1(message.encode("utf-8", "replace")).hexdigest()[:16]
    try:
        os.close(os.open(f"{stop_file}.{digest}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def _worker_entry(worker_fn: Callable[[Any], None], arg: Any) -> None:
    try:
        worker_fn(arg)
    except ConfigError as e:
        # one line, no traceback from the worker; the parent reports the exit code. One write
        # call, so the lines of ranks failing at once do not interleave
        line = f"error: {e}"
        if _first_to_report(line):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launching process says it once
        sys.stdout.flush()
        os._exit(130)
    release_after_stop()  # a deliberate stop: returning ends this process, agent polling or not
