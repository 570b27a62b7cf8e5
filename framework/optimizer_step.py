"""The optimizer step, in the two forms the training loop uses.

* `guarded_optimizer_step`: megatron-core's `optimizer.step()`, split so that a non-finite loss or
  grad norm is seen *before* the update (the host reads both every step).
* `deferred_optimizer_step`: the same on the device, so that the host reads a step's loss and
  grad norm later and never waits for the GPU between steps (`train.defer_step_stats`); needs
  `deferred_step_supported(optimizer)`.

Both compute the grad norm as `grad_norm_tensor` does and clip by it, so they give the same
update.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from framework.fast.multi_tensor import foreach_l2norm


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
