"""Train steps: how a batch is fetched, run through the model, and turned into a loss.

A train step has the shape that megatron-core's schedules expect and that users of the
Accelerate Megatron plugin know (`GPTTrainStep`): `get_batch`, `forward_step` (the schedule's
`forward_step_func`) and `loss_func`. Subclass one and select it with
`train.step._target_=my_pkg.MyStep` (+ keyword arguments) to change the loss.

The same step object drives the GPU path (mcore's pipeline schedules) and the CPU path
(`framework.training.loop.forward_backward_cpu`).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist


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


class GPTTrainStep:
    """Causal LM: next-token cross-entropy averaged over the tokens where `loss_mask` is 1."""

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
        with torch.profiler.record_function("phase/get_batch"):
            batch = self.get_batch(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"])

    # Accelerate plugin spelling
    def get_loss_func(self):
        return self.loss_func

    def get_forward_step_func(self):
        return self.forward_step


class BertTrainStep(GPTTrainStep):
    """BERT: masked-LM cross-entropy over the masked positions (`loss_mask`), plus the
    sentence-order loss (cross-entropy of the binary head, `is_random` as target) when the model
    has a binary head. Reports "lm loss" (what the loop logs) and, with the head, "sop loss";
    the loss trained on is their sum (Megatron-LM's pretrain_bert.py)."""

    def get_batch(self, data_iterator):
        batch = super().get_batch(data_iterator)
        if batch is None:
            return None
        # mcore pads token types with the pad id (-1 here); padded positions are masked anyway
        batch["types"] = batch["types"].clamp(min=0)
        return batch

    def loss_func(self, loss_mask: torch.Tensor, sentence_order: Optional[torch.Tensor],
                  output_tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        lm_losses, sop_logits = output_tensor
        mask = loss_mask.reshape(-1).float()
        lm_loss = torch.sum(lm_losses.float().reshape(-1) * mask) / mask.sum().clamp(min=1.0)
        logs = {"lm loss": lm_loss.detach().clone()}
        loss = lm_loss
        if sop_logits is not None and sentence_order is not None:
            sop_loss = torch.nn.functional.cross_entropy(sop_logits.reshape(-1, 2).float(),
                                                         sentence_order.reshape(-1),
                                                         ignore_index=-1)
            loss = lm_loss + sop_loss
            logs["sop loss"] = sop_loss.detach().clone()
        return loss, logs

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator)
        binary = getattr(_unwrap(model), "add_binary_head", False)
        output = model(batch["text"], batch["padding_mask"],
                       tokentype_ids=batch["types"] if binary else None,
                       lm_labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"],
                               batch["is_random"] if binary else None)


class T5TrainStep(GPTTrainStep):
    """T5 span corruption: decoder cross-entropy over the target positions (`loss_mask`).

    Masks: the encoder self-attention and the cross-attention get [b, 1, 1, s_enc] over the
    padded encoder positions (True = masked, mcore's convention); the decoder self-attention is
    causal with no mask (its padding comes last, so no real position sees it)."""

    def loss_func(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor):
        return super().loss_func(loss_mask, output_tensor)

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator)
        enc_pad = (batch["enc_mask"] < 0.5)[:, None, None, :]
        output = model(batch["text_enc"], batch["text_dec"], enc_pad, None, enc_pad,
                       lm_labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"])


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


TRAIN_STEPS = {"gpt": GPTTrainStep, "bert": BertTrainStep, "t5": T5TrainStep}


# Config-driven instantiation is limited to these module prefixes (`train.step._target_`);
# train.py refuses `_target_` anywhere else in the config (framework.security.PLUGIN_POINTS).
from framework.security import PLUGIN_POINTS  # noqa: E402

ALLOWED_TARGET_PREFIXES = tuple(PLUGIN_POINTS["train.step"])


def build_train_step(model_type: str, spec: dict, device: torch.device):
    """The registry's step for `model_type`, or the class named by `spec['_target_']`.

    Extra keys in `spec` are passed to the class as keyword arguments.
    """
    from framework.config import ConfigError

    spec = dict(spec or {})
    target = spec.pop("_target_", None)
    allowed = tuple(spec.pop("_allowed_prefixes_", ())) + ALLOWED_TARGET_PREFIXES
    if target is None:
        if spec:
            raise ConfigError(f"train.step has keyword arguments {sorted(spec)} but no _target_")
        return TRAIN_STEPS[model_type](device)
    if not any(target.startswith(p) for p in allowed):
        raise ConfigError(f"train.step._target_={target!r} is outside the allowed plugin "
                          f"prefixes {list(allowed)} (add yours with "
                          f"+train.step._allowed_prefixes_=[my_pkg.])")
    import importlib

    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.step._target_={target!r} cannot be imported ({e})") from None
    if not (isinstance(cls, type) and hasattr(cls, "forward_step")):
        raise ConfigError(f"train.step._target_={target!r} is not a train step class")
    return cls(device=device, **spec)
