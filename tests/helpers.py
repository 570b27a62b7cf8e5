"""What the test files share: the repository root, the one way to run `train.py` (and the other
entry points) as a process, metrics readers, free ports, and two-process launches.

Processes come from a warm server (tests/zygote.py) that has imported torch, megatron-core and
the framework once and forks each process from there: the same program, arguments, working
directory, environment, exit code and output as `subprocess`, without paying the imports again
(they dominated the CPU suite's time). Where CUDA is visible (the GPU suite), or with
FW_TEST_ZYGOTE=0, or with `fresh=True` (a test about start-up itself), each process is a fresh
interpreter (`subprocess.Popen`).
"""
import atexit
import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
GENERATE = os.path.join(ROOT, "generate.py")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list:
    """n distinct ports free now (held open together, so none repeats); a test that opens
    several process groups one after another takes one each, not `port + i`, which another
    process may hold."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
# environment variables that the modules the server has imported read at import time (the
# server applies OMP_NUM_THREADS, PYTHONPATH, PYTHONWARNINGS and TRANSFORMERS_VERBOSITY itself):
# a process asked for with another value of one of these is a fresh interpreter
_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_LOGS", "TORCH_CPP_LOG_LEVEL",
                   "MKL_", "TRITON_", "PYTHON")
_APPLIED = ("OMP_NUM_THREADS", "PYTHONPATH", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")
FRESH_STARTS = []  # (argv[0], the variables that made a process fresh) for the timing report


def _zygote_wanted(argv, env) -> bool:
    if os.environ.get("FW_TEST_ZYGOTE", "1") == "0" or not hasattr(os, "fork"):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    base = _ZYGOTE.env if _ZYGOTE is not None else os.environ
    changed = sorted(k for k in set(env) | set(base) if env.get(k) != base.get(k)
                     and k.startswith(_READ_AT_IMPORT) and k not in _APPLIED)
    if changed:
        FRESH_STARTS.append((argv[0], changed))
    return not changed


class _Zygote:
    """Client of tests/zygote.py: one per test process (each pytest-xdist worker has its own)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fw-zygote-")
        self.count = 0
        self.lock = threading.Lock()  # tests may start processes from several threads
        self.log = open(os.path.join(self.dir, "zygote.log"), "w+")
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, cwd=ROOT)
        ready = self.proc.stdout.readline()
        if not ready:
            self.log.seek(0)
            raise RuntimeError("tests/zygote.py did not start:\n" + self.log.read()[-3000:])
        global FORKED_CPU
        FORKED_CPU += json.loads(ready)["cpu"]  # its imports, paid once
        atexit.register(self.close)

    def start(self, argv, cwd, env, new_session, umask):
        with self.lock:
            self.count += 1
            base = os.path.join(self.dir, f"p{self.count}")
            req = dict(argv=argv, cwd=str(cwd), env=env, new_session=new_session, umask=umask,
                       stdout=base + ".out", stderr=base + ".err", rc=base + ".rc")
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("tests/zygote.py has stopped")
        return json.loads(reply)["pid"], req

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)  # the processes' output files


_ZYGOTE = None
_ZYGOTE_LOCK = threading.Lock()
FORKED_CPU = 0.0  # CPU seconds of the finished forked processes (their own rusage is elsewhere)


def _zygote():
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
            _ZYGOTE = _Zygote()
        return _ZYGOTE


class Proc:
    """A started process, as `subprocess.Popen` with stdout/stderr piped and text=True: pid,
    args, returncode, poll(), wait(), communicate(), send_signal(), kill()."""

    def __init__(self, argv, cwd, env, new_session=False, umask=None, fresh=False):
        self.args = [sys.executable, *argv]
        self.returncode = None
        if fresh or not _zygote_wanted(argv, env):
            self._popen = subprocess.Popen(self.args, cwd=cwd, env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           start_new_session=new_session,
                                           umask=-1 if umask is None else umask)
            self.pid = self._popen.pid
        else:
            self._popen = None
            self.pid, self._req = _zygote().start(argv, cwd, env, new_session, umask)

    def poll(self):
        global FORKED_CPU
        if self._popen is not None:
            self.returncode = self._popen.poll()
        elif self.returncode is None and os.path.exists(self._req["rc"]):
            rc, cpu = open(self._req["rc"]).read().split()
            self.returncode = int(rc)
            FORKED_CPU += float(cpu)
        return self.returncode

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self._popen is not None:
                self._popen.wait(timeout=None if end is None else max(0, end - time.monotonic()))
            else:
                time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout=None):
        if self._popen is not None:
            out, err = self._popen.communicate(timeout=timeout)
            self.returncode = self._popen.returncode
            return out, err
        self.wait(timeout)
        read = lambda p: open(p, encoding="utf-8", errors="replace").read()  # noqa: E731
        return read(self._req["stdout"]), read(self._req["stderr"])

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it exited between the poll and the kill
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)


def start(*argv, cwd=ROOT, env=None, new_session=False, umask=None, fresh=False) -> Proc:
    """Start `python *argv` (a script path, or "-m", module, or "-c", code, then arguments).
    `env` is the whole environment (default: this one)."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTEST_CURRENT_TEST", None)
    return Proc([str(a) for a in argv], cwd, env, new_session, umask, fresh)


def run(*argv, cwd=ROOT, env=None, timeout=600, umask=None, fresh=False):
    """`python *argv` to completion: a subprocess.CompletedProcess (text stdout, stderr)."""
    p = start(*argv, cwd=cwd, env=env, umask=umask, fresh=fresh)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --------------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------------
# a small, quick CPU run; tests add or override what they check
FAST = ["train.device=cpu", "train.progress_bar=false", "train.log_interval=1",
        "train.micro_batch_size=8", "train.global_batch_size=16", "train.eval_iters=2"]


class TrainRun(subprocess.CompletedProcess):
    """A finished train.py: returncode, stdout, stderr, run_dir, records (metrics.jsonl)."""

    def __init__(self, args, returncode, stdout, stderr, run_dir):
        super().__init__(args, returncode, stdout, stderr)
        self.run_dir = run_dir

    @property
    def records(self):
        return read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))

    @property
    def losses(self):
        return losses(self.records)


def _train_argv(overrides, cwd, name, fast):
    overrides = [str(o) for o in overrides]
    flags = [o for o in overrides if o in ("-m", "--multirun")]  # before any override
    rest = [o for o in overrides if o not in flags]
    argv = [TRAIN, *flags, *(FAST if fast else []), *rest]
    run_dir = None
    if name is not None:
        run_dir = os.path.join(str(cwd), name)
        argv.append(f"hydra.run.dir={run_dir}")
    return argv, run_dir


def run_train(*overrides, cwd, name="run", fast=True, expect=0, env=None, timeout=600,
              umask=None, fresh=False) -> TrainRun:
    """`python train.py [FAST] *overrides hydra.run.dir=<cwd>/<name>` in `cwd`; asserts the exit
    code is `expect` (None: any). `fast=False` leaves FAST out; `name=None` leaves
    hydra.run.dir to the overrides (or Hydra's default)."""
    argv, run_dir = _train_argv(overrides, cwd, name, fast)
    r = run(*argv, cwd=cwd, env=env, timeout=timeout, umask=umask, fresh=fresh)
    if expect is not None:
        assert r.returncode == expect, (f"exit {r.returncode}, expected {expect}\n"
                                        + r.stdout[-3000:] + r.stderr[-5000:])
    return TrainRun(r.args, r.returncode, r.stdout, r.stderr, run_dir)


def start_train(*overrides, cwd, name="run", fast=True, env=None, new_session=False,
                fresh=False) -> Proc:
    """run_train's command, started in the background (a Popen-like Proc); its run dir is
    <cwd>/<name> as `proc.run_dir`."""
    argv, run_dir = _train_argv(overrides, cwd, name, fast)
    p = start(*argv, cwd=cwd, env=env, new_session=new_session, fresh=fresh)
    p.run_dir = run_dir
    return p


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def losses(records):
    """{step: loss} of the training records."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# --------------------------------------------------------------------------------------------
# two or more ranks of a test function, or of a worker script
# --------------------------------------------------------------------------------------------
_CALL = """import pickle, sys
sys.path[:0] = {path!r}
fn, rank, args = pickle.load(open({blob!r}, "rb"))
fn(rank, *args)
"""


def spawn(fn, args=(), nprocs=2, timeout=600, env=None):
    """As `torch.multiprocessing.spawn(fn, args, nprocs)`: fn(rank, *args) in `nprocs` processes
    (forked from the warm server where there is one); fails with the ranks' output if any rank
    fails. `fn` must be a module-level function of an importable module (e.g. a test file)."""
    tmp = tempfile.mkdtemp(prefix="fw-spawn-")
    try:
        procs = []
        for rank in range(nprocs):
            blob = os.path.join(tmp, f"rank{rank}.pkl")
            with open(blob, "wb") as f:
                pickle.dump((fn, rank, tuple(args)), f)
            code = _CALL.format(path=[p for p in sys.path if p], blob=blob)
            procs.append(start("-c", code, cwd=os.getcwd(), env=env))
        _join(procs, timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch_ranks(nprocs, *argv, timeout=600, env=None, cwd=ROOT):
    """`torchrun --nproc-per-node=nprocs *argv` without the agent: each rank gets RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Returns rank 0's stdout."""
    base = dict(os.environ if env is None else env, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs))
    procs = [start(*argv, cwd=cwd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(nprocs)]
    return _join(procs, timeout)[0][0]


def _join(procs, timeout):
    end, late = time.monotonic() + timeout, False
    while any(p.poll() is None for p in procs):
        late = late or time.monotonic() > end
        if late or any(p.returncode not in (None, 0) for p in procs):
            for p in procs:  # one rank failed or hangs: the others would wait forever
                p.kill()
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    if late or any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- rank {i}: exit {p.returncode}\n{o[0][-2000:]}{o[1][-4000:]}"
                           for i, (p, o) in enumerate(zip(procs, outs)))
        raise AssertionError(("timed out" if late else "a rank failed") + "\n" + report)
    return outs


# --------------------------------------------------------------------------------------------
# configs composed as train.py composes them
# --------------------------------------------------------------------------------------------
def load_config(*overrides):
    """The typed Config of `train.py <overrides>` (the caller has registered the schemas and
    resolvers: framework.config.register_configs, framework.cli.register_resolvers)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        d = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_object(d)


def config_error(*overrides) -> str:
    """The one-line ConfigError that composing `overrides` raises (found through the causes
    Hydra wraps it in)."""
    import pytest

    with pytest.raises(Exception) as e:
        load_config(*overrides)
    return one_line_config_error(e.value)


def one_line_config_error(exc: BaseException) -> str:
    """The ConfigError in `exc`'s chain of causes (Hydra wraps it), asserted to be one line."""
    from framework.config import ConfigError

    err = exc
    while not isinstance(err, ConfigError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    assert isinstance(err, ConfigError), repr(exc)
    assert "\n" not in str(err)
    return str(err)


# --------------------------------------------------------------------------------------------
# checkpoints converted from HF (data_tools.convert), run on CPU in fp32
# --------------------------------------------------------------------------------------------
def checkpoint_model_cfg(ckpt_dir):
    """(ModelConfig, meta) that a checkpoint folder (or one iteration of it) stores."""
    from framework.checkpoint import stored_model_config
    from framework.interop.megatron_files import resolve_checkpoint

    _root, _it, path, meta = resolve_checkpoint(str(ckpt_dir))
    return stored_model_config(meta, path), meta


def build_cpu(model_cfg, padded, tp=1, pp=1):
    """The model chunks of `model_cfg` (vocab padded to `padded`) at TP `tp` x PP `pp`: CPU,
    fp32, no DDP, in eval mode. The caller has initialised the model-parallel state."""
    import torch

    from framework.config import ParallelConfig
    from framework.models.build import build_model

    chunks = build_model(model_cfg, ParallelConfig(tensor_model_parallel_size=tp,
                                                   pipeline_model_parallel_size=pp),
                         vocab_size=padded, bf16=False, fp16=False, device=torch.device("cpu"),
                         wrap_ddp=False)
    for c in chunks:
        c.eval()
    return chunks


def load_weights(ckpt_dir, chunks, model_cfg):
    """The model weights of checkpoint `ckpt_dir` into `chunks` (no optimizer state)."""
    from framework.checkpoint import load_checkpoint

    load_checkpoint(str(ckpt_dir), chunks, None, None, model_cfg=model_cfg, with_optimizer=False)


def gather_vocab(logits, vocab):
    """`logits` [..., V/tp] with the tensor-parallel vocab shards gathered (a collective: every
    TP rank calls it) and the padding stripped to `vocab`."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab]


def gpt_logits(chunk, tokens, vocab):
    """A GPT model chunk's logits [b, s, vocab] for `tokens` [b, s] (positions 0..s-1), without
    autograd: TP vocab shards gathered, padding stripped."""
    import torch

    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        out = chunk(tokens, pos, None)
    return gather_vocab(out, vocab)


def tp1_output(ckpt_dir, padded, forward, **cfg_changes):
    """`forward(chunk)` of the checkpoint in `ckpt_dir` loaded into a TP1 model of vocab
    `padded` (its stored model config with `cfg_changes`), in a one-process world of its own."""
    from dataclasses import replace

    from data_tools import convert

    model_cfg, _meta = checkpoint_model_cfg(ckpt_dir)
    if cfg_changes:
        model_cfg = replace(model_cfg, **cfg_changes)
    with convert.single_process_world():
        chunks = build_cpu(model_cfg, padded)
        load_weights(ckpt_dir, chunks, model_cfg)
        return forward(chunks[0])


def pipeline2_forward(chunk, first, peer, hidden_shape, *inputs, **kw):
    """One forward step of a two-stage pipeline by hand (megatron-core's schedules need CUDA),
    without autograd: the first stage sends `chunk(*inputs, **kw)` (its hidden state,
    `hidden_shape`) to rank `peer` and returns None; the last stage receives it from `peer` as
    its input tensor and returns `chunk(*inputs, **kw)`."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        if first:
            dist.send(chunk(*inputs, **kw).contiguous(), dst=peer)
            return None
        hidden = torch.empty(*hidden_shape)
        dist.recv(hidden, src=peer)
        chunk.set_input_tensor(hidden)
        return chunk(*inputs, **kw)


@contextlib.contextmanager
def gloo_world(rank=0, world_size=1, tp=None, pp=1, vpp=None, port=None):
    """Rank `rank` of a CPU gloo world of `world_size` processes (MASTER_ADDR/MASTER_PORT set,
    `port` or a free one); with `tp`, megatron-core's model-parallel state at TP `tp`, PP `pp`
    (virtual `vpp`) too. On the way out, the model-parallel state and the group are destroyed."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if tp is not None:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         virtual_pipeline_model_parallel_size=vpp)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def gloo_rank(rank, port, world_size=2):
    """`gloo_world` for a `spawn`ed test worker, with CUDA hidden (a CPU test, also on a machine
    with GPUs); the worker initialises the model-parallel state it needs."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return gloo_world(rank, world_size, port=port)


def read_safetensors(path):
    """{name: tensor} of every *.safetensors file in the folder `path`."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_same_tensors(a, b, what=None):
    """HF folders `a` and `b` hold the same tensor names, each bit-identical with its dtype;
    returns b's tensors."""
    import torch

    ta, tb = read_safetensors(a), read_safetensors(b)
    assert sorted(ta) == sorted(tb), what
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), \
            k if what is None else (what, k)
    return tb


def assert_same_hf(a, b, config_keys):
    """assert_same_tensors, and config.json agrees at `config_keys`; returns b's (tensors,
    config)."""
    tb = assert_same_tensors(a, b)
    ca, cb = (json.load(open(os.path.join(p, "config.json"))) for p in (a, b))
    for k in config_keys:
        assert ca.get(k) == cb.get(k), (k, ca.get(k), cb.get(k))
    return tb, cb


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def left_padded(prompts, pad):
    """(ids, attention mask) [n, longest] of token-id lists, left-padded with `pad`."""
    import torch

    s = max(map(len, prompts))
    ids = torch.full((len(prompts), s), pad)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    return ids, mask


def interpret_triton(code: str):
    """Run `code` in a fresh interpreter with Triton's CPU interpreter (TRITON_INTERPRET=1):
    the Triton kernels' arithmetic checked without a GPU. The CPU wheel of torch does not bring
    Triton; the `test` extra does (Linux x86-64), so CI runs these. Skipped where it is missing;
    the GPU suite runs the same kernels compiled."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton to run this on CPU)")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = run("-c", code, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def save_tiny_hf_gpt2(path) -> None:
    """A tiny Hugging Face GPT-2 (2 layers, hidden 32, vocab 101), seeded, saved to `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=101,
                               n_positions=40)).save_pretrained(path)


def save_tiny_gpt_checkpoint(path: str, **model_kw) -> str:
    """A tiny untrained GPT checkpoint (iteration 1) of a data=embedded run, with its tokenizer,
    saved from the current process's world (a gloo world with megatron-core's model-parallel
    state at TP1, e.g. the `mp1` fixture or `gloo_world(tp=1)`); returns `path`."""
    from dataclasses import asdict

    import torch

    from framework.checkpoint import save_checkpoint
    from framework.config import Config, DataConfig, ModelConfig, ParallelConfig
    from framework.models.build import build_model
    from framework.tokenizer import embedded_tokenizer

    cfg = Config(model=ModelConfig(**model_kw), data=DataConfig(type="embedded"))
    torch.manual_seed(0)
    model = build_model(cfg.model, ParallelConfig(), vocab_size=24, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)
    save_checkpoint(path, 1, model, None, None, consumed_samples=0, config=asdict(cfg),
                    tokenizer=embedded_tokenizer())
    return path
