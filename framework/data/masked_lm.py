"""Masked-LM datasets (megatron-core's `BERTMaskedWordPieceDataset`, `T5MaskedWordPieceDataset`)
over sentence-split data (`python -m data_tools.preprocess --split-sentences`; the embedded corpus
has a sentence-split variant with its own tokenizer, `framework.tokenizer.embedded_mlm_tokenizer`).
What the two share is here; each family passes its dataset class and defaults
(framework/models/bert/data.py, framework/models/t5/data.py). Samples are mcore's dicts (BERT:
text, types, labels, is_random, padding_mask, loss_mask; T5: text_enc, text_dec, labels,
loss_mask, enc_mask, dec_mask).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from framework.data.builder import (build, check_index_memory, check_split_coverage,
                                    default_cache_root, indexed_blend)
from framework.data.embedded import prepare_embedded
from framework.errors import ConfigError
from framework.tokenizer import MaskedLMTokenizerAdapter, Tokenizer, embedded_mlm_tokenizer

if TYPE_CHECKING:  # annotations only
    from framework.config import DataConfig


def build_masked_lm_datasets(cfg: "DataConfig", tokenizer: Tokenizer,
                             adapter: MaskedLMTokenizerAdapter, *, model_type: str,
                             dataset_cls: Any, config_cls: Any, config_extra: Dict[str, Any],
                             masking_max_ngram: int, geometric: bool, min_sentences: int,
                             seq_length: int, seed: int, num_samples: Tuple[int, int, int],
                             cache_dir: Optional[str]
                             ) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(train, valid, test) masked-LM datasets of `dataset_cls` / `config_cls` (mcore's) for the
    family `model_type`, reading `tokenizer` through the family's `adapter`;
    `masking_max_ngram` / `geometric`: the family's defaults where `data.masking_max_ngram` /
    `data.masking_use_geometric_distribution` are unset; `min_sentences`: sentences a document
    needs to give a sample; `config_extra`: the family's own config fields."""
    if cfg.type not in ("embedded", "indexed"):
        raise ConfigError(f"data={cfg.type} makes GPT samples only; model.type={model_type} needs "
                          f"data=embedded or data=indexed")
    prefix = None
    if cfg.type == "embedded":
        if tokenizer.hf.get_vocab() != embedded_mlm_tokenizer().hf.get_vocab():
            raise ConfigError(f"data=embedded with model.type={model_type} needs the embedded "
                              f"masked-LM tokenizer (framework.tokenizer.embedded_mlm_tokenizer()),"
                              f" got {tokenizer!r}")
        prefix = prepare_embedded(cache_dir or default_cache_root(), cfg.num_documents,
                                  sentences=True)
    blend, path_to_cache = indexed_blend(cfg, prefix, tokenizer.vocab_size)
    config = config_cls(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=cfg.split,
        path_to_cache=path_to_cache,
        tokenizer=adapter,
        masking_probability=cfg.masking_probability,
        short_sequence_probability=cfg.short_sequence_probability,
        masking_max_ngram=cfg.masking_max_ngram or masking_max_ngram,
        masking_do_full_word=cfg.masking_do_full_word,
        masking_do_permutation=cfg.masking_do_permutation,
        masking_use_longer_ngrams=cfg.masking_use_longer_ngrams,
        masking_use_geometric_distribution=(geometric if cfg.masking_use_geometric_distribution
                                            is None else cfg.masking_use_geometric_distribution),
        **config_extra,
    )
    check_split_coverage(config, cfg.split, blend[0], num_samples, min_sentences=min_sentences)
    check_index_memory(config, blend[0], blend[1], num_samples, None)
    return build(dataset_cls, config, num_samples)
