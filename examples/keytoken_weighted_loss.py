"""A custom train step: samples that contain more key tokens weigh more in the loss.

The Accelerate Megatron-LM guide's `GPTTrainStepWithCustomLoss`, on this framework's plugin point:

    python train.py train.step._target_=examples.keytoken_weighted_loss.KeytokenWeightedStep \
        +train.step.alpha=0.25 '+train.step.keywords=["="]'

Per sample, the masked mean token loss is multiplied by `1 + alpha * n`, where `n` counts the
sample's input tokens that are key tokens; the batch loss is the mean of the weighted sample
losses. Key tokens are given as ids (`keytoken_ids`) or as strings (`keywords`) that encode to a
single token with `tokenizer` (an HF tokenizer name or directory; default: the embedded corpus'
character tokenizer, where the default keyword "=" marks the answer of each problem);
`hf_token` is passed to Hugging Face for gated tokenizers (it is masked in every log and file).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch

from framework.models.gpt.step import GPTTrainStep
from framework.training.step import avg_losses_across_data_parallel_group


def resolve_keytoken_ids(keywords: Sequence[str], tokenizer: Optional[str] = None,
                        hf_token: Optional[str] = None) -> list:
    """Ids of the keywords that encode to exactly one token (as in the guide)."""
    if tokenizer is None:
        from framework.tokenizer import embedded_tokenizer

        encode = embedded_tokenizer().encode
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tokenizer, token=hf_token)  # token: gated repos
        encode = lambda s: hf(s, add_special_tokens=False).input_ids  # noqa: E731
    ids = []
    for word in keywords:
        enc = list(encode(word))
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(int(enc[0]))
    return ids


class KeytokenWeightedStep(GPTTrainStep):
    def __init__(self, device: torch.device, alpha: float = 0.25,
                 keytoken_ids: Optional[Sequence[int]] = None,
                 keywords: Sequence[str] = ("=",), tokenizer: Optional[str] = None,
                 hf_token: Optional[str] = None):
        super().__init__(device)
        self.alpha = float(alpha)
        ids = list(keytoken_ids) if keytoken_ids else resolve_keytoken_ids(keywords, tokenizer,
                                                                           hf_token)
        if not ids:
            from framework.config import ConfigError

            raise ConfigError(f"train.step: none of keywords={list(keywords)} is a single token; "
                              f"give train.step.keytoken_ids")
        self.keytoken_ids = torch.tensor(ids, dtype=torch.long)

    def weighted_loss_func(self, tokens: torch.Tensor, loss_mask: torch.Tensor,
                           output_tensor: torch.Tensor):
        b, s = output_tensor.shape
        losses = output_tensor.float()
        mask = loss_mask.reshape(b, s).float()
        per_sample = (losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        keys = self.keytoken_ids.to(tokens.device)
        counts = torch.isin(tokens, keys).float().sum(dim=1)
        weights = 1.0 + self.alpha * counts
        loss = (per_sample * weights).mean()
        # for the log line: the DP average (the schedule reduces the gradient itself)
        averaged = avg_losses_across_data_parallel_group([loss])
        return loss, {"lm loss": averaged[0].clone()}

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
        return output, partial(self.weighted_loss_func, batch["tokens"], batch["loss_mask"])

    def get_loss_func(self):
        return self.weighted_loss_func
