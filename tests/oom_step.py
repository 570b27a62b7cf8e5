"""A train-step plugin for tests: one rank (or every rank) runs out of GPU memory in a forward."""
import torch
import torch.distributed as dist

from framework.models.gpt.step import GPTTrainStep

# torch 2.x's CUDA out-of-memory text, as the caching allocator words it
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 7.83 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    "which 3.12 GiB is free. Including non-PyTorch memory, this process has 76.06 GiB memory in "
    "use. Of the allocated memory 70.20 GiB is allocated by PyTorch, and 4.91 GiB is reserved "
    "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
    "#environment-variables)")


class OomAt(GPTTrainStep):
    """The forward of micro-batch number `at` (1-based) raises torch.OutOfMemoryError on rank
    `rank` (every rank when None)."""

    def __init__(self, device, at: int, rank=None):
        super().__init__(device)
        self.at, self.rank, self.calls = at, rank, 0

    def forward_step(self, data_iterator, model):
        self.calls += 1
        if self.calls == self.at and self.rank in (None, dist.get_rank()):
            raise torch.OutOfMemoryError(TORCH_OOM)
        return super().forward_step(data_iterator, model)
