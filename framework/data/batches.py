"""Micro-batches: `MicroBatchIterator` turns a dataset into this data-parallel rank's
micro-batches with the sample layout of Megatron-LM's `MegatronPretrainingSampler`, resumable from
`consumed_samples`; `collate` stacks samples into a batch."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from framework.errors import ConfigError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


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

    `num_workers > 0` loads samples in torch DataLoader worker processes. `pin_memory` returns
    each batch in page-locked host memory: its copy to the GPU (`non_blocking=True`) is then
    asynchronous, where a copy from pageable memory makes the host wait for the GPU's queued work.
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
        pin_memory: bool = False,
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
        self.pin_memory = pin_memory
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
            # its own generator: a DataLoader draws its workers' base seed from the global CPU
            # RNG otherwise, so a resumed run (which starts its iterator after restoring that
            # RNG) would draw different CPU random numbers than the run it continues. The
            # samples are deterministic either way; one pass over the indices, so no persistent
            # workers (evaluation builds a new iterator each time)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._indices, num_workers=self.num_workers,
                collate_fn=collate, generator=torch.Generator().manual_seed(0),
                pin_memory=self.pin_memory)
            return iter(loader)
        batches = (collate([self.dataset[i] for i in idx]) for idx in self._indices)
        if self.pin_memory:
            return ({k: v.pin_memory() for k, v in b.items()} for b in batches)
        return batches

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
