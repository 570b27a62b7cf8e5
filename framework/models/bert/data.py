"""What BERT trains on: megatron-core's `BERTMaskedWordPieceDataset` over sentence-split data
(whole-word masking, 3-grams unless `data.masking_max_ngram` says otherwise, Megatron-LM's
pretrain_bert.py choices), with sentence pairs for the binary head. The tokenizer needs
[CLS], [SEP] and [MASK]; on `data=embedded` the masked-LM character tokenizer."""
from __future__ import annotations

from framework.data.masked_lm import build_masked_lm_datasets
from framework.tokenizer import MaskedLMTokenizerAdapter, require_token


def adapter(tokenizer) -> MaskedLMTokenizerAdapter:
    """The adapter mcore's BERT dataset reads; a ConfigError names a missing token."""
    hf = tokenizer.hf

    def need(what, value, why):
        return require_token(tokenizer, what, value, "bert", why)

    return MaskedLMTokenizerAdapter(
        tokenizer, "bert", cls=need("CLS", hf.cls_token_id, "it starts every sample"),
        sep=need("SEP", hf.sep_token_id, "it ends each segment"),
        mask=need("MASK", hf.mask_token_id, "masked-LM input"), bos=tokenizer.bos)


def check_tokenizer(tokenizer, cfg) -> None:
    adapter(tokenizer)


def datasets(data_cfg, tokenizer, model_cfg, *, seed, num_samples, cache_dir):
    from megatron.core.datasets.bert_dataset import (BERTMaskedWordPieceDataset,
                                                     BERTMaskedWordPieceDatasetConfig)

    binary = model_cfg.add_binary_head
    return build_masked_lm_datasets(
        data_cfg, tokenizer, adapter(tokenizer), model_type="bert",
        dataset_cls=BERTMaskedWordPieceDataset, config_cls=BERTMaskedWordPieceDatasetConfig,
        config_extra={"classification_head": binary}, masking_max_ngram=3, geometric=False,
        min_sentences=2 if binary else 1, seq_length=model_cfg.seq_length, seed=seed,
        num_samples=num_samples, cache_dir=cache_dir)
