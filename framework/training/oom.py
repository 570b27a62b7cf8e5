"""A training run that runs out of GPU memory ends with one line that says what to change.

torch's out-of-memory message says how much was asked for and how much was free, then a
traceback through megatron-core's schedules follows, which tells a user nothing about which
setting to turn. `oom_error` keeps torch's figures, names the step and phase (from the
watchdog's marks), and adds the levers of this run's config that apply to that phase, cheapest
first: the kept logits of the fused cross-entropy (on by default where they are small next to
the card, `fused_ce.keep_logits_auto`), sequence parallelism, recompute, the distributed
optimizer, the micro-batch, and TP/PP. Each lever is a set of overrides that the config accepts
together with the run's own (tests/test_oom.py composes them).
"""
from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from typing import Callable, List, Optional, Tuple

import torch

from framework.errors import ConfigError

# the watchdog's phases (framework/training/loop.py) in which activations for a backward are held
TRAINING_PHASES = ("forward/backward", "CUDA-graph capture", "train step")
_OOM_TEXT = re.compile(r"out of memory|ALLOC_FAILED", re.IGNORECASE)


def find_oom(exc: Optional[BaseException], _depth: int = 0) -> Optional[BaseException]:
    """The exception that says the device ran out of memory, in `exc` or what it wraps: torch's
    OutOfMemoryError or a RuntimeError that says so (cuBLAS/NCCL allocation failures, errors
    re-raised by torch.compile), through `__cause__` / `__context__` and a distributed
    checkpoint's per-rank `failures`; None if there is none."""
    if exc is None or _depth > 8:
        return None
    if isinstance(exc, torch.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and _OOM_TEXT.search(str(exc))):
        return exc
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict):
        for f in failures.values():
            inner = f[0] if isinstance(f, tuple) and f else f
            found = find_oom(inner, _depth + 1) if isinstance(inner, BaseException) else None
            if found is not None:
                return found
    return find_oom(exc.__cause__ or exc.__context__, _depth + 1)


def is_oom(exc: BaseException) -> bool:
    return find_oom(exc) is not None


@contextmanager
def reported_oom(make_error: Callable[[BaseException], ConfigError], world_size: int,
                 profiler=None, logger=None):
    """Run the body; if it runs out of memory, `make_error(the OOM exception)` becomes the
    one-line error (`end_after_oom`, then raised). Anything else passes through."""
    try:
        yield
    except BaseException as e:
        found = find_oom(e)
        if found is None:
            raise
        err = make_error(found)
        del e, found  # the failing step's tensors are referenced from its frames
        end_after_oom(err, profiler, logger, world_size)
        raise err from None


def kept_logits_bytes(cfg, padded_vocab: int, half: bool, device: torch.device,
                      is_last_stage: bool) -> Optional[int]:
    """Bytes of one micro-batch's logits that the fused cross-entropy keeps for backward on this
    rank, or None where it keeps none (not the last pipeline stage, megatron-core's output
    layer, `model.fused_ce_keep_logits=false`, or the auto rule's choice). Mirrors
    `fused_ce.linear_cross_entropy`: all of the micro-batch's tokens (sequence parallelism
    gathers them), the rank's vocab rows, the weight's dtype."""
    m = cfg.model
    if not is_last_stage or not m.fused_cross_entropy:
        return None
    from framework.fast.fused_ce import keeps_logits

    tokens = cfg.train.micro_batch_size * m.seq_length
    per_rank = padded_vocab // cfg.parallel.tensor_model_parallel_size
    itemsize = 2 if half else 4
    if not keeps_logits(m.fused_ce_keep_logits, tokens, per_rank, itemsize, device):
        return None
    return tokens * per_rank * itemsize


def size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def torch_figures(exc: BaseException) -> str:
    """The sentences of torch's message with the figures (what was asked for, the card's
    capacity, what was free, what this process holds and what is reserved but unallocated), on
    one line; the first sentence of any other error."""
    text = " ".join(str(exc).split())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", text)
    keys = ("out of memory", "Tried to allocate", "total capacity", "this process has",
            "reserved by PyTorch but unallocated", "ALLOC_FAILED")
    keep = [s for s in sentences if any(k.lower() in s.lower() for k in keys)]
    return " ".join(keep or sentences[:1]) or type(exc).__name__


Lever = Tuple[List[str], str]  # (overrides that go together, why)


def levers(cfg, kept: Optional[int], dp_size: int, phase: str = "forward/backward",
           torch_text: str = "") -> List[Lever]:
    """The settings that lower this run's memory in `phase`, cheapest first."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    training = phase.startswith(TRAINING_PHASES)
    out: List[Lever] = []
    if "expandable_segments" in torch_text:
        out.append(([], "the environment variable PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                        "(torch's advice when much memory is reserved but unallocated)"))
    if training and kept:
        how = "the auto rule" if m.fused_ce_keep_logits is None else \
            "model.fused_ce_keep_logits=true"
        out.append((["model.fused_ce_keep_logits=false"],
                    f"the output layer keeps {size_text(kept)} of logits per micro-batch, "
                    f"chosen by {how}"))
    if training and m.type == "gpt" and m.fused_cross_entropy is False:
        out.append((["model.fused_cross_entropy=true"],
                    "the fused output layer never holds the micro-batch's fp32 logits"))
    tp = p.tensor_model_parallel_size
    if tp > 1 and not p.sequence_parallel:
        out.append((["parallel.sequence_parallel=true"],
                    f"splits the norms' and dropouts' activations over the {tp} TP ranks"))
    fp8_act = m.fp8_fused_act
    full = ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform"]
    if list(p.recompute_modules or []) not in ([], ["core_attn"]):
        full.append("parallel.recompute_modules=[]")
    if m.cuda_graph:  # megatron-core's graphs of a layer exclude full recompute
        full.append("model.cuda_graph=false")
    if training and p.recompute_granularity is None:
        modules = "[layernorm]" if fp8_act else "[mlp_act]"
        out.append((["parallel.recompute_granularity=selective",
                     f"parallel.recompute_modules={modules}"],
                    "recomputes part of each layer in the backward"))
    if training and p.recompute_granularity != "full" and not fp8_act:
        out.append((full, "recomputes each layer in the backward"))
    if dp_size > 1 and not p.use_distributed_optimizer:
        out.append((["parallel.use_distributed_optimizer=true"],
                    f"shards the optimizer state over the {dp_size} data-parallel ranks"))
    if t.micro_batch_size > 1:
        mb = max(d for d in range(1, t.micro_batch_size) if t.micro_batch_size % d == 0)
        out.append(([f"train.micro_batch_size={mb}",
                     f"train.global_batch_size={t.global_batch_size}"],
                    "a smaller micro-batch; the same global batch by gradient accumulation"))
    out.append(([], "more parallel.tensor_model_parallel_size / pipeline_model_parallel_size"))
    return out


def lever_text(lever: Lever) -> str:
    overrides, why = lever
    return f"{' '.join(overrides)} ({why})" if overrides else why


def oom_error(exc: BaseException, cfg, *, step: int, phase: str, rank: int, padded_vocab: int,
              half: bool, device: torch.device, is_last_stage: bool, dp_size: int,
              done_steps: int = 0) -> ConfigError:
    """The one-line error for running out of memory (`exc`, from `find_oom`) at `step` in
    `phase` (the watchdog's last mark; in an evaluation its number is the eval batch, and
    `done_steps`, the training steps finished, names the step)."""
    if phase.startswith("evaluation"):
        phase, step = f"evaluation, eval batch {step}", done_steps
    kept = kept_logits_bytes(cfg, padded_vocab, half, device, is_last_stage)
    figures = torch_figures(exc)
    ways = levers(cfg, kept, dp_size, phase, str(exc))
    return ConfigError(
        f"out of memory on rank {rank} at step {step} ({phase}): {figures} To fit, try: "
        f"{'; '.join(lever_text(w) for w in ways)}")


def end_after_oom(err: ConfigError, profiler, logger, world_size: int) -> None:
    """What a rank does with the error `err` before it leaves: the profiler's trace and the
    metrics logger are closed (a memory profile of the failing step is what a user wants next);
    with more than one rank, the line is printed here and the process ends (exit 2, which the
    launcher reports as "stopped on the error printed above"), because the graceful teardown
    would wait for collectives the other ranks never join. One rank returns, and the caller
    raises `err` as any input error."""
    import os
    import sys

    # (exit code 2: W&B marks the run failed, as the process's exit code says)
    for close in (profiler and profiler.finish,
                  logger and functools.partial(logger.close, exit_code=2)):
        try:
            if close:
                close()
        except Exception:  # noqa: BLE001 - the error line matters more than a trace or a log
            pass
    if world_size > 1:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)


def generation_oom_error(exc: BaseException, cfg, *, rank: int, prompts: int,
                         longest_prompt: int, max_new_tokens: Optional[int]) -> ConfigError:
    """The one-line error for running out of memory (`exc`, from `find_oom`) while generate.py
    decodes a batch of `prompts` prompts (the longest `longest_prompt` tokens): torch's figures
    and generate.py's levers (`cfg`: framework.inference.GenerateConfig), cheapest first. The KV
    cache and the logits grow with the batch x beams and the tokens."""
    ways = []
    rows = prompts * max(1, cfg.num_beams)
    if prompts > 1:
        ways.append(f"batch_size={max(1, prompts // 2)} (this batch: {prompts} prompts, {rows} "
                    f"rows with the beams)")
    if cfg.num_beams > 1:
        ways.append(f"fewer num_beams (now {cfg.num_beams}: each beam is a row)")
    total = longest_prompt + (max_new_tokens or 0)
    ways.append(f"a smaller max_new_tokens (the cache holds up to {total} tokens a row)"
                if max_new_tokens else "max_new_tokens=N (null decodes until the context is "
                                       "full, and the cache grows to it)")
    ways.append("more TP (parallel.tensor_model_parallel_size)")
    return ConfigError(
        f"out of memory on rank {rank} generating {prompts} prompts of up to {longest_prompt} "
        f"tokens: {torch_figures(exc)} To fit, try: {'; '.join(ways)}")
