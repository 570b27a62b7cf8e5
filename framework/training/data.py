"""Glue between the data package and the loop: tokenizer choice and resumable iterators."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

from framework.config import DataConfig, TokenizerConfig, TrainConfig


def load_run_tokenizer(data_cfg: DataConfig, tok_cfg: TokenizerConfig, load_dir: Optional[str],
                       hf_dir: Optional[str] = None, model_type: str = "gpt",
                       allow_symlinks: bool = False, iteration: Optional[int] = None):
    """Config first; else the checkpoint's (or HF model dir's) tokenizer; else the embedded one
    (for BERT/T5 the embedded masked-LM tokenizer)."""
    from framework.tokenizer import build_tokenizer, embedded_mlm_tokenizer, embedded_tokenizer
    from framework.training import checkpoint as ckpt

    if tok_cfg.path or tok_cfg.vocab_file:
        return build_tokenizer(tok_cfg)
    if load_dir:
        it = iteration if iteration is not None else \
            ckpt.latest_iteration(load_dir, allow_symlinks=allow_symlinks)
        saved = os.path.join(ckpt.iter_dir(load_dir, it), "tokenizer") if it is not None else None
        if saved and os.path.isdir(saved):
            return build_tokenizer(tok_cfg, default_dir=saved)
    if hf_dir and any(os.path.isfile(os.path.join(hf_dir, f))
                      for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return build_tokenizer(TokenizerConfig(path=hf_dir))
    if data_cfg.type == "indexed":
        from framework.config import ConfigError

        raise ConfigError("data=indexed needs a tokenizer: set tokenizer.path or "
                          "tokenizer.vocab_file + tokenizer.merge_file")
    return embedded_mlm_tokenizer() if model_type in ("bert", "t5") else embedded_tokenizer()


@dataclass
class TrainData:
    train: Any
    valid: Any
    micro_batch_size: int
    global_batch_size: int
    dp_rank: int
    dp_size: int

    def _iters(self, ds, n: int, consumed: int) -> List[Any]:
        from framework.data import MicroBatchIterator

        return [iter(MicroBatchIterator(ds, micro_batch_size=self.micro_batch_size,
                                        global_batch_size=self.global_batch_size,
                                        dp_rank=self.dp_rank, dp_size=self.dp_size,
                                        consumed_samples=consumed))
                for _ in range(n)]

    def train_iterators(self, n_chunks: int, consumed_samples: int) -> List[Any]:
        return self._iters(self.train, n_chunks, consumed_samples)

    def valid_iterators(self, n_chunks: int) -> List[Any]:
        """Evaluation always starts at the beginning of the validation split (comparable)."""
        return self._iters(self.valid, n_chunks, 0)


def build_train_data(data_cfg: DataConfig, tokenizer, train_cfg: TrainConfig, *, seq_length: int,
                     dp_rank: int, dp_size: int, model_type: str = "gpt",
                     decoder_seq_length: Optional[int] = None,
                     binary_head: bool = False) -> TrainData:
    from framework.data import build_datasets

    gbs = train_cfg.global_batch_size
    n_eval = gbs * train_cfg.eval_iters if train_cfg.eval_interval else 0
    num_samples = (train_cfg.max_steps * gbs, n_eval, 0)
    train, valid, _test = build_datasets(data_cfg, tokenizer, seq_length=seq_length,
                                         seed=train_cfg.seed, num_samples=num_samples,
                                         cache_dir=data_cfg.path_to_cache, model_type=model_type,
                                         decoder_seq_length=decoder_seq_length,
                                         binary_head=binary_head)
    return TrainData(train, valid if n_eval else None, train_cfg.micro_batch_size, gbs,
                     dp_rank, dp_size)
