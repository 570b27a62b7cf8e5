"""What T5 trains on: megatron-core's `T5MaskedWordPieceDataset` (span corruption) over
sentence-split data (geometric spans up to 10 tokens unless `data.masking_*` say otherwise,
Megatron-LM's pretrain_t5.py choices), decoder length `model.decoder_seq_length`. The tokenizer
needs one `<extra_id_N>` sentinel per masked span and a decoder start token (BOS, else PAD); on
`data=embedded` the masked-LM character tokenizer."""
from __future__ import annotations

import math

from framework.data.masked_lm import build_masked_lm_datasets
from framework.errors import ConfigError
from framework.tokenizer import MaskedLMTokenizerAdapter, require_token, sentinel_ids


def adapter(tokenizer, model_cfg, data_cfg) -> MaskedLMTokenizerAdapter:
    """The adapter mcore's T5 dataset reads: one sentinel per masked span at most; a ConfigError
    names a missing token."""
    spans = math.ceil(data_cfg.masking_probability * max(model_cfg.seq_length - 2, 1))
    return adapter_for_spans(tokenizer, spans)


def adapter_for_spans(tokenizer, spans: int) -> MaskedLMTokenizerAdapter:
    """`adapter` for at most `spans` masked spans per sample."""
    hf = tokenizer.hf
    sentinels = sentinel_ids(tokenizer)
    if len(sentinels) < max(1, spans):
        raise ConfigError(
            f"tokenizer {hf.name_or_path or 'embedded'!r} has {len(sentinels)} sentinel tokens "
            f"(<extra_id_N>), model.type=t5 needs at least {max(1, spans)} (one per masked "
            f"span: data.masking_probability x model.seq_length)")
    bos = hf.bos_token_id if hf.bos_token_id is not None else hf.pad_token_id
    return MaskedLMTokenizerAdapter(
        tokenizer, "t5", cls=hf.cls_token_id, sep=hf.sep_token_id,  # only compared with ids
        # the id that replaces masked tokens before spans become sentinels (never emitted)
        mask=hf.mask_token_id if hf.mask_token_id is not None else sentinels[0],
        bos=require_token(tokenizer, "BOS (or PAD)", bos, "t5", "the decoder start token"),
        sentinels=sentinels)


def check_tokenizer(tokenizer, cfg) -> None:
    adapter(tokenizer, cfg.model, cfg.data)


def datasets(data_cfg, tokenizer, model_cfg, *, seed, num_samples, cache_dir):
    from megatron.core.datasets.t5_dataset import (T5MaskedWordPieceDataset,
                                                   T5MaskedWordPieceDatasetConfig)

    return build_masked_lm_datasets(
        data_cfg, tokenizer, adapter(tokenizer, model_cfg, data_cfg), model_type="t5", dataset_cls=T5MaskedWordPieceDataset,
        config_cls=T5MaskedWordPieceDatasetConfig,
        config_extra={"sequence_length_decoder": model_cfg.decoder_seq_length},
        masking_max_ngram=10, geometric=True, min_sentences=1, seq_length=model_cfg.seq_length,
        seed=seed, num_samples=num_samples, cache_dir=cache_dir)
