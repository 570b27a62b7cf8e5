"""Causal-LM (GPT) datasets: megatron-core's GPT datasets.

`build_datasets(cfg.data, tokenizer, ...)` returns the (train, valid, test) datasets built by
megatron-core's `BlendedMegatronDatasetBuilder` from a `GPTDatasetConfig`:

* `data.type=embedded`: the arithmetic corpus (`framework.data.embedded`), prepared once into
  the cache directory, then read as an indexed dataset.
* `data.type=indexed`: `data.path` is a Megatron blend, `[prefix]` or `[w1, p1, w2, p2, ...]`,
  of `.bin/.idx` pairs made by `python -m data_tools.preprocess`.
* `data.type=mock`: megatron-core's `MockGPTDataset` (synthetic tokens; mcore forces its split
  to 1,1,1 and ignores `data.split`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

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
) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """Build the (train, valid, test) GPT datasets with megatron-core.

    `num_samples` is the number of samples each split must provide (mcore repeats epochs to
    reach it); a split with 0 samples is not built and comes back as None. `cache_dir` is where
    the embedded corpus is prepared (None: `default_cache_root()`). Every sample is a dict of
    `tokens`, `labels` (already shifted by one), `loss_mask` and `position_ids`, each [seq].
    Must be called on every rank when torch.distributed is initialised (rank 0 builds the
    index cache first, the others then load it).
    """
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples} must be three non-negative counts")
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



