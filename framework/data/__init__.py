"""The data layer: megatron-core GPT datasets and a resumable micro-batch iterator.

`build_datasets(cfg.data, tokenizer, ...)` returns the (train, valid, test) datasets built by
megatron-core's `BlendedMegatronDatasetBuilder` from a `GPTDatasetConfig`:

* `data.type=embedded`: the arithmetic corpus (`framework.data.embedded`), prepared once into
  the cache directory, then read as an indexed dataset.
* `data.type=indexed`: `data.path` is a Megatron blend, `[prefix]` or `[w1, p1, w2, p2, ...]`,
  of `.bin/.idx` pairs made by `python -m data_tools.preprocess`.
* `data.type=mock`: megatron-core's `MockGPTDataset` (synthetic tokens; mcore forces its split
  to 1,1,1 and ignores `data.split`).

For BERT and T5 (`model_type="bert"|"t5"`) the datasets are mcore's masked-LM ones,
`BERTMaskedWordPieceDataset` / `T5MaskedWordPieceDataset`, over sentence-split data
(`python -m data_tools.preprocess --split-sentences`; the embedded corpus has a sentence-split
variant with its own tokenizer, `framework.tokenizer.embedded_mlm_tokenizer`).

`MicroBatchIterator` turns a dataset into this data-parallel rank's micro-batches with the
sample layout of Megatron-LM's `MegatronPretrainingSampler`, resumable from `consumed_samples`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import Split

from framework.config import ConfigError, DataConfig
from framework.data.embedded import AnswerLoss, prepare_embedded
from framework.data.indexed import check_indexed, read_index
from framework.tokenizer import (MaskedLMTokenizerAdapter, MegatronTokenizerAdapter, Tokenizer,
                                 embedded_mlm_tokenizer, embedded_tokenizer)

__all__ = ["build_datasets", "MicroBatchIterator", "collate", "default_cache_root"]

Blend = Tuple[List[str], Optional[List[float]]]
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def default_cache_root() -> str:
    """`$XDG_CACHE_HOME/framework`, else `~/.cache/framework`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "framework")


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _index_cache_dir(cfg: DataConfig, first_prefix: str) -> str:
    """Where mcore caches its document/sample/shuffle indices: `data.path_to_cache`, else a
    `cache` folder beside the data, else (read-only data) the user cache."""
    if cfg.path_to_cache is not None:
        if not _writable_dir(cfg.path_to_cache):
            raise ConfigError(f"data.path_to_cache={cfg.path_to_cache!r} is not a writable "
                              f"directory")
        return cfg.path_to_cache
    for candidate in (os.path.join(os.path.dirname(first_prefix), "cache"),
                      os.path.join(default_cache_root(), "dataset_indices")):
        if _writable_dir(candidate):
            return candidate
    raise ConfigError(f"no writable directory for the dataset index cache beside "
                      f"{first_prefix}; set data.path_to_cache")


def _parse_blend(path: Sequence[str]) -> Blend:
    """A Megatron blend list -> (prefixes, weights or None), like mcore's get_blend_from_list
    but with one-line errors naming data.path."""
    items = [str(p).strip() for p in path]
    if not items:
        raise ConfigError("data.path is empty: give [prefix] or [weight, prefix, ...]")

    def as_float(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    if len(items) % 2 == 1 or as_float(items[0]) is None:
        return [os.path.abspath(p) for p in items], None
    weights = [as_float(w) for w in items[0::2]]
    if any(w is None or not math.isfinite(w) or w < 0 for w in weights) \
            or sum(w for w in weights if w) <= 0:
        raise ConfigError(f"data.path={items}: a weighted blend needs non-negative numeric "
                          f"weights (summing to > 0) at every even position")
    return [os.path.abspath(p) for p in items[1::2]], weights  # type: ignore[return-value]


def _check_split_coverage(config: Any, split: str, prefixes: List[str],
                          num_samples: Sequence[int], min_sentences: int = 0) -> None:
    """Fail, naming data.split, when a needed split gets no tokens from some dataset (mcore
    would loop forever looking for an epoch with tokens in it)."""
    for i, name in enumerate(s.name for s in Split):
        if num_samples[i] <= 0:
            continue
        bookends = config.split_matrix[i]
        if bookends is None:
            raise ConfigError(f"data.split={split!r} leaves the {name} split empty, but "
                              f"{num_samples[i]} {name} samples are needed")
        for prefix in prefixes:
            info = read_index(prefix)
            docs = info.document_indices
            # GPT datasets split sequences, masked-LM datasets split documents (mcore's
            # numel_low_level_dataset of each)
            n = len(docs) - 1 if min_sentences else info.num_sequences
            # mcore's rounding (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)
            beg, end = int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))
            seqs = slice(int(docs[beg]), int(docs[end])) if min_sentences else slice(beg, end)
            if int(info.sequence_lengths[seqs].sum()) == 0:
                raise ConfigError(
                    f"data.split={split!r} gives the {name} split {end - beg} of the {n} "
                    f"documents in {prefix}, with no tokens, but {num_samples[i]} {name} "
                    f"samples are needed; use more data or a larger {name} share")
            if min_sentences:
                # masked-LM samples come from documents with enough sentences (mcore's
                # build_mapping would otherwise search its epochs forever)
                counts = docs[beg + 1:end + 1] - docs[beg:end]
                if not (counts >= min_sentences).any():
                    raise ConfigError(
                        f"no document of the {name} split of {prefix} has {min_sentences} or "
                        f"more sentences, which BERT with model.add_binary_head needs; "
                        f"preprocess with --split-sentences (or set model.add_binary_head=false)"
                        if min_sentences > 1 else
                        f"the {name} split of {prefix} has no document with a sentence")


def _check_index_memory(config: Any, prefixes: List[str], weights: Optional[List[float]],
                        num_samples: Sequence[int], seq_length: Optional[int]) -> None:
    """Refuse, naming train.max_steps, a run whose dataset indices (built up front by mcore for
    every sample it will draw) would not fit in this machine's memory: an absurd step count
    otherwise stalls for hours in index building, then fails. Per sample mcore keeps a
    sample-index row and a shuffle entry (~24 bytes); per epoch of a GPT split, a document
    index as long as the split (~20 bytes per document while it is built). `seq_length` None:
    the samples alone (masked-LM datasets index differently)."""
    import psutil

    total = psutil.virtual_memory().total
    share = [w / sum(weights) for w in weights] if weights else [1.0] * len(prefixes)
    need = 0.0
    for i, name in enumerate(s.name for s in Split):
        n = num_samples[i]
        bookends = config.split_matrix[i]
        if n <= 0 or bookends is None:
            continue
        need += 24.0 * n * len(prefixes)
        if seq_length is None:
            continue
        for prefix, w in zip(prefixes, share):
            info = read_index(prefix)
            seqs = info.num_sequences
            beg, end = int(round(bookends[0] * seqs)), int(round(bookends[1] * seqs))
            tokens = int(info.sequence_lengths[beg:end].sum(dtype="int64"))
            if tokens > 0:
                epochs = math.ceil((math.ceil(w * n) * seq_length + 1) / tokens)
                need += 20.0 * epochs * (end - beg)
    if need > total:
        raise ConfigError(
            f"indexing {num_samples[0]} training samples (train.max_steps x "
            f"train.global_batch_size) over this data needs about {need / 2**30:,.0f} GiB of "
            f"memory, more than this machine's {total / 2**30:.0f} GiB; lower train.max_steps "
            f"(or use more data)")


class _Builder(BlendedMegatronDatasetBuilder):
    """mcore's builder, with one fix: `BlendedDataset` calls `torch.distributed.get_rank()`
    on a cache miss without checking `is_initialized()`, so weighted blends fail in a
    single-process run. Without a process group its (cheap) indices are built in memory."""

    @staticmethod
    def build_generic_dataset(cls: Any, is_built_on_rank: Any, synchronize_ranks: bool,
                              *args: Any) -> Any:
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            *rest, config = args
            args = (*rest, dataclasses.replace(config, path_to_cache=None))
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args)


def build_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Tuple[int, int, int],
    cache_dir: Optional[str],
    model_type: str = "gpt",
    decoder_seq_length: Optional[int] = None,
    binary_head: bool = False,
) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """Build the (train, valid, test) GPT datasets with megatron-core.

    `num_samples` is the number of samples each split must provide (mcore repeats epochs to
    reach it); a split with 0 samples is not built and comes back as None. `cache_dir` is where
    the embedded corpus is prepared (None: `default_cache_root()`). Every sample is a dict of
    `tokens`, `labels` (already shifted by one), `loss_mask` and `position_ids`, each [seq].
    Must be called on every rank when torch.distributed is initialised (rank 0 builds the
    index cache first, the others then load it).

    `model_type` "bert" / "t5" builds mcore's masked-LM datasets instead (`_masked_lm_datasets`);
    their samples are mcore's dicts (BERT: text, types, labels, is_random, padding_mask,
    loss_mask; T5: text_enc, text_dec, labels, loss_mask, enc_mask, dec_mask).
    """
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples} must be three non-negative counts")
    if model_type in ("bert", "t5"):
        return _masked_lm_datasets(cfg, tokenizer, model_type, seq_length=seq_length,
                                   decoder_seq_length=decoder_seq_length,
                                   binary_head=binary_head, seed=seed, num_samples=num_samples,
                                   cache_dir=cache_dir)
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
        _check_index_memory(config, [""], None, num_samples, None)
    else:
        if cfg.type == "embedded":
            if tokenizer.hf.get_vocab() != embedded_tokenizer().hf.get_vocab():
                raise ConfigError("data=embedded needs the embedded tokenizer "
                                  "(framework.tokenizer.embedded_tokenizer()), got "
                                  f"{tokenizer!r}")
            # packed to the sequence length: every sample starts with a whole problem
            prefix = prepare_embedded(cache_dir or default_cache_root(), cfg.num_documents,
                                      seq_length=seq_length)
            blend: Blend = ([prefix], None)
        else:
            blend = _parse_blend(cfg.path)
        for prefix in blend[0]:  # the files first, before making a cache folder beside them
            check_indexed(prefix)
        path_to_cache = _index_cache_dir(cfg, blend[0][0])
        for prefix in blend[0]:
            check_indexed(prefix, tokenizer.vocab_size, cache_dir=path_to_cache)
        cls = GPTDataset
        config = GPTDatasetConfig(**common, blend=blend, split=cfg.split,
                                  path_to_cache=path_to_cache)
        _check_split_coverage(config, cfg.split, blend[0], num_samples)
        _check_index_memory(config, blend[0], blend[1], num_samples, seq_length)
    # Do not build the splits nobody asked for (and cannot hang on an empty one).
    for i, n in enumerate(num_samples):
        if n == 0:
            config.split_matrix[i] = None
    train, valid, test = _Builder(cls, list(num_samples), lambda: True, config).build()
    if cfg.type == "embedded":  # the loss is on the answers (framework.data.embedded)
        train, valid, test = (None if ds is None else AnswerLoss(ds, tokenizer)
                              for ds in (train, valid, test))
    return train, valid, test


def masked_lm_tokenizer(tokenizer: Tokenizer, model_type: str, *, seq_length: int,
                       masking_probability: float) -> MaskedLMTokenizerAdapter:
    """The adapter mcore's masked-LM datasets read; a ConfigError names a missing token."""
    import math

    spans = math.ceil(masking_probability * max(seq_length - 2, 1))
    return MaskedLMTokenizerAdapter(tokenizer, model_type,
                                    min_sentinels=spans if model_type == "t5" else 0)


def _masked_lm_datasets(cfg: DataConfig, tokenizer: Tokenizer, model_type: str, *,
                        seq_length: int, decoder_seq_length: Optional[int], binary_head: bool,
                        seed: int, num_samples: Tuple[int, int, int], cache_dir: Optional[str]
                        ) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    from megatron.core.datasets.bert_dataset import (BERTMaskedWordPieceDataset,
                                                     BERTMaskedWordPieceDatasetConfig)
    from megatron.core.datasets.t5_dataset import (T5MaskedWordPieceDataset,
                                                   T5MaskedWordPieceDatasetConfig)

    if cfg.type == "mock":
        raise ConfigError(f"data=mock makes GPT samples only; model.type={model_type} needs "
                          f"data=embedded or data=indexed")
    if cfg.type == "embedded":
        if tokenizer.hf.get_vocab() != embedded_mlm_tokenizer().hf.get_vocab():
            raise ConfigError(f"data=embedded with model.type={model_type} needs the embedded "
                              f"masked-LM tokenizer (framework.tokenizer.embedded_mlm_tokenizer()),"
                              f" got {tokenizer!r}")
        blend: Blend = ([prepare_embedded(cache_dir or default_cache_root(), cfg.num_documents,
                                          sentences=True)], None)
    else:
        blend = _parse_blend(cfg.path)
    for prefix in blend[0]:
        check_indexed(prefix)
    path_to_cache = _index_cache_dir(cfg, blend[0][0])
    for prefix in blend[0]:
        check_indexed(prefix, tokenizer.vocab_size, cache_dir=path_to_cache)
    t5 = model_type == "t5"
    common: Dict[str, Any] = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=cfg.split,
        path_to_cache=path_to_cache,
        tokenizer=masked_lm_tokenizer(tokenizer, model_type, seq_length=seq_length,
                                      masking_probability=cfg.masking_probability),
        masking_probability=cfg.masking_probability,
        short_sequence_probability=cfg.short_sequence_probability,
        # Megatron-LM's pretrain_bert.py / pretrain_t5.py choices when not set
        masking_max_ngram=cfg.masking_max_ngram or (10 if t5 else 3),
        masking_do_full_word=cfg.masking_do_full_word,
        masking_do_permutation=cfg.masking_do_permutation,
        masking_use_longer_ngrams=cfg.masking_use_longer_ngrams,
        masking_use_geometric_distribution=(t5 if cfg.masking_use_geometric_distribution is None
                                            else cfg.masking_use_geometric_distribution),
    )
    if t5:
        cls: Any = T5MaskedWordPieceDataset
        config: Any = T5MaskedWordPieceDatasetConfig(**common,
                                                     sequence_length_decoder=decoder_seq_length)
    else:
        cls = BERTMaskedWordPieceDataset
        config = BERTMaskedWordPieceDatasetConfig(**common, classification_head=binary_head)
    _check_split_coverage(config, cfg.split, blend[0], num_samples,
                          min_sentences=2 if binary_head else 1)
    _check_index_memory(config, blend[0], blend[1], num_samples, None)
    for i, n in enumerate(num_samples):
        if n == 0:
            config.split_matrix[i] = None
    return tuple(_Builder(cls, list(num_samples), lambda: True, config).build())


# --------------------------------------------------------------------------------------------
# micro-batches
# --------------------------------------------------------------------------------------------
def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack GPT samples into a batch: `tokens`, `labels`, `position_ids` int64 [b, s] and
    `loss_mask` float32 [b, s] (and `attention_mask` if the dataset made one). Other samples
    (BERT/T5: no `tokens`) have every field stacked, ints becoming [b] tensors."""
    batch = {}
    keys = BATCH_KEYS if "tokens" in samples[0] else tuple(samples[0])
    for key in keys:
        if samples[0].get(key) is not None:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


class _BatchIndices:
    """The sample indices of each micro-batch of one DP rank, from `consumed_samples` on."""

    def __init__(self, size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int) -> None:
        self.size, self.micro, self.rank, self.dp = size, micro_batch_size, dp_rank, dp_size
        self.consumed = consumed_samples

    def __iter__(self) -> Iterator[List[int]]:
        consumed = self.consumed
        while True:
            start = consumed + self.rank * self.micro
            yield [(start + j) % self.size for j in range(self.micro)]
            consumed += self.micro * self.dp


class MicroBatchIterator:
    """Deterministic, resumable micro-batches of one data-parallel rank (endless).

    Global batch g covers samples [c, c + global_batch_size) where c is the number of samples
    consumed before it; each of its micro-batches covers the next `micro_batch_size * dp_size`
    samples, and DP rank r takes the slice [r * micro_batch_size, (r + 1) * micro_batch_size)
    of those (Megatron-LM's MegatronPretrainingSampler). So a run resumed with
    `consumed_samples=N` continues at sample N on DP rank 0. Indices wrap around the dataset
    length (mcore already sizes datasets to the samples requested, so this rarely happens).

    `num_workers > 0` loads samples in torch DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        num_workers: int = 0,
    ) -> None:
        if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a positive multiple of "
                f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        if dataset is None or len(dataset) == 0:
            raise ConfigError("the dataset to iterate is empty (check data.split and data.path)")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self._consumed = consumed_samples
        self._indices = _BatchIndices(len(dataset), micro_batch_size, dp_rank, dp_size,
                                      consumed_samples)
        self._batches: Optional[Iterator[Dict[str, torch.Tensor]]] = None

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together, after the micro-batches yielded so far."""
        return self._consumed

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per global batch on each DP rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _start(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._indices, num_workers=self.num_workers,
                collate_fn=collate, persistent_workers=True)
            return iter(loader)
        return (collate([self.dataset[i] for i in idx]) for idx in self._indices)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self._consumed += self.micro_batch_size * self.dp_size
        return batch

    def next_global_batch(self) -> List[Dict[str, torch.Tensor]]:
        """The micro-batches of this rank's share of the next global batch."""
        return [next(self) for _ in range(self.num_micro_batches)]
