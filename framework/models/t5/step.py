"""T5's train step: span corruption, decoder cross-entropy over the target positions."""
from __future__ import annotations

from functools import partial

from framework.training.step import TrainStep


class T5TrainStep(TrainStep):
    """T5 span corruption: decoder cross-entropy over the target positions (`loss_mask`).

    Masks: the encoder self-attention and the cross-attention get [b, 1, 1, s_enc] over the
    padded encoder positions (True = masked, mcore's convention); the decoder self-attention is
    causal with no mask (its padding comes last, so no real position sees it)."""

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator)
        enc_pad = (batch["enc_mask"] < 0.5)[:, None, None, :]
        output = model(batch["text_enc"], batch["text_dec"], enc_pad, None, enc_pad,
                       lm_labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"])
