"""Drop-in replacements for apex's `multi_tensor_l2norm` / `multi_tensor_scale`, built on
torch's `_foreach_*` kernels.

Without apex or TE, megatron-core falls back to `megatron.core.utils.local_multi_tensor_*`:
a Python loop with one kernel per tensor, and an l2 norm that converts every per-tensor norm to a
Python float (one host-device synchronisation per parameter tensor, 436 per step for gpt2-large).
These versions launch a handful of multi-tensor kernels and never synchronise. The main-to-model
param copy after each step, a Python loop of per-tensor copies for bf16, becomes one foreach copy.
`framework.mcore_patches.install_foreach_optimizer_kernels` puts them in mcore's optimizer.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def foreach_multi_tensor_applier(op, noop_flag_buffer, tensor_lists, *args):
    """Same call shape as apex's `multi_tensor_applier(op, flag, lists, *args)`."""
    return op(2048 * 32, noop_flag_buffer, tensor_lists, *args)


def foreach_l2norm(chunk_size: int, noop_flag, tensor_lists: List[List[torch.Tensor]],
                   per_tensor: bool, *args) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """L2 norm over all tensors of `tensor_lists[0]`, as a 1-element fp32 tensor on their device."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors)
    per = torch.stack([n.float() for n in norms])
    total = torch.linalg.vector_norm(per).reshape(1)
    return total, (per if per_tensor else None)


def foreach_scale(chunk_size: int, noop_flag, tensor_lists: List[List[torch.Tensor]],
                  scale: float) -> None:
    """dst = src * scale for each pair (in place when the lists are the same tensors)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        if scale != 1.0:
            torch._foreach_mul_(dst, scale)
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def foreach_copy_this_to_that(this: List[torch.Tensor], that: List[torch.Tensor],
                              overflow_buf: Optional[torch.Tensor] = None) -> None:
    """mcore's `_multi_tensor_copy_this_to_that` (main params -> bf16 model params after every
    step) without its bf16 fallback of one Python-level copy per tensor (437 for gpt2-large)."""
    if this:
        torch._foreach_copy_(that, this)


def fuse_adam(optimizer) -> Tuple[int, int]:
    """Switch every torch Adam/AdamW inside an mcore optimizer to torch's fused CUDA kernel
    (one kernel for the whole update instead of foreach's several passes). Returns (param groups
    switched, Adam param groups); leaves apex/TE optimizers and CPU params alone."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    n = total = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            total += 1
            if all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                   for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                n += 1
        torch_opt.defaults.update(fused=True, foreach=False)
    return n, total
