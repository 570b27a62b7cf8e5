"""Glue between the data layer and the loop: the model family's datasets as resumable iterators."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List

from framework.data.batches import MicroBatchIterator

if TYPE_CHECKING:  # annotations only
    from framework.config import DataConfig, ModelConfig, TrainConfig
    from framework.models.spec import ModelParts


@dataclass
class TrainData:
    train: Any
    valid: Any
    micro_batch_size: int
    global_batch_size: int
    dp_rank: int
    dp_size: int
    num_workers: int = 0  # data.num_workers: DataLoader worker processes per iterator
    pin_memory: bool = False  # batches in page-locked memory (data.pin_memory, on a GPU)

    def _iters(self, ds, n: int, consumed: int) -> List[Any]:
        return [iter(MicroBatchIterator(ds, micro_batch_size=self.micro_batch_size,
                                        global_batch_size=self.global_batch_size,
                                        dp_rank=self.dp_rank, dp_size=self.dp_size,
                                        consumed_samples=consumed,
                                        num_workers=self.num_workers,
                                        pin_memory=self.pin_memory))
                for _ in range(n)]

    def train_iterators(self, n_chunks: int, consumed_samples: int) -> List[Any]:
        return self._iters(self.train, n_chunks, consumed_samples)

    def valid_iterators(self, n_chunks: int) -> List[Any]:
        """Evaluation always starts at the beginning of the validation split (comparable)."""
        return self._iters(self.valid, n_chunks, 0)


def build_train_data(data_cfg: "DataConfig", tokenizer, train_cfg: "TrainConfig",
                     model_cfg: "ModelConfig", parts: "ModelParts", *, dp_rank: int,
                     dp_size: int, on_gpu: bool = False) -> TrainData:
    """The datasets of the model family (`parts.datasets`), sized for `train.max_steps` and the
    evaluation, as this data-parallel rank's iterators. `on_gpu`: the batches go to a GPU, so
    `data.pin_memory` (null = on) pins them."""
    gbs = train_cfg.global_batch_size
    n_eval = gbs * train_cfg.eval_iters if train_cfg.eval_interval else 0
    num_samples = (train_cfg.max_steps * gbs, n_eval, 0)
    train, valid, _test = parts.datasets(data_cfg, tokenizer, model_cfg, seed=train_cfg.seed,
                                         num_samples=num_samples,
                                         cache_dir=data_cfg.path_to_cache)
    return TrainData(train, valid if n_eval else None, train_cfg.micro_batch_size, gbs,
                     dp_rank, dp_size, num_workers=data_cfg.num_workers,
                     pin_memory=on_gpu and data_cfg.pin_memory is not False)
