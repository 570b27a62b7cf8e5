"""What every dataset family shares when megatron-core builds its datasets: where the index cache
goes, Megatron blends, the checks that a split has tokens and that the up-front index fits in
memory, and the builder (`Builder`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import Split

from framework.data.indexed import check_indexed, read_index
from framework.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from framework.config import DataConfig

Blend = Tuple[List[str], Optional[List[float]]]


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


def index_cache_dir(cfg: "DataConfig", first_prefix: str) -> str:
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


def parse_blend(path: Sequence[str]) -> Blend:
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


def check_split_coverage(config: Any, split: str, prefixes: List[str],
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


def check_index_memory(config: Any, prefixes: List[str], weights: Optional[List[float]],
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
    needs = [0.0] * len(num_samples)  # per split: train, valid, test
    for i, name in enumerate(s.name for s in Split):
        n = num_samples[i]
        bookends = config.split_matrix[i]
        if n <= 0 or bookends is None:
            continue
        needs[i] += 24.0 * n * len(prefixes)
        if seq_length is None:
            continue
        for prefix, w in zip(prefixes, share):
            info = read_index(prefix)
            seqs = info.num_sequences
            beg, end = int(round(bookends[0] * seqs)), int(round(bookends[1] * seqs))
            tokens = int(info.sequence_lengths[beg:end].sum(dtype="int64"))
            if tokens > 0:
                epochs = math.ceil((math.ceil(w * n) * seq_length + 1) / tokens)
                needs[i] += 20.0 * epochs * (end - beg)
    need = sum(needs)
    if need > total:
        # the split that needs the most names the setting to lower
        i = max(range(len(needs)), key=needs.__getitem__)
        what, formula, lower = _INDEXED_SPLITS[i]
        raise ConfigError(
            f"indexing {num_samples[i]} {what} samples ({formula}) over this data needs about "
            f"{need / 2**30:,.0f} GiB of memory, more than this machine's "
            f"{total / 2**30:.0f} GiB; {lower}")


# per split: what its samples are, how their number comes about, and the setting that sets it
_INDEXED_SPLITS = [
    ("training", "train.max_steps x train.global_batch_size",
     "lower train.max_steps (or use more data)"),
    ("held-out", "train.eval_iters x train.global_batch_size", "lower train.eval_iters"),
    ("test", "train.eval_iters x train.global_batch_size", "lower train.eval_iters"),
]


class Builder(BlendedMegatronDatasetBuilder):
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


def build(cls: Any, config: Any, num_samples: Sequence[int]) -> Tuple[Any, Any, Any]:
    """megatron-core's datasets of `cls` for (train, valid, test), each of `num_samples`; a split
    with 0 samples is not built (and cannot hang on an empty one) and comes back as None."""
    for i, n in enumerate(num_samples):
        if n == 0:
            config.split_matrix[i] = None
    return tuple(Builder(cls, list(num_samples), lambda: True, config).build())


def indexed_blend(cfg: "DataConfig", prefix: Optional[str], vocab_size: int
                  ) -> Tuple[Tuple[List[str], Optional[List[float]]], str]:
    """(blend, index cache dir) of `data.path` (or of one prepared `prefix`), every file
    checked: the files first, before a cache folder is made beside them, then the token ids
    against `vocab_size`."""
    blend = ([prefix], None) if prefix is not None else parse_blend(cfg.path)
    for p in blend[0]:
        check_indexed(p)
    cache = index_cache_dir(cfg, blend[0][0])
    for p in blend[0]:
        check_indexed(p, vocab_size, cache_dir=cache)
    return blend, cache
