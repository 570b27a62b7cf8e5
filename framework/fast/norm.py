"""Triton LayerNorm / RMSNorm, forward and backward, for GPUs without apex or TE.

torch's native LayerNorm runs three kernels (forward, input gradient, and a separate gamma/beta
reduction that alone costs more than the forward; benchmarks/norm_kernels.py compares them, the
results are in benchmarks/RESULTS.md).
Here the forward is one kernel (fp32 statistics in registers, the mean and 1/std kept for
backward), and the backward is one kernel that writes the input gradient and accumulates the
weight and bias gradients per program in fp32, plus a small sum over the programs' partials.

`fused_norm(x, weight, bias, eps, rms)` takes x [..., n] (any leading shape; made contiguous),
weight [n] and bias [n] or None, and returns y in x's dtype; weight/bias gradients come back in
their own dtype. Statistics and all arithmetic are fp32, as in torch's kernels. `supported(x)`
says whether the kernel serves a tensor (CUDA, Triton importable, fp32/bf16/fp16, n <= 65536);
otherwise callers keep torch's `F.layer_norm` / `F.rms_norm`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's kernels are used
    triton = None

MAX_N = 65536


if triton is not None:
    @triton.jit
    def _norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                         RMS: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
                         ROWS: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        m = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(m, x - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=rmask)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_B:
            y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                         M, N, rows_per_prog, RMS: tl.constexpr, HAS_B: tl.constexpr,
                         BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_prog
        end = tl.minimum(start + rows_per_prog, M)
        for r0 in range(start, end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            rmask = rows < end
            m = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
                xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            if RMS:
                dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db_acc += tl.sum(dy, axis=0)
        tl.store(dw_ptr + pid * N + cols, dw_acc, mask=cmask)
        if HAS_B:
            tl.store(db_ptr + pid * N + cols, db_acc, mask=cmask)


def _tiles(n: int):
    block = triton.next_power_of_2(n)
    rows = max(1, min(16, 4096 // block))
    warps = 4 if block * rows <= 4096 else 8 if block * rows <= 16384 else 16
    return block, rows, warps


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """Backward programs per device: 4 per SM (asked once per device, not per call)."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests)
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        m_rows = x2.shape[0]
        y = torch.empty_like(x2)
        stats = torch.empty((2, m_rows), dtype=torch.float32, device=x.device)
        block, rows, warps = _tiles(n)
        _norm_fwd_kernel[(triton.cdiv(m_rows, rows),)](
            x2, weight, bias if bias is not None else weight, y, stats[0], stats[1], m_rows, n,
            eps, RMS=rms, HAS_B=bias is not None, BLOCK_N=block, ROWS=rows, num_warps=warps)
        ctx.save_for_backward(x2, weight, stats)
        ctx.rms, ctx.has_b, ctx.bias_dtype = rms, bias is not None, \
            bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, stats = ctx.saved_tensors
        m_rows, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        block, rows, warps = _tiles(n)
        progs = max(1, min(_programs(x2.device), triton.cdiv(m_rows, rows)))
        per = triton.cdiv(triton.cdiv(m_rows, progs), rows) * rows  # whole row tiles each
        progs = triton.cdiv(m_rows, per)
        part = torch.empty((2, progs, n), dtype=torch.float32, device=x2.device)
        _norm_bwd_kernel[(progs,)](
            dy2, x2, weight, stats[0], stats[1], dx, part[0], part[1], m_rows, n, per,
            RMS=ctx.rms, HAS_B=ctx.has_b, BLOCK_N=block, ROWS=rows, num_warps=warps)
        dw = part[0].sum(0).to(weight.dtype)
        db = part[1].sum(0).to(ctx.bias_dtype) if ctx.has_b else None
        return dx.view(dy.shape), dw, db, None, None


def supported(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.shape[-1] <= MAX_N
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def fused_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               rms: bool) -> torch.Tensor:
    """LayerNorm (rms=False) or RMSNorm (rms=True, bias must be None) over the last dim."""
    return _FusedNorm.apply(x, weight, bias, eps, rms)
