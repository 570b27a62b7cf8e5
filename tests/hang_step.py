"""A train-step plugin for tests: one rank stalls inside a collective that no other rank joins."""
import torch
import torch.distributed as dist

from framework.models.gpt.step import GPTTrainStep


class StallInCollective(GPTTrainStep):
    """On rank `rank`, the forward of micro-batch number `at` (1-based) enters an all-reduce on a
    group of every rank that the other ranks never enter, so it waits forever; they, in turn,
    wait inside the tensor-parallel all-reduces of their own forward pass."""

    def __init__(self, device, at: int, rank: int = 1):
        super().__init__(device)
        self.at, self.rank, self.calls = at, rank, 0
        self.group = dist.new_group(backend="gloo")  # every rank builds its train step

    def forward_step(self, data_iterator, model):
        self.calls += 1
        if self.calls == self.at and dist.get_rank() == self.rank:
            dist.all_reduce(torch.zeros(1), group=self.group)  # never completes
        return super().forward_step(data_iterator, model)
