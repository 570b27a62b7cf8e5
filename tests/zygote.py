"""A warm process that forks test subprocesses (the server side of tests/helpers.py).

Each `python train.py` a test starts used to spend most of its time importing torch,
megatron-core, transformers and wandb. This server imports them once, then, per request read
from stdin (one JSON line), forks a child that becomes that process: its own argv, working
directory, environment, umask, optionally its own session, stdout/stderr written to the given
files (stdin is /dev/null), and the script or module run as `__main__`. The child exits as the
interpreter does (exit code from SystemExit, traceback and exit 1 on an uncaught exception,
non-daemon threads joined, atexit handlers run, files flushed) but without tearing down every
module, which would copy most of the server's memory. The server reaps its children and writes
each exit status (as subprocess reports it: negative for a signal) and CPU time to the request's
`rc` file. It stops when stdin closes.

Where a child differs from a fresh interpreter:
- what the imports print (warnings raised at import time) was printed once, here: a test about
  that output starts a fresh interpreter (helpers: `fresh=True`);
- environment variables read at import time keep the server's values, except OMP_NUM_THREADS,
  PYTHONPATH, PYTHONWARNINGS and TRANSFORMERS_VERBOSITY, applied here; helpers.py starts a fresh
  interpreter for a process asked for with another HF_*, TRANSFORMERS_*, TORCH_LOGS, MKL_*,
  TRITON_* or PYTHON* value;
- every child has the server's hash seed.
Started by tests/helpers.py only where CUDA is absent (a CUDA context does not survive fork).
"""
import json
import os
import select
import signal
import sys

from helpers import ROOT  # tests/, this script's folder, is sys.path[0]


def _preload():
    """Import what train.py / generate.py / data_tools import, in their order (cheap modules
    first, as a fresh interpreter would meet them)."""
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401

    import framework.cli  # noqa: F401
    import framework.config  # noqa: F401
    import framework.security.masking  # noqa: F401
    import framework.security.plugins  # noqa: F401
    import framework.runner  # noqa: F401
    import framework.models.build  # noqa: F401
    import framework.optimizer  # noqa: F401
    import framework.data  # noqa: F401
    import framework.tokenizer  # noqa: F401
    import framework.checkpoint  # noqa: F401
    import framework.training.data  # noqa: F401
    import framework.training.loop  # noqa: F401
    import framework.training.metrics  # noqa: F401
    import framework.inference  # noqa: F401
    import framework.generation  # noqa: F401
    import framework.interop  # noqa: F401
    import data_tools.convert  # noqa: F401
    import data_tools.preprocess  # noqa: F401
    import transformers  # noqa: F401


def _child(req, proto):
    """In the forked child: become the requested process, run it, exit (never returns)."""
    proto.close()
    if req.get("new_session"):
        os.setsid()
    os.chdir(req["cwd"])
    threads = req["env"].get("OMP_NUM_THREADS")
    if threads and threads != os.environ.get("OMP_NUM_THREADS"):  # torch read it at import
        import torch

        torch.set_num_threads(int(threads))
    os.environ.clear()
    os.environ.update(req["env"])
    if req.get("umask") is not None:
        os.umask(req["umask"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if os.environ.get("TRANSFORMERS_VERBOSITY"):  # read when transformers is imported
        import transformers

        transformers.utils.logging.set_verbosity(
            transformers.utils.logging.log_levels[os.environ["TRANSFORMERS_VERBOSITY"]])
    if os.environ.get("PYTHONWARNINGS"):  # read at start-up by a fresh interpreter
        import warnings

        warnings._processoptions(os.environ["PYTHONWARNINGS"].split(","))
    argv = req["argv"]
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        _run(argv, path, extra)
        code = 0
    except SystemExit as e:  # as the interpreter reads it
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        code = code or 0
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _leave(code)


def _run(argv, path, extra):
    import runpy

    if argv[0] == "-m":  # python -m mod args: sys.path[0] is the working directory
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
        sys.path[:] = [os.getcwd(), *extra, *path]
        sys.modules.pop(argv[1], None)  # preloaded here; a fresh interpreter runs it unimported
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":  # python -c code args
        sys.argv = ["-c", *argv[2:]]
        sys.path[:] = ["", *extra, *path]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:  # python script args: sys.path[0] is the script's folder
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *extra, *path]
        runpy.run_path(argv[0], run_name="__main__")


def _leave(code):
    """The interpreter's exit without its final teardown of every module, which in a forked
    child writes to (and so copies) most of the server's memory: wait for non-daemon threads,
    run the atexit handlers, flush every file object the child opened and C's stdio, exit."""
    import atexit
    import ctypes
    import gc
    import io
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for obj in gc.get_objects():  # what the child made: the server's objects are frozen
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed:
                    obj.flush()
            except Exception:
                pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    ctypes.CDLL(None).fflush(None)
    if code < 0:  # died of a signal, as an uncaught KeyboardInterrupt does
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _status(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _write_rc(path, rc, usage):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:  # the exit status, then the CPU seconds the process tree used
        f.write(f"{rc} {usage.ru_utime + usage.ru_stime:.3f}")
    os.replace(tmp, path)


def serve():
    # replies go to the original stdout; fd 1 joins stderr (the imports' warnings)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.path.insert(0, ROOT)
    _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    import gc

    gc.collect()
    gc.freeze()  # the children's collections skip (and so do not copy) the server's objects
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    proto.write(json.dumps({"ready": os.getpid(), "cpu": me.ru_utime + me.ru_stime}) + "\n")

    rc_files, pending = {}, b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        while rc_files:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _write_rc(rc_files.pop(pid), _status(status), usage)
        if not ready:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the test session ended
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(req, proto)  # exits, never returns
            rc_files[pid] = req["rc"]
            proto.write(json.dumps({"pid": pid}) + "\n")


if __name__ == "__main__":
    serve()
