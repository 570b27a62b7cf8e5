"""Bias add after a linear layer as one Triton kernel.

megatron-core's linear layers add a bias that is not deferred to a later fusion (the QKV
projection's) as `output + bias` after the GEMM. torch runs that broadcast add through its
generic strided elementwise kernel, a visible part of the training step in profiles
(benchmarks/norm_kernels.py and the profile in benchmarks/RESULTS.md). This kernel reads the output
once and writes it once with vectorised loads. Backward is torch's: the gradient passes through and the bias gradient is a
row sum, as in mcore.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's add is used
    triton = None

BLOCK = 4096


if triton is not None:
    @triton.jit
    def _bias_add_kernel(x_ptr, b_ptr, y_ptr, total, n, BLOCK_: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_ + tl.arange(0, BLOCK_)
        m = offs < total
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs % n, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x + b).to(y_ptr.dtype.element_ty), mask=m)


class _BiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        xc = x.contiguous()
        y = torch.empty_like(xc)
        total = xc.numel()
        _bias_add_kernel[(triton.cdiv(total, BLOCK),)](xc, bias, y, total, bias.numel(),
                                                       BLOCK_=BLOCK, num_warps=8)
        ctx.n, ctx.bias_dtype = bias.numel(), bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        return dy, dy.reshape(-1, ctx.n).sum(0).to(ctx.bias_dtype)


def bias_add(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + bias over x's last dim; the Triton kernel on CUDA, torch's add elsewhere."""
    if (triton is not None and x.is_cuda and bias.dim() == 1 and x.shape[-1] == bias.numel()
            and bias.dtype == x.dtype and bias.is_contiguous()):
        return _BiasAdd.apply(x, bias)
    return x + bias
