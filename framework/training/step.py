"""Train steps: how a batch is fetched, run through the model, and turned into a loss.

A train step has the shape that megatron-core's schedules expect and that users of the
Accelerate Megatron plugin know (`GPTTrainStep`): `get_batch`, `forward_step` (the schedule's
`forward_step_func`) and `loss_func`. Each model family defines its step on `TrainStep`
(framework/models/<family>/step.py, registered in its `ModelSpec`). Subclass one and select it
with `train.step._target_=my_pkg.MyStep` (+ keyword arguments) to change the loss.

The same step object drives the GPU path (mcore's pipeline schedules) and the CPU path
(`framework.training.loop.forward_backward_cpu`).
"""
from __future__ import annotations

import importlib
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from framework.errors import ConfigError
from framework.security.plugins import PLUGIN_POINTS

# Config-driven instantiation is limited to these module prefixes (`train.step._target_`);
# train.py refuses `_target_` anywhere else in the config (framework.security.plugins).
ALLOWED_TARGET_PREFIXES = tuple(PLUGIN_POINTS["train.step"])


def avg_losses_across_data_parallel_group(losses) -> torch.Tensor:
    """Average a list (or tensor) of scalar losses across the data-parallel group."""
    from megatron.core import parallel_state as ps

    t = torch.stack([l.detach().float().reshape(()) for l in losses]) if isinstance(
        losses, (list, tuple)) else losses.detach().float().reshape(-1)
    if dist.is_initialized():
        group = ps.get_data_parallel_group()
        if group.size() > 1:
            t = t.clone()
            dist.all_reduce(t, group=group)
            t /= group.size()
    return t


class TrainStep:
    """The base of every family's train step: batches moved to the device, a loss averaged over
    the positions where `loss_mask` is 1. A family defines `forward_step` (and may change
    `get_batch` / `loss_func`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def get_batch(self, data_iterator: Optional[Iterator]) -> Optional[Dict[str, torch.Tensor]]:
        if data_iterator is None:
            return None
        batch = next(data_iterator)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                if isinstance(v, torch.Tensor)}

    def loss_func(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        losses = output_tensor.float()
        mask = loss_mask.reshape(-1).float()
        loss = torch.sum(losses.reshape(-1) * mask) / mask.sum().clamp(min=1.0)
        # clone: mcore schedules divide the returned loss in place by the micro-batch count
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(self, data_iterator, model):
        """mcore's `forward_step_func`: (model output, a function of it returning (loss,
        {name: value}))."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward_step")

    # Accelerate plugin spelling
    def get_loss_func(self):
        return self.loss_func

    def get_forward_step_func(self):
        return self.forward_step


def build_train_step(default: type, spec: dict, device: torch.device):
    """The model family's step class `default`, or the class named by `spec['_target_']`
    (`train.step`). Extra keys in `spec` are passed to the class as keyword arguments.
    """
    spec = dict(spec or {})
    target = spec.pop("_target_", None)
    allowed = tuple(spec.pop("_allowed_prefixes_", ())) + ALLOWED_TARGET_PREFIXES
    if target is None:
        if spec:
            raise ConfigError(f"train.step has keyword arguments {sorted(spec)} but no _target_")
        return default(device)
    if not any(target.startswith(p) for p in allowed):
        raise ConfigError(f"train.step._target_={target!r} is outside the allowed plugin "
                          f"prefixes {list(allowed)} (add yours with "
                          f"+train.step._allowed_prefixes_=[my_pkg.])")
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.step._target_={target!r} cannot be imported ({e})") from None
    if not (isinstance(cls, type) and hasattr(cls, "forward_step")):
        raise ConfigError(f"train.step._target_={target!r} is not a train step class")
    return cls(device=device, **spec)
