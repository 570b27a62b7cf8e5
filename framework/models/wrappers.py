"""What `build_model` puts around each model chunk, and how to get the chunk back.

`wrap` adds megatron-core's `Float16Module` (bf16/fp16: without it torch's LayerNorm runs in fp32
and the next matmul fails on mixed dtypes) and, on GPU, mcore's `DistributedDataParallel`;
`unwrap` strips whatever wrappers a module has (DDP, Float16Module).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch

if TYPE_CHECKING:  # annotations only
    from framework.config import ParallelConfig


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def wrap(chunks: List[torch.nn.Module], tcfg, parallel_cfg: "ParallelConfig", *, half: bool,
         ddp: bool) -> List[torch.nn.Module]:
    """`Float16Module` when `half` (bf16 or fp16), then mcore's DDP when `ddp` (GPU)."""
    if half:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(tcfg, m) for m in chunks]
    if ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
            overlap_param_gather=parallel_cfg.overlap_param_gather,
            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=None if not parallel_cfg.overlap_grad_reduce else 40_000_000,
        )
        chunks = [
            DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=m,
                                    disable_bucketing=(i > 0))
            for i, m in enumerate(chunks)
        ]
    return chunks
