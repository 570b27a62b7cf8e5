"""Optimizer and LR schedule from `cfg.optimizer` (megatron-core field names).

GPU: megatron-core's `get_megatron_optimizer` (mixed precision, fp16 loss scaling, distributed
optimizer; it falls back from TE to apex to torch on its own) and `OptimizerParamScheduler`.

CPU: mcore's optimizers hard-code CUDA tensors for the grad norm and loss scale, so `CpuOptimizer`
subclasses mcore's `FP32Optimizer` and replaces only those pieces. Param groups, the state dict
and the sharded (reshardable) checkpoint format stay mcore's. `optimizer.fused_step` selects
torch's fused CPU kernel there too (the same skip-on-`found_inf` semantics as on the GPU).

The step itself (finiteness checks before the update, or all of it on the device) is in
`framework.optimizer_step`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch
import torch.distributed as dist

from framework import mcore_patches
from framework.fast.multi_tensor import fuse_adam
from framework.optimizer_step import grad_norm_tensor

if TYPE_CHECKING:  # annotations only
    from framework.config import OptimizerConfig


def mcore_optimizer_config(cfg: "OptimizerConfig", *, bf16: bool, fp16: bool,
                           use_distributed_optimizer: bool, overlap_param_gather: bool):
    from megatron.core.optimizer import OptimizerConfig as MCoreOptimizerConfig

    return MCoreOptimizerConfig(
        optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum, clip_grad=cfg.clip_grad, bf16=bf16, fp16=fp16,
        params_dtype=torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32,
        loss_scale=cfg.loss_scale, initial_loss_scale=cfg.initial_loss_scale,
        min_loss_scale=cfg.min_loss_scale, loss_scale_window=cfg.loss_scale_window,
        hysteresis=cfg.hysteresis, use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )


def build_optimizer(cfg: "OptimizerConfig", model: List[torch.nn.Module], *, max_steps: int,
                    bf16: bool, fp16: bool, use_distributed_optimizer: bool,
                    overlap_param_gather: bool, on_gpu: bool):
    """Return (optimizer, scheduler)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    mcfg = mcore_optimizer_config(cfg, bf16=bf16, fp16=fp16,
                                  use_distributed_optimizer=use_distributed_optimizer,
                                  overlap_param_gather=overlap_param_gather)
    if on_gpu:
        from megatron.core.optimizer import get_megatron_optimizer

        if cfg.fused_step:
            mcore_patches.install_foreach_optimizer_kernels()
        optimizer = get_megatron_optimizer(mcfg, model)
        if cfg.fused_step and cfg.optimizer == "adam":
            # (switched, all) param groups, for the run's log line: a group with a tensor the
            # fused kernel does not take stays on torch's foreach kernels
            optimizer.fused_adam_groups = fuse_adam(optimizer)
    else:
        optimizer = CpuOptimizer.build(mcfg, model, fused=cfg.fused_step)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, wd_incr_style="constant",
                                        **_schedule(cfg, max_steps))
    return optimizer, scheduler


def _schedule(cfg: "OptimizerConfig", max_steps: int) -> dict:
    """The scheduler's settings from the config (warm-up capped to end before the decay's last
    step, as megatron-core requires; the runner notes the cap)."""
    decay_steps = cfg.lr_decay_steps or max(max_steps, 1)
    return dict(max_lr=cfg.lr, min_lr=cfg.min_lr,
                lr_warmup_steps=min(cfg.lr_warmup_steps, max(decay_steps - 1, 0)),
                lr_decay_steps=decay_steps, lr_decay_style=cfg.lr_decay_style,
                start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=decay_steps)


def apply_optimizer_settings(optimizer, scheduler, cfg: "OptimizerConfig", *, max_steps: int,
                             stored: Optional[dict] = None) -> List[str]:
    """optimizer.override_on_resume: after a resume loaded the checkpoint's optimizer and
    scheduler state, put this config's schedule, weight decay, betas, eps and momentum in
    their place, and set the param groups' lr and weight decay at the checkpoint's step. The
    moments stay. Returns the changed settings as "optimizer.<field>=<value>" (`stored`: the
    checkpoint's optimizer config, for that list)."""
    from framework.config import RESUMED_OPTIMIZER_FIELDS, UNREAD_BY_OPTIMIZER

    old_decay = scheduler.lr_decay_steps
    for name, value in _schedule(cfg, max_steps).items():
        setattr(scheduler, name, value)
    for group in optimizer.param_groups:
        # megatron-core's groups carry their own max_lr / min_lr, which get_lr reads (the
        # config's: this framework sets no per-group learning rates)
        if "max_lr" in group:
            group["max_lr"] = cfg.lr
        if "min_lr" in group:
            group["min_lr"] = cfg.min_lr
        if "betas" in group:
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        if "eps" in group:
            group["eps"] = cfg.adam_eps
        if "momentum" in group:
            group["momentum"] = cfg.sgd_momentum
    scheduler.step(increment=0)  # lr and weight decay of every group at the current step
    stored = stored or {}
    changed = [f"optimizer.{f}={getattr(cfg, f)}" for f in RESUMED_OPTIMIZER_FIELDS
               if f not in UNREAD_BY_OPTIMIZER[cfg.optimizer] and f != "lr_decay_steps" and stored.get(f) is not None
               and stored[f] != getattr(cfg, f)]
    if scheduler.lr_decay_steps != old_decay:
        changed.append(f"the decay over {scheduler.lr_decay_steps} steps (was {old_decay})")
    return changed


class CpuOptimizer:
    """Built lazily as a subclass of mcore's FP32Optimizer (import cost, see `build`)."""

    @staticmethod
    def build(mcfg, model: List[torch.nn.Module], fused: bool = False):
        from megatron.core.optimizer.optimizer import FP32Optimizer

        class _CpuFP32Optimizer(FP32Optimizer):
            def __init__(self, optimizer, config):
                # FP32Optimizer.__init__ puts its unit loss scale on CUDA; skip to the base.
                super(FP32Optimizer, self).__init__(optimizer, config, _init_state)
                self._scale = torch.tensor([1.0])
                self.is_stub_optimizer = False

            def get_grad_norm(self) -> float:
                return float(grad_norm_tensor(self))

            def clip_grad_norm(self, clip_grad: float) -> float:
                norm = self.get_grad_norm()
                self.clip_grads_by_norm(norm)
                return norm

            def clip_grads_by_norm(self, norm: float) -> None:
                """Scale the grads to `config.clip_grad` given their total norm."""
                coeff = self.config.clip_grad / (norm + 1e-6)
                grads = [p.grad for p in self.get_parameters() if p.grad is not None]
                if coeff < 1.0 and grads:
                    torch._foreach_mul_(grads, coeff)

            def count_zeros(self) -> float:
                return float(sum((g == 0).sum().item() for g in self.get_main_grads_for_grad_norm()))

        from megatron.core.optimizer import _get_param_groups

        # mcore's own grouping (no weight decay on biases and norms, the keys its
        # checkpoint loader matches groups by)
        groups = _get_param_groups(model, mcfg, None)
        if mcfg.optimizer == "adam":
            inner = torch.optim.AdamW(groups, lr=mcfg.lr, weight_decay=mcfg.weight_decay,
                                      betas=(mcfg.adam_beta1, mcfg.adam_beta2), eps=mcfg.adam_eps,
                                      fused=fused)
        else:
            inner = torch.optim.SGD(groups, lr=mcfg.lr, weight_decay=mcfg.weight_decay,
                                    momentum=mcfg.sgd_momentum, fused=fused)
        return _CpuFP32Optimizer(inner, mcfg)


def _init_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Create empty optimizer state so a checkpoint's state has somewhere to load into."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                if isinstance(opt, torch.optim.SGD):
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)
                else:
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                    opt.state[p]["step"] = torch.tensor(0.0)


def allreduce_grads_cpu(model: List[torch.nn.Module]) -> None:
    """CPU stand-in for mcore DDP's grad sync and `finalize_model_grads` (GPU runs use both):
    sum the grads of the q/k norm weights (model.qk_layernorm) over the tensor-parallel group,
    as `finalize_model_grads` does (each TP rank holds the whole weight but only its own heads'
    share of its gradient), then average every grad over the data-parallel group. Sequence and
    pipeline parallelism, mcore's other finalize steps, are GPU-only."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_group()
    if tp.size() > 1:
        qk = [p.grad for m in model for name, p in m.named_parameters()
              if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name)]
        _allreduce_flat(qk, tp)
    group = ps.get_data_parallel_group()
    if group.size() == 1:
        return
    grads = [p.grad for m in model for p in m.parameters() if p.grad is not None]
    _allreduce_flat(grads, group, average=True)


def _allreduce_flat(grads: List[torch.Tensor], group, average: bool = False) -> None:
    """All-reduce `grads` in place as one flat buffer (sum, or mean with `average`)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= group.size()
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()

