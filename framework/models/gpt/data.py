"""What GPT trains on: megatron-core's GPT datasets (framework/data/gpt.py) at `model.seq_length`,
with any tokenizer (on `data=embedded`, the arithmetic corpus with its character tokenizer)."""
from __future__ import annotations

from framework.data.gpt import build_datasets


def datasets(data_cfg, tokenizer, model_cfg, *, seed, num_samples, cache_dir):
    return build_datasets(data_cfg, tokenizer, seq_length=model_cfg.seq_length, seed=seed,
                          num_samples=num_samples, cache_dir=cache_dir,
                          vocab_size=model_cfg.vocab_size or tokenizer.vocab_size)
