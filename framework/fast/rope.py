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

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

ROWS = 16  # (s, b, n) rows per program


if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, f_ptr, o_ptr, total_rows, per_pos, heads,
                     sx_s, sx_b, sx_n, sf_s, so_s, so_b, so_n, hpg_x, sx_g, hpg_o, so_g,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr,
                     PBLOCK: tl.constexpr, ROWS_: tl.constexpr, BACKWARD: tl.constexpr):
        # int64 offsets: position x stride can pass 2^31 for long sequences and wide layers.
        # Head ni of x is head ni % hpg_x of group ni // hpg_x (stride sx_g), and likewise for
        # the output (hpg_o, so_g): the query heads of mcore's fused QKV output sit in groups
        # [q.. k v | q.. k v | ...]; a plain [s, b, n, d] tensor has one group (hpg = n)
        rows = (tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)).to(tl.int64)
        rmask = rows < total_rows
        pos = rows // per_pos
        rem = rows % per_pos
        bi = rem // heads
        ni = rem % heads
        xrow = (pos * sx_s + bi * sx_b + (ni // hpg_x) * sx_g + (ni % hpg_x) * sx_n)[:, None]
        orow = (pos * so_s + bi * so_b + (ni // hpg_o) * so_g + (ni % hpg_o) * so_n)[:, None]
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


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool,
            out: Optional[torch.Tensor] = None, groups: Optional[Tuple[int, int, int]] = None,
            out_groups: Optional[Tuple[int, int, int]] = None,
            shape: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """Rotate x [s, b, n, d] (unit last stride) by freqs [s, 1, 1, rot] into `out` (a new
    contiguous tensor by default; any strides with a unit last one). `groups` = (heads per
    group, group stride, head stride): x's head i is head i % hpg of group i // hpg, and
    `shape` the [s, b, n, d] so addressed, so x may be a whole fused QKV output whose query
    heads are rotated (the kernel is handed the whole tensor it touches: torch.compile copies
    only what a kernel's arguments declare); `out_groups` the same for `out`."""
    s, b, n, d = shape or x.shape
    rot = freqs.shape[-1]
    if out is None:
        out = torch.empty((s, b, n, d), dtype=x.dtype, device=x.device)
    hpg_x, sx_g, sx_n = groups or (n, 0, x.stride(2))
    hpg_o, so_g, so_n = out_groups or (n, 0, out.stride(2))
    rows = s * b * n
    half, pass_ = rot // 2, d - rot
    _rope_kernel[(triton.cdiv(rows, ROWS),)](
        x, freqs, out, rows, b * n, n, x.stride(0), x.stride(1), sx_n, freqs.stride(0),
        out.stride(0), out.stride(1), so_n, hpg_x, sx_g, hpg_o, so_g,
        HALF=half, BLOCK=triton.next_power_of_2(half), PASS=pass_,
        PBLOCK=triton.next_power_of_2(max(pass_, 1)), ROWS_=ROWS, BACKWARD=backward)
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, backward=False)

    @staticmethod
    @once_differentiable
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


# --------------------------------------------------------------------------------------------
# RoPE on megatron-core's fused QKV output
# --------------------------------------------------------------------------------------------
class _FusedQKVRope(torch.autograd.Function):
    """(q, k, v) from mcore's fused QKV projection output, with RoPE on q and k.

    mcore splits mixed [s, b, g, (qpg + 2) * d] into views, copies the query heads into a
    contiguous [s, b, g * qpg, d] (they are not one stride apart), rotates q and k in two more
    kernels, and in backward rotates the two gradients back and concatenates the three into the
    mixed gradient (one more pass). Here the forward reads the query and key heads where they
    lie and writes them rotated (two kernels; v one copy), and the backward writes the rotated-
    back gradients straight into the mixed gradient. Same rotation kernel and arithmetic as
    `fused_rope`, so q and k are bit-identical to mcore's split followed by `fused_rope`."""

    @staticmethod
    def forward(ctx, mixed, q_freqs, k_freqs, qpg):
        s, b, g, w = mixed.shape
        d = w // (qpg + 2)
        mixed = mixed.contiguous()
        q = _launch(mixed, q_freqs, False, groups=(qpg, w, d), shape=(s, b, g * qpg, d))
        k = _launch(mixed[..., qpg * d:(qpg + 1) * d], k_freqs, False)
        v = mixed[..., (qpg + 1) * d:].contiguous()
        ctx.save_for_backward(q_freqs, k_freqs)
        ctx.qpg, ctx.shape = qpg, (s, b, g, w)
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        q_freqs, k_freqs = ctx.saved_tensors
        qpg, (s, b, g, w) = ctx.qpg, ctx.shape
        d = w // (qpg + 2)
        dtype = next(t.dtype for t in (dq, dk, dv) if t is not None)
        device = next(t.device for t in (dq, dk, dv) if t is not None)
        dmixed = torch.empty((s, b, g, w), dtype=dtype, device=device)
        if dq is None:
            dmixed[..., :qpg * d].zero_()
        else:
            _launch(dq if dq.stride(-1) == 1 else dq.contiguous(), q_freqs, True, out=dmixed,
                    out_groups=(qpg, w, d))
        k_slot = dmixed[..., qpg * d:(qpg + 1) * d]
        if dk is None:
            k_slot.zero_()
        else:
            _launch(dk if dk.stride(-1) == 1 else dk.contiguous(), k_freqs, True, out=k_slot)
        v_slot = dmixed[..., (qpg + 1) * d:]
        if dv is None:
            v_slot.zero_()
        else:
            v_slot.copy_(dv)
        return dmixed, None, None, None


def fused_qkv_rope_supported(on_cuda: bool, seq: int, head_dim: int, q_freqs: torch.Tensor,
                             k_freqs: torch.Tensor) -> bool:
    """Whether `fused_qkv_rope` serves a fused QKV output of `seq` positions and heads of
    `head_dim` (on CUDA, with Triton): non-interleaved angles [seq, 1, 1, rot] with an even rot
    <= head_dim and a unit last stride, as `fused_rope` takes them."""
    return triton is not None and on_cuda and all(
        f.dim() == 4 and f.shape[0] == seq and f.shape[1] == 1 and f.shape[2] == 1
        and f.shape[-1] % 2 == 0 and f.shape[-1] <= head_dim and f.stride(-1) == 1
        for f in (q_freqs, k_freqs))


def fused_qkv_rope(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                   qpg: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [s, b, g * qpg, d], k [s, b, g, d], v [s, b, g, d]) from mcore's fused QKV output
    mixed [s, b, g, (qpg + 2) * d] (per group: qpg query heads, one key, one value head), q
    rotated by q_freqs and k by k_freqs ([s, 1, 1, rot], non-interleaved halves); needs
    `fused_qkv_rope_supported` (CUDA; the CPU tests run it under Triton's interpreter)."""
    return _FusedQKVRope.apply(mixed, q_freqs, k_freqs, qpg)
