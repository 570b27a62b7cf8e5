"""Fused rotary position embedding (RoPE) for megatron-core without Transformer Engine.

mcore's unfused RoPE (`_apply_rotary_pos_emb_bshd`) runs about ten elementwise kernels per
tensor and direction (cos, sin, casts, chunk/neg/cat for rotate-half, two products, a sum, the
cat with the pass-through part) and holds their intermediates for backward. Here one Triton
kernel reads x and the angles and writes the rotated x; backward is the same kernel rotating by
the transpose. cos/sin are computed in fp32 in registers (mcore rounds them to the activation
dtype first, so results differ by bf16 rounding).

`framework.mcore_patches.install_fused_rope()` plugs `fused_rope` in where mcore looks for TE's
fused kernel (`rope_utils.fused_apply_rotary_pos_emb`, used when `config.apply_rope_fusion`);
`build_model` calls it for `model.rope_fusion` on GPU. Layout: t [s, b, n, d] (any strides with a unit last
stride), freqs [s, 1, 1, rot_dim] (rot_dim <= d, the rest of d passes through), non-interleaved
halves. Other cases (interleaved, CPU, other freqs shapes) take mcore's unfused function.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

ROWS = 16  # (s, b, n) rows per program


if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, f_ptr, o_ptr, total_rows, per_pos, heads,
                     sx_s, sx_b, sx_n, sf_s, so_s, so_b, so_n,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr,
                     PBLOCK: tl.constexpr, ROWS_: tl.constexpr, BACKWARD: tl.constexpr):
        # int64 offsets: position x stride can pass 2^31 for long sequences and wide layers
        rows = (tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)).to(tl.int64)
        rmask = rows < total_rows
        pos = rows // per_pos
        rem = rows % per_pos
        bi = rem // heads
        ni = rem % heads
        xrow = (pos * sx_s + bi * sx_b + ni * sx_n)[:, None]
        orow = (pos * so_s + bi * so_b + ni * so_n)[:, None]
        frow = (pos * sf_s)[:, None]
        i = tl.arange(0, BLOCK)[None, :]
        m = rmask[:, None] & (i < HALF)
        x1 = tl.load(x_ptr + xrow + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xrow + HALF + i, mask=m, other=0.0).to(tl.float32)
        f1 = tl.load(f_ptr + frow + i, mask=m, other=0.0).to(tl.float32)
        f2 = tl.load(f_ptr + frow + HALF + i, mask=m, other=0.0).to(tl.float32)
        c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
        if BACKWARD:  # the transpose of the forward rotation
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(o_ptr + orow + i, o1.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_ptr + orow + HALF + i, o2.to(o_ptr.dtype.element_ty), mask=m)
        if PASS > 0:  # dims past rot_dim (rotary_percent < 1) pass through unchanged
            j = tl.arange(0, PBLOCK)[None, :]
            mp = rmask[:, None] & (j < PASS)
            tl.store(o_ptr + orow + 2 * HALF + j,
                     tl.load(x_ptr + xrow + 2 * HALF + j, mask=mp, other=0.0), mask=mp)


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    s, b, n, d = x.shape
    rot = freqs.shape[-1]
    out = torch.empty((s, b, n, d), dtype=x.dtype, device=x.device)
    rows = s * b * n
    half, pass_ = rot // 2, d - rot
    _rope_kernel[(triton.cdiv(rows, ROWS),)](
        x, freqs, out, rows, b * n, n, x.stride(0), x.stride(1), x.stride(2), freqs.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        HALF=half, BLOCK=triton.next_power_of_2(half), PASS=pass_,
        PBLOCK=triton.next_power_of_2(max(pass_, 1)), ROWS_=ROWS, BACKWARD=backward)
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad):
        freqs, = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _launch(grad, freqs, backward=True), None


def fused_supported(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> bool:
    return (triton is not None and t.is_cuda and not interleaved and t.dim() == 4
            and freqs.dim() == 4 and freqs.shape[0] == t.shape[0] and freqs.shape[1] == 1
            and freqs.shape[2] == 1 and freqs.shape[-1] % 2 == 0
            and freqs.shape[-1] <= t.shape[-1] and t.stride(-1) == 1
            and freqs.stride(-1) == 1)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on t [s, b, n, d] with angles freqs [s, 1, 1, rot_dim]; same signature as TE's
    `fused_apply_rotary_pos_emb` (the `interleaved` layout takes mcore's unfused path)."""
    if not fused_supported(t, freqs, interleaved):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return _FusedRope.apply(t, freqs)
