"""GPT's train step: causal LM, next-token cross-entropy averaged over the tokens where
`loss_mask` is 1 (the labels are shifted by the dataset)."""
from __future__ import annotations

from functools import partial

import torch

from framework.training.step import TrainStep


class GPTTrainStep(TrainStep):
    """Causal LM: next-token cross-entropy averaged over the tokens where `loss_mask` is 1."""

    def forward_step(self, data_iterator, model):
        with torch.profiler.record_function("phase/get_batch"):
            batch = self.get_batch(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"])
