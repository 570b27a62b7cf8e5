"""A training run that runs out of GPU memory ends with one line that says what to change.

torch's out-of-memory message says how much was asked for and how much was free, then a
traceback through megatron-core's schedules follows, which tells a user nothing about which
setting to turn. `oom_error` keeps torch's figures and adds the levers of this run's config, in
the order that costs the least speed: the kept logits of the fused cross-entropy (on by default
where they are small next to the card, `fused_ce.keep_logits_auto`), then recompute, the
distributed optimizer, the micro-batch, and TP/PP.
"""
from __future__ import annotations

import re
from typing import List, Optional

import torch

from framework.errors import ConfigError


def kept_logits_bytes(cfg, padded_vocab: int, half: bool, device: torch.device,
                      is_last_stage: bool) -> Optional[int]:
    """Bytes of one micro-batch's logits that the fused cross-entropy keeps for backward on this
    rank, or None where it keeps none (not the last pipeline stage, megatron-core's output
    layer, `model.fused_ce_keep_logits=false`, or the auto rule's choice)."""
    m = cfg.model
    if not is_last_stage or not m.fused_cross_entropy or m.fused_ce_keep_logits is False:
        return None
    from framework.fast.fused_ce import keep_logits_auto

    tokens = cfg.train.micro_batch_size * m.seq_length
    per_rank = padded_vocab // cfg.parallel.tensor_model_parallel_size
    itemsize = 2 if half else 4
    if m.fused_ce_keep_logits is None and not keep_logits_auto(tokens, per_rank, itemsize,
                                                               device):
        return None
    return tokens * per_rank * itemsize


def torch_figures(exc: BaseException) -> str:
    """The part of torch's message with the figures (what was asked for, the card's capacity and
    what was free), on one line."""
    text = " ".join(str(exc).split())
    sentences = re.split(r"(?<=\.)\s+", text)
    keep = [s for s in sentences[:4] if not s.startswith("See documentation")
            and "PYTORCH_" not in s]
    return " ".join(keep) or type(exc).__name__


FULL = "parallel.recompute_granularity=full parallel.recompute_method=uniform"


def levers(cfg, kept: Optional[int], dp_size: int) -> List[str]:
    """The settings that lower this run's memory, cheapest first."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    out = []
    if kept:
        how = "the auto rule" if m.fused_ce_keep_logits is None else "model.fused_ce_keep_logits=true"
        out.append(f"model.fused_ce_keep_logits=false (the output layer keeps "
                   f"{kept / 2**30:.1f} GiB of logits per micro-batch, chosen by {how})")
    if p.recompute_granularity is None:
        out.append("parallel.recompute_granularity=selective parallel.recompute_modules="
                   "[mlp_act] (or [layernorm]), or " + FULL)
    elif p.recompute_granularity == "selective":
        out.append(FULL)
    if dp_size > 1 and not p.use_distributed_optimizer:
        out.append("parallel.use_distributed_optimizer=true (shards the optimizer state over "
                   f"the {dp_size} data-parallel ranks)")
    if t.micro_batch_size > 1:
        out.append(f"a smaller train.micro_batch_size (now {t.micro_batch_size}; "
                   f"train.global_batch_size={t.global_batch_size} keeps the global batch by "
                   f"gradient accumulation)")
    out.append("more parallel.tensor_model_parallel_size / pipeline_model_parallel_size")
    return out


def oom_error(exc: BaseException, cfg, *, step: int, rank: int, padded_vocab: int, half: bool,
              device: torch.device, is_last_stage: bool, dp_size: int) -> ConfigError:
    """The one-line error for an out-of-memory error `exc` raised by training step `step`."""
    kept = kept_logits_bytes(cfg, padded_vocab, half, device, is_last_stage)
    return ConfigError(
        f"out of memory at step {step} on rank {rank} ({torch_figures(exc)}); to fit, "
        f"try: {'; '.join(levers(cfg, kept, dp_size))}")
