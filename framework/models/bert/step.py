"""BERT's train step: masked-LM cross-entropy, plus the sentence-order loss with the binary head."""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch

from framework.models.wrappers import unwrap
from framework.training.step import TrainStep


class BertTrainStep(TrainStep):
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
        binary = getattr(unwrap(model), "add_binary_head", False)
        output = model(batch["text"], batch["padding_mask"],
                       tokentype_ids=batch["types"] if binary else None,
                       lm_labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"],
                               batch["is_random"] if binary else None)
