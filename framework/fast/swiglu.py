"""SwiGLU forward and backward as one Triton kernel each (`model.swiglu_kernel`).

y = silu(a) * b, where fc1's output x = [a | b] is split in halves along the last dim, as
megatron-core's swiglu (`torch.chunk(x, 2, -1)`) splits it. Like mcore's fused SwiGLU
(fusions/fused_bias_swiglu.py) only x is kept for the backward. The difference is the backward:
mcore's compiled kernel computes the two halves' gradients and joins them with a cat; here one
pass reads x and dy once and writes dx = [da | db] once:

    s = sigmoid(a);  da = dy * b * s * (1 + a * (1 - s));  db = dy * a * s

Arithmetic in fp32, stored in x's dtype. CPU tensors (and installs without triton) take the
torch reference, which is also what the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path
    triton = None

BLOCK = 1024  # features per program


def swiglu_ref(x: torch.Tensor) -> torch.Tensor:
    """megatron-core's swiglu: silu of the first half times the second half."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


if triton is not None:
    @triton.jit
    def _swiglu_fwd(x_ptr, y_ptr, F_, BLOCK_: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_ + tl.arange(0, BLOCK_)
        mask = cols < F_
        xrow = x_ptr + row * 2 * F_
        a = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(xrow + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        y = a * tl.sigmoid(a) * b
        tl.store(y_ptr + row * F_ + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(x_ptr, dy_ptr, dx_ptr, F_, BLOCK_: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_ + tl.arange(0, BLOCK_)
        mask = cols < F_
        xrow = x_ptr + row * 2 * F_
        a = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(xrow + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = dy * b * s * (1.0 + a * (1.0 - s))
        db = dy * a * s
        dxrow = dx_ptr + row * 2 * F_
        tl.store(dxrow + cols, da.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dxrow + F_ + cols, db.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(x2: torch.Tensor) -> torch.Tensor:
    rows, f = x2.shape[0], x2.shape[1] // 2
    y = torch.empty((rows, f), dtype=x2.dtype, device=x2.device)
    if rows:
        _swiglu_fwd[(rows, triton.cdiv(f, BLOCK))](x2, y, f, BLOCK_=BLOCK, num_warps=4)
    return y


def _launch_bwd(x2: torch.Tensor, dy2: torch.Tensor) -> torch.Tensor:
    rows, f = dy2.shape
    dx = torch.empty_like(x2)
    if rows:
        _swiglu_bwd[(rows, triton.cdiv(f, BLOCK))](x2, dy2, dx, f, BLOCK_=BLOCK, num_warps=4)
    return dx


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return _launch_fwd(x2).view(*lead, x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if not dy2.is_contiguous():
            dy2 = dy2.contiguous()
        return _launch_bwd(x2, dy2).view(ctx.shape)


def supported(x: torch.Tensor) -> bool:
    """The kernel's domain: a CUDA tensor of a float dtype the kernels store (fp32, bf16, fp16)
    with an even last dim, triton installed."""
    return (triton is not None and x.is_cuda and x.shape[-1] % 2 == 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for x = [a | b] (last dim): the Triton kernels where `supported`, else the
    torch reference."""
    if not supported(x):
        return swiglu_ref(x)
    if torch.compiler.is_compiling():  # model.torch_compile: our own kernels, a graph break
        return _swiglu_eager(x)
    return _SwiGLU.apply(x)


@torch.compiler.disable
def _swiglu_eager(x):
    return _SwiGLU.apply(x)
