"""Causal-LM (GPT) datasets: megatron-core's GPT datasets.

`build_datasets(cfg.data, tokenizer, ...)` returns the (train, valid, test) datasets built by
megatron-core's `BlendedMegatronDatasetBuilder` from a `GPTDatasetConfig`:

* `data.type=embedded`: the arithmetic corpus (`framework.data.embedded`), prepared once into
  the cache directory, then read as an indexed dataset.
* `data.type=indexed`: `data.path` is a Megatron blend, `[prefix]` or `[w1, p1, w2, p2, ...]`,
  of `.bin/.idx` pairs made by `python -m data_tools.preprocess`.
* `data.type=mock`: megatron-core's `MockGPTDataset` (synthetic tokens; mcore forces its split
  to 1,1,1 and ignores `data.split`). Its ids are a fixed cycle (0..18 with the embedded
  tokenizer), so a model learns them within steps.
* `data.type=random`: `RandomTokens`, ids drawn uniformly from the model's vocabulary, a fresh
  draw per sample: what the speed baselines train on (benchmarks/), with no corpus to prepare.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from framework.data.builder import (build, check_index_memory, check_split_coverage,
                                    default_cache_root, indexed_blend)
from framework.data.embedded import AnswerLoss, prepare_embedded
from framework.errors import ConfigError
from framework.tokenizer import MegatronTokenizerAdapter, Tokenizer, embedded_tokenizer

if TYPE_CHECKING:  # annotations only
    from framework.config import DataConfig


def build_datasets(
    cfg: "DataConfig",
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Tuple[int, int, int],
    cache_dir: Optional[str],
    vocab_size: Optional[int] = None,
) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """Build the (train, valid, test) GPT datasets with megatron-core.

    `num_samples` is the number of samples each split must provide (mcore repeats epochs to
    reach it); a split with 0 samples is not built and comes back as None. `cache_dir` is where
    the embedded corpus is prepared (None: `default_cache_root()`). Every sample is a dict of
    `tokens`, `labels` (already shifted by one), `loss_mask` and `position_ids`, each [seq].
    Must be called on every rank when torch.distributed is initialised (rank 0 builds the
    index cache first, the others then load it). `vocab_size`: the ids `data.type=random` draws
    from (the model's unpadded vocabulary; the tokenizer's when None).
    """
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples} must be three non-negative counts")
    if cfg.type == "random":
        vocab = int(vocab_size or tokenizer.vocab_size)
        return tuple(RandomTokens(n, seq_length, vocab, seed, split) if n > 0 else None
                     for split, n in enumerate(num_samples))
    common: Dict[str, Any] = dict(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # the models use causal attention kernels
    )
    if cfg.type == "mock":
        cls: Any = MockGPTDataset
        config = GPTDatasetConfig(**common, path_to_cache=cfg.path_to_cache)
        check_index_memory(config, [""], None, num_samples, None)
    else:
        if cfg.type == "embedded":
            if tokenizer.hf.get_vocab() != embedded_tokenizer().hf.get_vocab():
                raise ConfigError("data=embedded needs the embedded tokenizer "
                                  "(framework.tokenizer.embedded_tokenizer()), got "
                                  f"{tokenizer!r}")
            # packed to the sequence length: every sample starts with a whole problem
            prefix = prepare_embedded(cache_dir or default_cache_root(), cfg.num_documents,
                                      seq_length=seq_length)
        else:
            prefix = None
        blend, path_to_cache = indexed_blend(cfg, prefix, tokenizer.vocab_size)
        cls = GPTDataset
        config = GPTDatasetConfig(**common, blend=blend, split=cfg.split,
                                  path_to_cache=path_to_cache)
        check_split_coverage(config, cfg.split, blend[0], num_samples)
        check_index_memory(config, blend[0], blend[1], num_samples, seq_length)
    train, valid, test = build(cls, config, num_samples)
    if cfg.type == "embedded":  # the loss is on the answers (framework.data.embedded)
        train, valid, test = (None if ds is None else AnswerLoss(ds, tokenizer)
                              for ds in (train, valid, test))
    return train, valid, test





class RandomTokens(torch.utils.data.Dataset):
    """`data.type=random`: `num_samples` samples of `seq_length` token ids drawn uniformly from
    [0, vocab_size), each from its own generator seeded by (seed, split, index), so a sample is
    the same on every rank, on resume and in any order. No documents: no end-of-document
    token, the loss on every position, positions 0..seq-1. Samples are the dicts megatron-core's
    GPTDataset returns (`tokens`, `labels` shifted by one, `loss_mask`, `position_ids`); index
    None is mcore's batch-padding sample (its loss masked)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int,
                 split: int = 0):
        if vocab_size < 1 or seq_length < 1:
            raise ValueError(f"vocab_size={vocab_size} and seq_length={seq_length} must be >= 1")
        self.num_samples, self.seq_length = int(num_samples), int(seq_length)
        self.vocab_size, self.seed, self.split = int(vocab_size), int(seed), int(split)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        state = np.random.SeedSequence([self.seed, self.split, 0 if idx is None else int(idx)])
        g = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        loss_mask = torch.full((self.seq_length,), 0.0 if idx is None else 1.0)
        return {"tokens": text[:-1].contiguous(), "labels": text[1:].contiguous(),
                "loss_mask": loss_mask, "position_ids": torch.arange(self.seq_length)}
