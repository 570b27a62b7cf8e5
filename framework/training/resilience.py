"""Keeping a long run alive and its checkpoints sound.

* `StopRequest`: SIGTERM / SIGUSR1 on any rank, or the `train.max_minutes` wall-clock budget,
  becomes a flag that every rank agrees on (one tiny all-reduce per step, read one step later when
  step stats are deferred); the loop then saves a checkpoint and returns, and the process exits 0.
* `guarded_optimizer_step`: mcore's optimizer step, split so that a non-finite loss or grad norm is
  seen *before* the update; `deferred_optimizer_step` does the same on the device, so that the
  host reads a step's loss and grad norm later and never waits for the GPU between steps.
  `NanGuard` applies `train.nan_policy` (skip | stop) and `train.max_consecutive_nan`;
  `SpikeDetector` warns when the loss jumps above `train.spike_factor` x its running mean.
* `Watchdog`: a thread that reports which rank is stuck in which phase of which step when nothing
  moves for longer than the collective timeout, then ends the process.
* `prune_checkpoints` / `remove_stale_tmp`: `checkpoint.keep_last` retention and the clean-up of
  `iter_*.tmp` directories left by a save that was killed.
"""
from __future__ import annotations

import faulthandler
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from framework.config import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SAVE_PATIENCE = 6.0  # a checkpoint save may take this many watchdog timeouts
STOP_FILE_ENV = "FW_STOP_FILE"  # set by the self-launching parent: rank 0 reports a clean stop


class NonFiniteError(ConfigError):
    """The run met more non-finite steps than the policy allows (reported as one line)."""


# --------------------------------------------------------------------------------------------
# stop requests: signals and the wall-clock budget
# --------------------------------------------------------------------------------------------
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


class HostCopy:
    """A device tensor's values, copied to pinned host memory behind the work queued so far;
    `read()` waits for that copy only, not for work queued after it."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


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


# --------------------------------------------------------------------------------------------
# non-finite values and spikes
# --------------------------------------------------------------------------------------------
def guarded_optimizer_step(optimizer, loss: float):
    """mcore's `optimizer.step()` with the finiteness checks moved before the update.

    Returns (updated, grad_norm, non_finite). fp16 overflow (mcore's grad scaler found inf) is an
    ordinary skipped step, not a non-finite one: the scaler lowers the scale and training goes on.
    """
    if not math.isfinite(loss):
        return False, None, True
    if optimizer.prepare_grads():  # fp16: unscaled, found inf/nan, scaler updated
        return False, None, False
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return False, norm, True
    # clip by the norm just computed (mcore's clip_grad_norm would compute it a second time);
    # a ChainedOptimizer clips every member by the one total norm, as its own step() does
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in _members(optimizer):
        params = opt.get_parameters()
        if not params or opt.config.clip_grad <= 0.0:
            continue
        if hasattr(opt, "clip_grads_by_norm"):  # our CPU optimizer
            opt.clip_grads_by_norm(norm)
        else:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm, False


def _members(optimizer) -> list:
    """The optimizers that own parameters: a ChainedOptimizer's members, or the optimizer."""
    return [o for o in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
            if not getattr(o, "is_stub_optimizer", False)]


def deferred_step_supported(optimizer) -> bool:
    """Whether `deferred_optimizer_step` can run this optimizer: no loss scaler (fp16 must read its
    overflow flag on the host every step), mcore's plain grads (not the precision-aware
    optimizer's decoupled ones), and torch's fused Adam/SGD kernels, which skip an update on a
    device-side `found_inf` flag."""
    for opt in _members(optimizer):
        if getattr(opt, "grad_scaler", None) is not None:
            return False
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            return False
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
            return False
        if not all(g.get("fused") for g in inner.param_groups):
            return False
    return True


def grad_norm_tensor(optimizer) -> torch.Tensor:
    """The global L2 norm of the main grads as a 1-element float64 tensor on their device, with no
    host synchronisation. The same grads, reduction groups and arithmetic as mcore's
    `get_grad_norm` with the foreach kernels (framework/fast/multi_tensor.py): the fp32 sum of
    squares, summed over the grad-stats group, square-rooted in double precision (mcore does
    that on the host), so both give the same number."""
    members = _members(optimizer)
    if len(members) <= 1 or optimizer.grads_states_parallel_group_is_shared():
        parts = [([g for o in members for g in o.get_main_grads_for_grad_norm()],
                  optimizer.get_grad_stats_parallel_group())]
    else:
        parts = [(o.get_main_grads_for_grad_norm(), o.get_grad_stats_parallel_group())
                 for o in members]
    device = next((g.device for grads, _ in parts for g in grads), None)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for grads, group in parts:
        if grads:
            from framework.fast.multi_tensor import foreach_l2norm

            sq = foreach_l2norm(0, None, [grads], False)[0] ** 2
        else:
            sq = torch.zeros(1, dtype=torch.float32, device=device)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        total += sq
    return total.sqrt()


def deferred_optimizer_step(optimizer, loss: torch.Tensor) -> torch.Tensor:
    """`guarded_optimizer_step` without a host synchronisation.

    The finiteness test, the clipping coefficient and the skip all stay on the device: a
    non-finite loss or grad norm sets the fused kernel's `found_inf`, which leaves the weights and
    the optimizer state (its step count included) untouched, as the guarded step's early return
    does. The norm and the clipping are computed as the guarded step computes them, so both
    give the same update. Returns a float64 device tensor [updated, grad_norm, non_finite] for
    the host to read later; needs `deferred_step_supported(optimizer)`.
    """
    optimizer.prepare_grads()  # no loss scaler: copies the model grads to the main grads
    norm = grad_norm_tensor(optimizer)
    finite = (torch.isfinite(loss.detach().reshape(1).to(norm.device)) & torch.isfinite(norm))
    skip = (~finite).to(torch.float32)
    members = _members(optimizer)
    for opt in members:
        if opt.config.clip_grad > 0.0:
            grads = [p.grad for p in opt.get_parameters() if p.grad is not None]
            if grads:
                # clip / (norm + eps) in double, as the host computes it; multiplying by exactly
                # 1 when it is not below 1 leaves the grads as the guarded step does
                coeff = (opt.config.clip_grad / (norm + 1.0e-6)).clamp(max=1.0)
                coeff = torch.where(finite, coeff, torch.ones_like(coeff)).to(grads[0].dtype)
                torch._foreach_mul_(grads, coeff.reshape(()))
        opt.optimizer.found_inf = skip.reshape(())  # torch's fused kernels take a 0-dim flag
    try:
        optimizer.step_with_ready_grads()
    finally:
        for opt in members:
            del opt.optimizer.found_inf
    return torch.cat([finite.double(), norm, skip.double()])


class NanGuard:
    def __init__(self, policy: str = "skip", max_consecutive: int = 10):
        self.policy, self.max_consecutive = policy, max_consecutive
        self.consecutive = 0

    def check(self, step: int, non_finite: bool, loss: float, grad_norm) -> Optional[str]:
        """A warning line for a skipped step; raises NonFiniteError when the run must stop."""
        if not non_finite:
            self.consecutive = 0
            return None
        self.consecutive += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"grad norm {grad_norm}"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at iteration {step} (train.nan_policy=stop)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"non-finite {what} at iteration {step}: {self.consecutive} consecutive "
                f"non-finite steps (train.max_consecutive_nan={self.max_consecutive})")
        return f"warning: non-finite {what} at iteration {step}; update skipped"


class SpikeDetector:
    """Loss > factor x exponential running mean (after `warmup` steps) is a spike."""

    def __init__(self, factor: Optional[float], warmup: int = 10, beta: float = 0.9):
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self.mean: Optional[float] = None
        self.seen = 0
        self.spikes = 0

    def check(self, step: int, loss: float) -> Optional[str]:
        if self.factor is None or not math.isfinite(loss):
            return None
        msg = None
        if self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean:
            self.spikes += 1
            msg = (f"warning: loss spike at iteration {step}: {loss:.4f} > {self.factor} x running "
                   f"mean {self.mean:.4f} ({self.spikes} so far)")
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return msg


# --------------------------------------------------------------------------------------------
# hang watchdog
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# checkpoint retention
# --------------------------------------------------------------------------------------------
_ITER = re.compile(r"^iter_(\d+)$")
_TMP = re.compile(r"^iter_\d+\.tmp")


# set by preflight to the checkpoint whose checksums it verified; the workers it launches (they
# inherit the environment) then check sizes only
VERIFIED_ENV = "FW_VERIFIED_CHECKPOINT"


def remove_stale_tmp(ckpt_dir: str) -> List[str]:
    """Delete `iter_*.tmp*` directories (left by a save that was killed). Rank 0, before a save."""
    removed = []
    if not os.path.isdir(ckpt_dir):
        return removed
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if _TMP.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_checkpoints(ckpt_dir: str, keep_last: Optional[int]) -> List[str]:
    """Keep the newest `keep_last` committed checkpoints (and always the tracker's). Rank 0,
    after the tracker names the newest one."""
    from framework.training.checkpoint import latest_iteration

    if keep_last is None or not os.path.isdir(ckpt_dir):
        return []
    latest = latest_iteration(ckpt_dir)
    if latest is None:
        return []
    iters = sorted(int(m.group(1)) for m in map(_ITER.match, os.listdir(ckpt_dir)) if m)
    keep = set(i for i in iters if i <= latest)
    keep = set(sorted(keep)[-keep_last:]) | {latest}
    removed = []
    for it in iters:
        if it not in keep and it < latest:
            path = os.path.join(ckpt_dir, f"iter_{it:07d}")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# input checks before any worker starts
# --------------------------------------------------------------------------------------------
def preflight(cfg, device: str = "cpu") -> None:
    """Check checkpoints, tokenizer, data files, the model settings and every directory the run
    writes in the launching process, so that bad input is one line from the parent (not a failure
    inside every self-launched worker) and nothing on disk is touched. The workers repeat the
    cheap parts; the token-id scan is cached."""
    from framework.training import checkpoint as ckpt
    from framework.training.data import load_run_tokenizer

    c = cfg.checkpoint
    links = c.allow_symlinks
    # a bad tracker, a damaged framework.json or a symlink in the checkpoint is an error here
    load_dir, it, resuming = ckpt.load_target(c)
    resume_it = it if resuming else None
    if load_dir:
        meta = ckpt.read_meta(load_dir, it, allow_symlinks=links)
        ckpt.check_compatible(meta, cfg.model, ckpt.iter_dir(load_dir, it))
        # the files against the manifest, one line here before any worker starts. A self-launch
        # (or one process) checks the checksums here and its workers only the sizes; under
        # torchrun/SLURM every rank runs this, so here sizes only and the ranks share the
        # checksums when they load
        from framework.run import launched_externally

        path = ckpt.iter_dir(load_dir, it)
        full = c.verify and not launched_externally()
        ckpt.verify_checkpoint(path, it, meta, checksums=full, allow_symlinks=links,
                               search_checksums=c.verify, collective=False)
        if full:
            os.environ[VERIFIED_ENV] = path
    tokenizer = load_run_tokenizer(cfg.data, cfg.tokenizer, load_dir,
                                   c.load_hf if resume_it is None else None, iteration=it,
                                   model_type=cfg.model.type, allow_symlinks=links)
    if cfg.model.type in ("bert", "t5"):  # a missing [MASK]/[CLS]/sentinel: one line, here
        from framework.data import masked_lm_tokenizer

        masked_lm_tokenizer(tokenizer, cfg.model.type, seq_length=cfg.model.seq_length,
                            masking_probability=cfg.data.masking_probability)
    check_model(cfg, tokenizer.vocab_size, device)
    if cfg.data.type == "indexed":
        from framework.data import _index_cache_dir, _parse_blend, check_indexed

        prefixes, _weights = _parse_blend(cfg.data.path)
        for prefix in prefixes:  # the files first, before a cache folder is made beside them
            check_indexed(prefix)
        cache = _index_cache_dir(cfg.data, prefixes[0])
        for prefix in prefixes:
            check_indexed(prefix, tokenizer.vocab_size, cache_dir=cache)
    check_output_dirs(cfg)  # last: nothing above leaves anything behind when it fails


def output_dirs(cfg) -> List[tuple]:
    """(directory, what) for every directory the run writes into."""
    from framework.data import default_cache_root

    dirs = [(cfg.run_dir, "the run directory (hydra.run.dir)")]
    if cfg.checkpoint.save or cfg.logging.wandb:  # W&B keeps its run id beside the checkpoints
        dirs.append((cfg.checkpoint.dir, "checkpoint.dir"))
    if cfg.data.path_to_cache is not None:
        dirs.append((cfg.data.path_to_cache, "data.path_to_cache"))
    elif cfg.data.type == "embedded":
        dirs.append((default_cache_root(), "the data cache (data.path_to_cache unset)"))
    return dirs


def check_output_dirs(cfg) -> None:
    for path, what in output_dirs(cfg):
        if path is None:
            continue
        problem = unwritable_dir(path)
        if problem:
            raise ConfigError(f"{what}={path}: {problem}")


def unwritable_dir(path: str) -> Optional[str]:
    """None when `path` is a writable directory or can be created as one; else why not. Probes by
    creating (and removing) a temporary file or directory: permission bits do not tell (root,
    read-only mounts, /proc), and nothing is left behind."""
    import tempfile

    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        if os.path.islink(probe):
            return f"{probe} is a symbolic link to a missing target"
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
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


def check_model(cfg, tokenizer_vocab: int, device: str) -> None:
    """Settings only megatron-core checks (its TransformerConfig, built here without a model),
    the model family, the vocabulary against the tokenizer, and memory: the weights and gradients
    alone, plus one micro-batch's layer inputs, must fit the device."""
    from framework.models import MODEL_BUILDERS, padded_vocab_size
    from framework.models.gpt import transformer_config

    m, p = cfg.model, cfg.parallel
    if m.type not in MODEL_BUILDERS:
        raise ConfigError(f"model.type={m.type!r} is not one of {sorted(MODEL_BUILDERS)}")
    if m.vocab_size is not None and m.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab} tokens); leave it null to use that")
    on_gpu = device == "cuda"
    bf16 = (on_gpu if cfg.train.bf16 is None else cfg.train.bf16) and not cfg.train.fp16
    try:
        transformer_config(m, p, bf16=bf16, fp16=cfg.train.fp16, on_gpu=on_gpu)
    except (ValueError, AssertionError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"megatron-core refuses the model/parallel settings: {msg}") from None
    vocab = padded_vocab_size(m.vocab_size or tokenizer_vocab, m.make_vocab_size_divisible_by,
                              p.tensor_model_parallel_size)
    need, params = min_memory_bytes(cfg, vocab, bf16 or cfg.train.fp16)
    have, where = device_memory_bytes(device, p.model_parallel_size * (p.data_parallel_size or 1))
    if have and need > have:
        raise ConfigError(
            f"the model needs at least {need / 2**30:.1f} GiB per rank ({params / 1e9:.2f}B "
            f"parameters: weights and gradients / (TP x PP), plus one micro-batch of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} layer inputs), more than the "
            f"{have / 2**30:.1f} GiB {where}; use smaller model sizes or micro-batch, or more "
            f"TP/PP")


def min_memory_bytes(cfg, vocab: int, half: bool) -> tuple:
    """(bytes, parameters): a lower bound of one rank's training memory. Weights and their
    gradients (2 + 2 bytes each in bf16/fp16, 4 + 4 in fp32) split over TP x PP, plus the input
    of every layer of one micro-batch (split over TP only with sequence parallelism). Optimizer
    state, master weights and the other activations come on top, so a config above it cannot
    run."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    h, kv = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attn = h * kv * (m.num_attention_heads + 2 * groups) + m.num_attention_heads * kv * h
    mlp = h * m.ffn * (3 if m.activation in ("swiglu", "geglu_tanh") else 2)
    layers = m.num_layers + (m.enc_layers if m.type == "t5" else 0)
    params = layers * (attn + mlp) + vocab * h
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    elt = 2 if half else 4
    weights = params * 2 * elt / (tp * pp)
    seq = m.seq_length + (m.decoder_seq_length or 0)
    acts = t.micro_batch_size * seq * h * (layers / pp) * elt / (tp if p.sequence_parallel else 1)
    return weights + acts, params


def device_memory_bytes(device: str, world: int) -> tuple:
    """(bytes one rank can have, where); (0, '') when unknown."""
    try:
        if device == "cuda":  # this rank's GPU (the properties need no CUDA context)
            props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
            return props.total_memory, f"of {props.name}"
        import psutil

        total = psutil.virtual_memory().total
        return total / world, f"of host memory per worker ({total / 2**30:.0f} GiB / {world})"
    except Exception:  # no such information here: skip the check
        return 0, ""
