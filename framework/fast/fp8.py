"""FP8 GEMMs for training without Transformer Engine (`train.fp8`).

The two recipes are torchao's float8 training recipes, rebuilt on `torch._scaled_mm` with our own
scaling and cast kernels so that they run eagerly (torchao's casts are plain torch ops that only
become fast under torch.compile) and inside megatron-core's tensor-parallel linear layers:

* `tensorwise`: one scale per tensor, from the tensor's current amax (dynamic scaling).
  Activations and weights in e4m3, gradients in e5m2. cuBLAS's FP8 GEMM; fast accumulation in
  the forward GEMM only (torchao's default).
* `delayed`: tensorwise, with each tensor's scale taken from the max of its amaxes over the last
  `HISTORY` steps (Transformer Engine's default recipe) instead of its current amax. The cast
  then needs no amax pass before it: the cast kernel records the tensor's finite amax as it
  casts (for the next steps) and saturates values beyond the format's max; a history of zeros
  scales by 1. A tensor's first cast (no history yet) takes its current amax. The histories live in one buffer per model chunk
  (`Fp8History`), rolled once per step by the training loop and kept in checkpoints with the RNG
  states (not in the model's state dict, which stays the bf16 model's).
* `rowwise`: one scale per row of each GEMM operand, taken along the GEMM's reduction dim; e4m3
  everywhere. The forward GEMM runs the rowwise kernel with fast accumulation; the two backward
  GEMMs run the tensorwise kernel with unit scales and apply the row scales to its output
  (torchao does the same: the rowwise kernel without fast accumulation is slow).

Scales are powers of two, the largest that keep |x| * scale <= the format's max. x * scale and
the dequantisation are then exact, so an FP8 value depends only on x and the amax: the Triton
cast (GPU) and the torch reference (`quantise_ref`, CPU) give the same bits, and a layer split
over TP ranks gives the same FP8 values as the whole layer once the amax is reduced over TP.
(A power-of-two scale moves values between binades without changing their relative rounding,
so per-row scales differ from one per tensor only where a tensor's values span more than the
format's range: the small ones of a row fall into subnormals or to zero under the tensor's scale.
The recipes' other difference is the gradients' format.)

Layout: `torch._scaled_mm(a, b)` wants `a` row-major [m, k] and `b` column-major [k, n]. Every
operand is therefore made as a row-major [rows, k] FP8 tensor quantised along its last dim (k =
the reduction dim of its GEMM) and `b` is passed as its `.t()`:

    forward  y [M, N]  = x [M, K]    . w [N, K]^T
    dgrad    dx [M, K] = dy [M, N]   . (w^T) [K, N]^T
    wgrad    dw [N, K] = dy^T [N, M] . (x^T) [K, M]^T

so the cast kernel writes a tensor and/or its transpose in one pass. On CPU the GEMM is
emulated (`mm8`: dequantise to fp32, fp32 matmul), which the CPU tests use; training itself
refuses FP8 without a GPU that has it (framework/plan.py).

TP: a per-tensor amax is all-reduced (max) over the TP group wherever the tensor is split over
ranks (weights; a sequence-parallel input before its FP8 all-gather; a row-parallel input; a
column-parallel output gradient); a per-row amax wherever the row's reduction dim is split
(`_Fp8Linear`'s comments say which).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference casts
    triton = None

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# both formats' largest finite value is 1.75 * 2**EMAX (448 and 57344)
EMAX = {E4M3: 8, E5M2: 15}
RECIPES = ("tensorwise", "delayed", "rowwise")
GRAD_DTYPE = {"tensorwise": E5M2, "delayed": E5M2, "rowwise": E4M3}
# delayed: steps of amax history per tensor (a power of two: the cast kernel loads them all)
HISTORY = 16
X, W, DY = 0, 1, 2  # a linear's three cast tensors: rows of its history
# MLP activations the cast kernel can compute on the way in (`act_ref`): fc2's input cast from
# fc1's output, so the activation is never stored in bf16 (recipe delayed: the scale is known
# before the tensor exists). Bias + tanh-GeLU only: a SwiGLU form (two loads per tile) wrote
# wrong bytes into the transposed output on the H200 (test_gpu_fp8, 2026-12-04) and was
# withdrawn
ACTS = ("gelu_tanh",)
AMAX_FLOOR = 2.0 ** -100  # an all-zero tensor gets a finite scale
BLOCK_M, BLOCK_K = 64, 64
# the cast kernels' tiles, (rows, columns, warps) of one Triton program: `cast` and
# `act_backward_cast`. Not tuned yet: benchmarks/fp8_cast_tiles.py times others on the GPU (the
# casts' FP8 bits do not depend on the tile; the fp32 column sums they make for bias gradients
# do, through their summation order). FP8_CAST_TILES="cast=128x64x8,act_bwd=64x64x4"
# in the environment sets them for a benchmark's A/B run (`cast_tiles`).
TILES = {"cast": (BLOCK_M, BLOCK_K, 4), "act_bwd": (BLOCK_M, BLOCK_K, 4)}
TILE_SIZES, TILE_WARPS = (16, 32, 64, 128, 256), (1, 2, 4, 8, 16)


def parse_tiles(text: str, what: str = "FP8_CAST_TILES") -> dict:
    """{kernel: (rows, columns, warps)} from "cast=128x64x8,act_bwd=64x64x4" (either may be left
    out); a bad entry is a ValueError naming `what`."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, dims = item.partition("=")
        try:
            tile = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            tile = ()
        if name.strip() not in TILES or len(tile) != 3 or tile[0] not in TILE_SIZES or \
                tile[1] not in TILE_SIZES or tile[2] not in TILE_WARPS:
            raise ValueError(
                f"{what}: {item!r} is not <kernel>=<rows>x<columns>x<warps> with kernel one of "
                f"{', '.join(TILES)}, rows and columns in {TILE_SIZES}, warps in {TILE_WARPS}")
        out[name.strip()] = tile
    return out


_env_tiles: Optional[dict] = None


def cast_tiles() -> dict:
    """TILES with FP8_CAST_TILES from the environment over them (read once a process)."""
    global _env_tiles
    if _env_tiles is None:
        _env_tiles = {**TILES, **parse_tiles(os.environ.get("FP8_CAST_TILES", ""))}
    return _env_tiles
# amax_of: elements per step of one Triton program, and the most programs (partial maxima)
AMAX_BLOCK, AMAX_PARTS = 8192, 1024


# --------------------------------------------------------------------------------------------
# scales
# --------------------------------------------------------------------------------------------
def pow2_scale(amax: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1/scale): the largest power of two with amax * scale <= the max of `dtype`, from
    the bits of amax (exact; the Triton kernel computes the same integers)."""
    bits = amax.float().clamp(min=AMAX_FLOOR).contiguous().view(torch.int32)
    e = (bits >> 23) - 127  # amax >= 0: no sign bit
    p = EMAX[dtype] - e - ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)  # mantissa > 1.75
    p = p.clamp(-126, 126)
    return ((p + 127) << 23).view(torch.float32), ((127 - p) << 23).view(torch.float32)


def amax_of(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """max |x| over the whole tensor (dim=None) or along `dim`: one reduction kernel, no |x|
    copy; exact for finite x. (A NaN in x is dropped by the Triton pass and kept by torch's
    reduction; either way it reaches the FP8 tensor as NaN, and so the loss.)

    Whole tensor on CUDA: the partial maxima of one Triton pass ([P] fp32, P a power of two
    <= AMAX_PARTS), whose max is the amax. They are not reduced further: the cast kernel reads
    all P (from L2), and a TP all-reduce (max) of them elementwise keeps their max the global
    one. (One launch, no second reduction kernel; `benchmarks/fp8_linear.py --parts` times it
    against torch's reduction.)"""
    if dim is None and triton is not None and x.is_cuda and x.is_contiguous():
        n = x.numel()
        blocks = max(1, triton.cdiv(n, AMAX_BLOCK))
        parts = min(AMAX_PARTS, triton.next_power_of_2(blocks))
        out = torch.empty(parts, dtype=torch.float32, device=x.device)
        _amax_kernel[(parts,)](x, out, n, parts, triton.cdiv(blocks, parts), BLOCK=AMAX_BLOCK,
                               num_warps=8)
        return out
    return torch.linalg.vector_norm(x, float("inf"), dim=dim)


def whole_amax(amax: torch.Tensor) -> torch.Tensor:
    """The amax of a whole tensor from `amax_of`'s result (a scalar or partial maxima)."""
    return amax.max() if amax.dim() > 0 else amax


def _reduce_max(amax: torch.Tensor, group, partials: bool = False) -> torch.Tensor:
    """All-reduce (max) an amax over `group`. `partials`: amax is `amax_of`'s partial maxima
    of a whole tensor, taken to one value first (ranks' shards may differ in size)."""
    if group is not None:
        if partials:
            amax = whole_amax(amax)
        if not amax.is_cuda:
            amax = amax.float()  # gloo: no bf16 max
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


# --------------------------------------------------------------------------------------------
# casts
# --------------------------------------------------------------------------------------------
def quantise_ref(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, axis: Optional[int],
                 saturate: bool = False):
    """The reference cast of a 2-D x: (x8, inv_scale) with x8 = fp8(x * scale). axis None: one
    scale (amax a scalar, or `amax_of`'s partial maxima); 1: one per row (amax [m]); 0: one per
    column (amax [k]). `saturate`: values beyond the format's max (an amax from earlier steps)
    become +-max."""
    amax = whole_amax(amax) if axis is None else amax
    if saturate:  # a history of zeros (a tensor all zero so far): scale 1, as the kernel does
        amax = torch.where(amax > 0, amax, torch.finfo(dtype).max)
    scale, inv = pow2_scale(amax, dtype)
    s = scale if axis is None else scale[:, None] if axis == 1 else scale[None, :]
    y = x.float() * s
    if saturate:
        fmax = torch.finfo(dtype).max
        y = torch.where(y.isnan(), y, y.clamp(-fmax, fmax))
    return y.to(dtype), inv


def act_ref(h: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """The activation `act` of fc1's output h in fp32: megatron-core's bias + tanh-GeLU
    (fusions/fused_bias_gelu.py)."""
    assert act == "gelu_tanh", act
    h = h.float()
    if bias is not None:
        h = h + bias.float()
    return h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1.0 + 0.044715 * h * h)))


def act_backward(h: torch.Tensor, bias: Optional[torch.Tensor], act: str, da: torch.Tensor):
    """(dh, dbias or None) for `act_ref(h, bias, act)` given its gradient da, in h's dtype. CUDA:
    the kernel the unfused layer runs (mcore's jit-fused bias-GeLU backward); elsewhere autograd
    through the fp32 reference."""
    if h.is_cuda and bias is not None:
        from megatron.core.fusions.fused_bias_gelu import bias_gelu_back

        dh = bias_gelu_back(da, bias, h)
        return dh, dh.sum(0)
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        bb = None if bias is None else bias.detach().requires_grad_(True)
        grads = torch.autograd.grad(act_ref(hh, bb, act), [hh] + ([bb] if bb is not None else []),
                                    da.float())
    return grads[0], (grads[1] if bias is not None else None)


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite values of x (what a delayed history records: one inf or NaN
    would otherwise spoil the scales of the next HISTORY steps, not just this step's loss)."""
    a = x.detach().abs().float()
    return torch.where(a.isfinite(), a, 0.0).max() if a.numel() else a.new_zeros(())


if triton is not None:
    @triton.jit
    def _pow2(amax, EMAX_: tl.constexpr):
        a = tl.maximum(amax, 7.888609052210118e-31, propagate_nan=tl.PropagateNan.ALL)  # 2**-100
        bits = a.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 127
        p = EMAX_ - e - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        p = tl.minimum(tl.maximum(p, -126), 126)
        return ((p + 127) << 23).to(tl.float32, bitcast=True), \
            ((127 - p) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _tile(M, K, BM: tl.constexpr, BK: tl.constexpr):
        # this program's [BM, BK] tile of an [M, K] tensor: its program ids, row and column
        # indices, their in-bounds masks and the tile's mask
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rk = pid_k * BK + tl.arange(0, BK)
        mm = rm < M
        mk = rk < K
        return pid_m, pid_k, rm, rk, mm, mk, mm[:, None] & mk[None, :]

    @triton.jit
    def _amax_kernel(x_ptr, out_ptr, N, P, ITERS, BLOCK: tl.constexpr):
        # program p of P: max |x| over the blocks p, p + P, p + 2P, ... of the flat x -> out[p]
        pid = tl.program_id(0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, ITERS):
            offs = (pid + i * P).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + pid, tl.max(acc, axis=0))

    @triton.jit
    def _cast_kernel(x_ptr, amax_ptr, q_ptr, qt_ptr, inv_ptr, amax_out_ptr, b_ptr, M, K,
                     stride_m, EMAX_: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     NPARTS: tl.constexpr, DELAYED: tl.constexpr, ACT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, TRANS: tl.constexpr = True, sums_ptr=None,
                     SUMS: tl.constexpr = False):
        # one [BM, BK] tile of x [M, K]; MODE 0: one scale (amax_ptr: NPARTS partial maxima),
        # 1: per row, 2: per column. ROWS writes q [M, K], COLS writes qt = q^T [K, M].
        # DELAYED (MODE 0; amax_ptr: an amax history): saturate at the format's max, and max the
        # tile's finite amax into amax_out_ptr.
        # ACT: the tensor cast is an MLP activation of what x_ptr holds, computed here in fp32:
        # 0 none; 1 tanh-GeLU of x (+ the bias b_ptr [K] with HAS_BIAS)
        # SUMS (ACT 0): the tile's column sums of x in fp32 into sums_ptr[pid_m, :] (a layer's
        # bias gradient from its output gradient, summed over the row blocks afterwards in a
        # fixed order: no atomics, so runs repeat bit for bit)
        pid_m, pid_k, rm, rk, mm, mk, mask = _tile(M, K, BM, BK)
        xp = x_ptr + rm[:, None].to(tl.int64) * stride_m + rk[None, :]
        x = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        if SUMS:  # masked-out elements loaded as 0
            tl.store(sums_ptr + pid_m.to(tl.int64) * K + rk, tl.sum(x, axis=0), mask=mk)
        if HAS_BIAS:
            x = x + tl.load(b_ptr + rk, mask=mk, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # x * (1 + tanh(z)) / 2 = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
            x = x * tl.sigmoid(1.5957691216057308 * x * (1.0 + 0.044715 * x * x))
        if MODE == 0:
            parts = tl.load(amax_ptr + tl.arange(0, NPARTS)).to(tl.float32)
            amax = tl.max(parts, axis=0)
            if DELAYED:  # a history of zeros (the tensor all zero so far): scale 1
                amax = tl.where(amax > 0, amax, 1.75 * (2.0 ** EMAX_))
            scale, inv = _pow2(amax, EMAX_)
            y = x * scale
            if pid_m == 0:
                if pid_k == 0:
                    tl.store(inv_ptr, inv)
        elif MODE == 1:
            scale, inv = _pow2(tl.load(amax_ptr + rm, mask=mm, other=1.0).to(tl.float32), EMAX_)
            y = x * scale[:, None]
            if pid_k == 0:
                tl.store(inv_ptr + rm, inv, mask=mm)
        else:
            scale, inv = _pow2(tl.load(amax_ptr + rk, mask=mk, other=1.0).to(tl.float32), EMAX_)
            y = x * scale[None, :]
            if pid_m == 0:
                tl.store(inv_ptr + rk, inv, mask=mk)
        if DELAYED:
            # (masked: a tile's rows / columns beyond the tensor hold gelu(bias) with ACT)
            a = tl.where(mask, tl.abs(x), 0.0)
            tl.atomic_max(amax_out_ptr, tl.max(tl.max(tl.where(a < float("inf"), a, 0.0),
                                                      axis=1), axis=0))
            fmax = 1.75 * (2.0 ** EMAX_)
            y = tl.minimum(tl.maximum(y, -fmax, propagate_nan=tl.PropagateNan.ALL), fmax,
                           propagate_nan=tl.PropagateNan.ALL)
        # round to nearest even, as torch's cast (current scales: no value exceeds the max)
        if ROWS:
            tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                     y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        if COLS:
            if TRANS:  # transposed in fp32, then rounded: the same bits
                tl.store(qt_ptr + rk[:, None].to(tl.int64) * M + rm[None, :],
                         tl.trans(y).to(qt_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                         mask=mk[:, None] & mm[None, :])
            else:  # the same tile stored through transposed addresses (no tl.trans)
                tl.store(qt_ptr + rk[None, :].to(tl.int64) * M + rm[:, None],
                         y.to(qt_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


if triton is not None:
    @triton.jit
    def _act_bwd_cast_kernel(h_ptr, da_ptr, b_ptr, dh_ptr, hist_ptr, q_ptr, qt_ptr, inv_ptr,
                             amax_out_ptr, dbias_ptr, M, K, stride_h, stride_da,
                             EMAX_: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                             NPARTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                             STORE_DH: tl.constexpr = True):
        # one [BM, BK] tile of the MLP activation's backward, fused with the delayed cast of its
        # result (fc1's output gradient): dh = gelu'(h + b) * da in fp32 (megatron-core's
        # bias_gelu_back), rounded to dh's dtype and stored (autograd's gradient of fc1's
        # output), then that rounded dh scaled by the amax history hist_ptr (NPARTS entries),
        # saturated and cast into q [M, K] and qt = q^T [K, M]; the tile's finite amax maxed
        # into amax_out_ptr, its column sums (the bias gradient) into dbias_ptr[pid_m, :] (fp32
        # partials, summed in a fixed order afterwards: no atomics, so runs repeat bit for bit).
        # STORE_DH False: dh is rounded but not stored (its only reader, fc1's backward, takes
        # the casts: a quarter of the kernel's memory traffic)
        pid_m, pid_k, rm, rk, mm, mk, mask = _tile(M, K, BM, BK)
        x = tl.load(h_ptr + rm[:, None].to(tl.int64) * stride_h + rk[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + tl.load(b_ptr + rk, mask=mk, other=0.0).to(tl.float32)[None, :]
        g = tl.load(da_ptr + rm[:, None].to(tl.int64) * stride_da + rk[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        # tanh(u) = 2 sigmoid(2u) - 1, u = sqrt(2/pi) x (1 + 0.044715 x^2)
        t = 2.0 * tl.sigmoid(1.5957691216057308 * x * (1.0 + 0.044715 * x * x)) - 1.0
        ff = 0.5 * x * ((1.0 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1.0 + t)
        dh = (ff * g).to(dh_ptr.dtype.element_ty)
        if STORE_DH:
            tl.store(dh_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], dh, mask=mask)
        y = tl.where(mask, dh.to(tl.float32), 0.0)
        tl.store(dbias_ptr + pid_m.to(tl.int64) * K + rk, tl.sum(y, axis=0), mask=mk)
        parts = tl.load(hist_ptr + tl.arange(0, NPARTS)).to(tl.float32)
        amax = tl.max(parts, axis=0)
        amax = tl.where(amax > 0, amax, 1.75 * (2.0 ** EMAX_))  # a history of zeros: scale 1
        scale, inv = _pow2(amax, EMAX_)
        if pid_m == 0:
            if pid_k == 0:
                tl.store(inv_ptr, inv)
        a = tl.abs(y)
        tl.atomic_max(amax_out_ptr, tl.max(tl.max(tl.where(a < float("inf"), a, 0.0), axis=1),
                                           axis=0))
        fmax = 1.75 * (2.0 ** EMAX_)
        q = tl.minimum(tl.maximum(y * scale, -fmax, propagate_nan=tl.PropagateNan.ALL), fmax,
                       propagate_nan=tl.PropagateNan.ALL)
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                 q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(qt_ptr + rk[:, None].to(tl.int64) * M + rm[None, :],
                 tl.trans(q).to(qt_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=mk[:, None] & mm[None, :])


def cast(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, axis: Optional[int],
         rows: bool = True, cols: bool = False, amax_out: Optional[torch.Tensor] = None,
         act: Optional[str] = None, act_bias: Optional[torch.Tensor] = None,
         _trans: bool = True, tile: Optional[Tuple[int, int, int]] = None,
         sums_out: Optional[torch.Tensor] = None):
    """Quantise a 2-D x with the scales of `amax` (see `quantise_ref` for axis). Returns
    (x8 [m, k] or None, x8^T [k, m] or None, inv_scale). One Triton pass on CUDA; torch's
    reference (same bits) elsewhere. `amax_out` (one scale, `amax` a delayed history): the
    values saturate, and x's finite amax is maxed into amax_out ([1] fp32). `act` (with
    `amax_out`): quantise `act_ref(x, act_bias, act)` instead of x, computed in the same pass
    in fp32 (never stored in x's dtype). `_trans=False` (GPU tests): the kernel stores the
    transposed output through transposed addresses instead of `tl.trans`. `tile`: the Triton
    program's (rows, columns, warps), default `cast_tiles()["cast"]`; the bits do not depend
    on it. `sums_out` (no `act`): a [k] fp32 tensor that receives x's column sums, from the same
    pass over x (a linear's bias gradient from its output gradient: one fp32 partial sum per row
    block, then their sum in a fixed order: the same bits in every run at one tile; another
    tile sums in another order, which may change the last fp32 bit)."""
    assert act is None or (amax_out is not None and act in ACTS), act
    assert sums_out is None or act is None
    if not (triton is not None and x.is_cuda):
        if sums_out is not None:
            torch.sum(x.float(), 0, out=sums_out)
        if act is not None:
            x = act_ref(x, act_bias, act)
        q, inv = quantise_ref(x, amax, dtype, axis, saturate=amax_out is not None)
        if amax_out is not None:
            torch.maximum(amax_out, finite_amax(x), out=amax_out)
        return (q if rows else None), (q.t().contiguous() if cols else None), inv
    if cols and x.dtype == torch.float32:
        # from an fp32 input the kernel's transposed output held wrong bytes on an H200 (both
        # store forms; its rows were exact: tests/test_gpu_fp8.py,
        # test_cast_transpose_by_input_dtype): the rows, then torch's transpose
        q, _, inv = cast(x, amax, dtype, axis, True, False, amax_out, act, act_bias, _trans,
                         tile, sums_out)
        return (q if rows else None), q.t().contiguous(), inv
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device) if rows else None
    qt = torch.empty((k, m), dtype=dtype, device=x.device) if cols else None
    inv = torch.empty(() if axis is None else (m if axis == 1 else k), dtype=torch.float32,
                      device=x.device)
    mode = 0 if axis is None else 1 if axis == 1 else 2
    out = q if q is not None else qt
    bm, bk, warps = tile or cast_tiles()["cast"]
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    delayed = amax_out is not None
    assert not delayed or axis is None
    has_bias = act is not None and act_bias is not None
    part = None if sums_out is None else torch.empty((grid[0], k), dtype=torch.float32,
                                                     device=x.device)
    _cast_kernel[grid](x, amax, out, qt if qt is not None else out, inv,
                       amax_out if delayed else inv, act_bias if has_bias else inv, m, k,
                       x.stride(0), EMAX_=EMAX[dtype], MODE=mode, ROWS=rows, COLS=cols,
                       BM=bm, BK=bk, NPARTS=amax.numel() if axis is None else 1,
                       DELAYED=delayed, ACT=ACTS.index(act) + 1 if act else 0,
                       HAS_BIAS=has_bias, TRANS=_trans, sums_ptr=part if part is not None
                       else inv, SUMS=part is not None, num_warps=warps)
    if part is not None:
        torch.sum(part, 0, out=sums_out)
    return q, qt, inv


def cast_tensorwise(x: torch.Tensor, dtype: torch.dtype, group=None, rows: bool = True,
                    cols: bool = False, sums_out: Optional[torch.Tensor] = None):
    """One scale for the whole 2-D x, its amax all-reduced over `group` (the TP group, where
    x is one rank's shard of a tensor split over ranks; None otherwise). `sums_out`: as
    `cast`'s."""
    return cast(x, _reduce_max(amax_of(x), group, partials=True), dtype, None, rows, cols,
                sums_out=sums_out)


class Fp8Meta:
    """One FP8 linear's amax histories (recipe `delayed`): `rows` [3, HISTORY + 1] fp32, a view
    of its chunk's `Fp8History` buffer; row X, W or DY holds that tensor's amax of the last
    HISTORY steps (newest first) and, in its last column, the max of this step's casts so far.
    `primed[r]`: row r has a history (False until the tensor's first cast)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.primed = [False, False, False]
        # (dy, its FP8 casts) made for this layer by the next layer's backward
        # (`act_backward_cast`), taken by this layer's backward (`_take_dy_cast`)
        self.dy_cast = None


def cast_delayed(x: torch.Tensor, dtype: torch.dtype, meta: Fp8Meta, role: int, group=None,
                 rows: bool = True, cols: bool = False, act: Optional[str] = None,
                 act_bias: Optional[torch.Tensor] = None,
                 sums_out: Optional[torch.Tensor] = None):
    """One scale for the whole 2-D x from the max of its amax history (`meta.rows[role]`), with
    x's own amax recorded for the next steps. A first cast (no history) scales by x's current
    amax, all-reduced over `group` as `cast_tensorwise` does, and fills the history with it.
    (Later amaxes are all-reduced once per step, in `Fp8History.step`.) `act`: cast the MLP
    activation `act_ref(x, act_bias, act)` instead of x (see `cast`). `sums_out`: as
    `cast`'s."""
    hist = meta.rows[role]
    if not meta.primed[role]:
        if act is not None:
            # the first cast: the activation once, in fp32 rounded to x's dtype (what the
            # unfused path's activation kernel writes), then cast as below; in bf16 the cast
            # kernel also writes the transpose in the same pass (`cast` transposes an fp32
            # input with torch: the kernel's fp32 transpose is wrong on an H200)
            x = act_ref(x, act_bias, act).to(x.dtype)
        amax = _reduce_max(amax_of(x), group, partials=True)
        a = whole_amax(amax).float()
        # this cast scales by the amax as it is (as tensorwise would); the history keeps the
        # finite values' amax (reduced over `group` alike), so that an inf in this step does
        # not spoil the next HISTORY steps (one more pass over x, on its first cast only)
        fin = _reduce_max(finite_amax(x).reshape(1), group).reshape(())
        hist.copy_(torch.where(a.isfinite(), a, fin).expand(HISTORY + 1))
        meta.primed[role] = True
        return cast(x, amax, dtype, None, rows, cols, sums_out=sums_out)
    return cast(x, hist[:HISTORY], dtype, None, rows, cols, amax_out=hist[HISTORY:], act=act,
                act_bias=act_bias, sums_out=sums_out)


def unstored(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """What `act_backward_cast(store_dh=False)` returns for dh: a tensor of dh's shape, dtype and
    device for autograd that holds no memory (one element, expanded), NaN, so that any reader
    other than the backward that takes dh's FP8 casts sees NaN rather than stale values."""
    return torch.full((1,) * len(shape), float("nan"), dtype=dtype, device=device).expand(*shape)


# the benchmarks' A/B switches of earlier forms (environment variables, read once a process):
# FP8_STORE_ACT_GRAD=1: the activation backward stores fc1's output gradient even where fc1's
# backward takes its casts (the stored tensor is then unused); FP8_QKV_BIAS_AFTER=1: the QKV
# linear adds its bias in a separate pass after the FP8 GEMM, its gradient a separate reduction
_ab_switches: Dict[str, bool] = {}


def ab_switch(name: str) -> bool:
    if name not in _ab_switches:
        _ab_switches[name] = os.environ.get(name, "") not in ("", "0")
    return _ab_switches[name]


def act_backward_cast(h: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                      da: torch.Tensor, meta: "Fp8Meta", dtype: torch.dtype = E5M2,
                      tile: Optional[Tuple[int, int, int]] = None, store_dh: bool = True):
    """The MLP activation's backward fused with the delayed cast of its result, fc1's output
    gradient (`meta`: fc1's amax histories, row DY primed): (dh, dbias or None, (dh8, dh8^T,
    inv_scale)), dh in h's dtype, with dh's amax recorded in meta for the next steps. The cast
    equals `cast_delayed(dh, dtype, meta, DY, rows=True, cols=True)` of the dh returned. CUDA:
    one Triton pass over h and da (no separate read of dh for the cast, nor for the bias
    gradient); elsewhere `act_backward` then that cast. `tile`: as `cast`'s, default
    `cast_tiles()["act_bwd"]`; dh and its casts do not depend on it, the bias gradient's fp32
    summation order does (one partial sum per row block). `store_dh=False`: dh is computed and
    cast but not stored; `unstored(...)` stands in for it (the caller's only reader of dh takes
    the casts: `_take_dy_cast`)."""
    assert act == "gelu_tanh" and meta.primed[DY], (act, meta.primed)
    hist = meta.rows[DY]
    if not (triton is not None and h.is_cuda):
        dh, dbias = act_backward(h, bias, act, da)
        casts = cast_delayed(dh, dtype, meta, DY, rows=True, cols=True)
        return (dh if store_dh else unstored(dh.shape, dh.dtype, dh.device)), dbias, casts
    h = h if h.stride(-1) == 1 else h.contiguous()
    da = da if da.stride(-1) == 1 else da.contiguous()
    m, k = h.shape
    dh = torch.empty((m, k), dtype=h.dtype, device=h.device) if store_dh else \
        unstored((m, k), h.dtype, h.device)
    q = torch.empty((m, k), dtype=dtype, device=h.device)
    qt = torch.empty((k, m), dtype=dtype, device=h.device)
    inv = torch.empty((), dtype=torch.float32, device=h.device)
    bm, bk, warps = tile or cast_tiles()["act_bwd"]
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    part = torch.empty((grid[0], k), dtype=torch.float32, device=h.device)
    _act_bwd_cast_kernel[grid](h, da, bias if bias is not None else inv, dh, hist, q, qt, inv,
                               hist[HISTORY:], part, m, k, h.stride(0), da.stride(0),
                               EMAX_=EMAX[dtype], BM=bm, BK=bk, NPARTS=HISTORY,
                               HAS_BIAS=bias is not None, STORE_DH=store_dh, num_warps=warps)
    dbias = part.sum(0).to(bias.dtype) if bias is not None else None
    return dh, dbias, (q, qt, inv)


def _gradient_seen(x: torch.Tensor) -> bool:
    """Whether the gradient of x (fc1's output) is handed to anything but fc1's backward: a hook
    on x, `retain_grad`, or anomaly mode (which checks every gradient for NaN); then the
    activation backward stores that gradient."""
    return torch.is_anomaly_enabled() or x.retains_grad or bool(x._backward_hooks)


def _take_dy_cast(meta: Optional["Fp8Meta"], dy2: torch.Tensor, reads_dy: bool = False):
    """The FP8 casts of this layer's output gradient that the next layer's backward made
    (`act_backward_cast`, kept in `meta.dy_cast` as (dh, casts, stored)) when dy2 is the very
    tensor they were made from (same storage, shape and strides: no other gradient was added to
    it on the way); None otherwise. The kept casts are dropped either way. Where dh was not
    stored (`unstored`), the casts are all there is of it: a dy2 that is another tensor (a hook
    or a second use of fc1's output changed the gradient on the way), or a caller that would
    read dy2 itself (`reads_dy`: a bias of its own), is an error rather than NaN gradients."""
    kept = getattr(meta, "dy_cast", None)
    if kept is None:
        return None
    meta.dy_cast = None
    src, casts, stored = kept
    same = (src.data_ptr() == dy2.data_ptr() and src.shape == dy2.shape
            and src.stride() == dy2.stride() and src.dtype == dy2.dtype)
    if not stored and (not same or reads_dy):
        raise RuntimeError(
            "model.fp8_fused_act_backward: fc1's output gradient was cast to FP8 and not stored, "
            + ("but it changed on its way to fc1's backward (a hook on, or a second use of, "
               "fc1's output)" if not same else "but fc1's backward adds a bias of its own")
            + "; set model.fp8_fused_act_backward=false")
    return casts if same else None


def _cast_per_tensor(recipe: str, x: torch.Tensor, dtype: torch.dtype, meta: Optional[Fp8Meta],
                     role: int, group, cols: bool, sums_out: Optional[torch.Tensor] = None):
    """The one-scale recipes' cast of x (and its transpose with `cols`): from its current amax
    (tensorwise) or its amax history (delayed; `meta`'s row `role`). `sums_out`: as `cast`'s."""
    if recipe == "delayed":
        return cast_delayed(x, dtype, meta, role, group, rows=True, cols=cols,
                            sums_out=sums_out)
    return cast_tensorwise(x, dtype, group, rows=True, cols=cols, sums_out=sums_out)


class Fp8History:
    """The amax histories of one model chunk's FP8 linears (recipe `delayed`): one device buffer
    [linears, 3, HISTORY + 1], each linear's `fp8_meta` a view of it, so that the per-step roll
    is a few kernels for the whole chunk. `step()` (the training loop, after each step's
    forward and backward) all-reduces this step's amaxes over the TP group (every rank then
    scales a split tensor alike), pushes them into the history and clears them. `state()` /
    `load()`: the buffer as checkpoints keep it (with the RNG states, per rank)."""

    def __init__(self, modules, device: torch.device, group=None):
        self.buf = torch.zeros(len(modules), 3, HISTORY + 1, dtype=torch.float32, device=device)
        self.metas = [Fp8Meta(self.buf[i]) for i in range(len(modules))]
        for mod, meta in zip(modules, self.metas):
            mod.fp8_meta = meta
        self.group = group if group is not None and dist.is_initialized() and \
            dist.get_world_size(group) > 1 else None

    def step(self) -> None:
        if not any(any(m.primed) for m in self.metas):
            return
        cur = self.buf[..., HISTORY].contiguous()
        if self.group is not None:
            dist.all_reduce(cur, op=dist.ReduceOp.MAX, group=self.group)
        self.buf[..., 1:HISTORY] = self.buf[..., :HISTORY - 1].clone()
        self.buf[..., 0] = cur
        self.buf[..., HISTORY] = 0.0

    def clear_step(self) -> None:
        """Forget this step's amaxes so far (`Trainer._capture_graphs`: megatron-core's
        graph warm-up runs the layers on zero inputs, whose amaxes are not the step's)."""
        self.buf[..., HISTORY] = 0.0

    def state(self) -> Dict[str, torch.Tensor]:
        """The buffer and which histories are primed, as checkpoints keep them."""
        primed = torch.zeros(len(self.metas), 3, dtype=torch.bool)
        for i, m in enumerate(self.metas):
            primed[i] = torch.tensor(m.primed)
        return {"amax": self.buf.detach().cpu().clone(), "primed": primed}

    def load(self, saved) -> bool:
        """Restore `state()`'s buffer and primed flags (a checkpoint saved before the first step
        has none primed: the next casts take their current amaxes, as in a fresh run). False,
        and nothing changes, when it does not fit (another model, recipe or history length)."""
        if not (isinstance(saved, dict) and isinstance(saved.get("amax"), torch.Tensor)
                and isinstance(saved.get("primed"), torch.Tensor)
                and saved["amax"].shape == self.buf.shape
                and tuple(saved["primed"].shape) == (len(self.metas), 3)):
            return False
        self.buf.copy_(saved["amax"].to(self.buf.device, torch.float32))
        for m, flags in zip(self.metas, saved["primed"].tolist()):
            m.primed = [bool(f) for f in flags]
        return True


def cast_rowwise(x: torch.Tensor, dtype: torch.dtype, axis: int, group=None):
    """axis 1: one scale per row (amax over the columns, all-reduced over `group` where the
    columns are split over ranks) -> (x8 [m, k], inv [m]); axis 0: one scale per column ->
    (x8^T [k, m], inv [k])."""
    amax = _reduce_max(amax_of(x, dim=1 if axis == 1 else 0), group)
    q, qt, inv = cast(x, amax, dtype, axis, rows=axis == 1, cols=axis == 0)
    return (q if axis == 1 else qt), inv


# --------------------------------------------------------------------------------------------
# the scaled GEMM
# --------------------------------------------------------------------------------------------
def mm8(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor,
        out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
        fast_accum: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(a8 * a_inv) @ (b8 * b_inv)^T for row-major a8 [m, k] and b8 [n, k]; a_inv is a scalar or
    [m], b_inv a scalar or [n]. CUDA: torch._scaled_mm; CPU: the fp32 emulation. `out` (one
    scale per operand): a contiguous [m, n] tensor of out_dtype the product is written into."""
    rowwise = a_inv.dim() > 0
    assert out is None or not rowwise
    if not a8.is_cuda:
        a = a8.float() * (a_inv[:, None] if rowwise else a_inv)
        b = b8.float() * (b_inv[:, None] if rowwise else b_inv)
        res = a @ b.t()
        if bias is not None:
            res = res + bias.float()
        return res.to(out_dtype) if out is None else out.copy_(res)
    if not rowwise:
        if out is not None:
            return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, bias=bias,
                                    out_dtype=out_dtype, use_fast_accum=fast_accum, out=out)
        return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, bias=bias,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    if fast_accum and out_dtype == torch.bfloat16:
        out = torch._scaled_mm(a8, b8.t(), scale_a=a_inv[:, None], scale_b=b_inv[None, :],
                               out_dtype=out_dtype, use_fast_accum=True)
    else:
        # the tensorwise kernel with unit scales, then the (power-of-two, so exact) row scales
        one = torch.ones((), dtype=torch.float32, device=a8.device)
        out = torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=out_dtype,
                               use_fast_accum=fast_accum)
        out.mul_(a_inv[:, None]).mul_(b_inv[None, :])
    return out if bias is None else out + bias


# --------------------------------------------------------------------------------------------
# TP communication (NCCL on GPU; gloo in the CPU tests, which lacks the *_tensor collectives)
# --------------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 (FP8 travels as bytes)."""
    world = dist.get_world_size(group)
    fp8 = t.dtype in (E4M3, E5M2)
    src = (t.view(torch.uint8) if fp8 else t).contiguous()
    if src.is_cuda:
        out = torch.empty((world * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype,
                          device=src.device)
        dist.all_gather_into_tensor(out, src, group=group)
    else:
        parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src, group=group)
        out = torch.cat(parts)
    return out.view(t.dtype) if fp8 else out


def _reduce_scatter_start(t: torch.Tensor, group):
    """Start a sum reduce-scatter along dim 0: (result, handle or None)."""
    world = dist.get_world_size(group)
    if t.is_cuda:
        out = torch.empty((t.shape[0] // world,) + tuple(t.shape[1:]), dtype=t.dtype,
                          device=t.device)
        return out, dist.reduce_scatter_tensor(out, t.contiguous(), group=group, async_op=True)
    dist.all_reduce(t, group=group)
    return t.chunk(world)[dist.get_rank(group)].clone(), None


# --------------------------------------------------------------------------------------------
# the linear layer's autograd function
# --------------------------------------------------------------------------------------------
class _Fp8Linear(torch.autograd.Function):
    """megatron-core's `LinearWithGradAccumulationAndAsyncCommunication` with FP8 GEMMs: the
    same sequence-parallel all-gather / reduce-scatter, dgrad all-reduce and fused accumulation
    of the weight gradient into `weight.main_grad` (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, mode, wgrad_fusion, allreduce_dgrad,
                sequence_parallel, group, meta, wgrad_overwrite, act, act_bias, act_meta,
                bwd_fast_accum):
        tp = group if group is not None and dist.get_world_size(group) > 1 else None
        sp = sequence_parallel and tp is not None
        lead = x.shape[1:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # act: x is fc1's output and this layer's input is its activation (an MLP's fc2; see
        # `fp8_linear`), which only the cast computes
        assert act is None or (recipe == "delayed" and mode == "row" and not sp), act
        ctx.act = act
        # fc1's amax histories: its output gradient is cast in the activation's backward
        ctx.act_meta = act_meta if act is not None else None
        # x, where it came straight out of fc1's FP8 layer (x's grad_fn is that layer's
        # backward, whose ctx holds act_meta): then x's gradient reaches fc1's backward alone,
        # which takes its casts (`_take_dy_cast`), and the activation backward need not store
        # it unless something else is handed it by backward time (`_gradient_seen`). None
        # otherwise. (x's storage is kept for backward anyway, as x2.)
        from_fc1 = ctx.act_meta is not None and isinstance(
            x.grad_fn, _Fp8Linear._backward_cls) and getattr(x.grad_fn, "meta", None) is act_meta
        ctx.act_x = x if from_fc1 else None
        if ctx.act_meta is not None:  # casts kept by a backward that never reached fc1
            ctx.act_meta.dy_cast = None
        n = weight.shape[0]
        ctx.recipe, ctx.mode, ctx.tp, ctx.sp, ctx.lead = recipe, mode, tp, sp, lead
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad = allreduce_dgrad and tp is not None
        ctx.main_grad = weight.main_grad if wgrad_fusion and hasattr(weight, "main_grad") \
            else None
        ctx.wgrad_fusion = wgrad_fusion
        ctx.wgrad_overwrite = wgrad_overwrite
        ctx.out_dtype = x.dtype
        ctx.meta = meta
        ctx.bwd_fast_accum = bool(bwd_fast_accum)
        if recipe in ("tensorwise", "delayed"):
            # the weight is split over TP ranks in both modes; the input is split when it is a
            # sequence-parallel shard or a row-parallel (feature) shard, and the same on every
            # rank otherwise (column-parallel without SP)
            xgroup = tp if (sp or mode == "row") else None
            w8, w8t, w_inv = _cast_per_tensor(recipe, weight, E4M3, meta, W, tp, cols=True)
            if act is None:
                x8, x8t, x_inv = _cast_per_tensor(recipe, x2, E4M3, meta, X, xgroup,
                                                  cols=not sp)
            else:
                x8, x8t, x_inv = cast_delayed(x2, E4M3, meta, X, xgroup, cols=True, act=act,
                                              act_bias=act_bias)
            x8_full = _gather(x8, tp) if sp else x8
            out = mm8(x8_full, x_inv, w8, w_inv, ctx.out_dtype, bias, fast_accum=True)
            # FP8 copies for backward (the input's transpose; under SP its local shard, gathered
            # again in backward), not the bf16 tensors; with act, fc1's output for the
            # activation's backward (what the unfused activation keeps)
            ctx.save_for_backward(x8 if sp else x8t, w8t, x_inv, w_inv, weight,
                                  *((x2, act_bias) if act is not None else ()))
        else:
            # per-row scales along K: the rows' K is split over ranks for a row-parallel layer
            kgroup = tp if mode == "row" else None
            x8, x_inv = cast_rowwise(x2, E4M3, 1, kgroup)
            if sp:
                x8, x_inv = _gather(x8, tp), _gather(x_inv, tp)
            w8, w_inv = cast_rowwise(weight, E4M3, 1, kgroup)
            out = mm8(x8, x_inv, w8, w_inv, ctx.out_dtype, bias, fast_accum=True)
            # backward re-quantises along other axes: keep the high-precision tensors
            ctx.save_for_backward(x2, weight)
        return out.view(-1, *lead, n)

    @staticmethod
    def backward(ctx, dy):
        tp, sp, mode = ctx.tp, ctx.sp, ctx.mode
        dy2 = dy.reshape(-1, dy.shape[-1])
        # an MLP's fc1 may find dy cast already, by fc2's activation backward (and then dy2 may
        # be `unstored`'s stand-in, never to be made contiguous or read)
        kept = _take_dy_cast(ctx.meta, dy2, reads_dy=ctx.use_bias) \
            if ctx.recipe == "delayed" else None
        if kept is None and not dy2.is_contiguous():
            dy2 = dy2.contiguous()
        fused = ctx.wgrad_fusion and ctx.main_grad is not None
        w_dtype = torch.float32 if fused else None
        if ctx.recipe in ("tensorwise", "delayed"):
            xs, w8t, x_inv, w_inv, weight = ctx.saved_tensors[:5]
            # dy is split over ranks (output features) for a column-parallel layer and the same
            # on every rank for a row-parallel one
            # the bias gradient (dy's column sums) from the cast's own pass over dy
            sums = torch.empty(dy2.shape[1], dtype=torch.float32, device=dy2.device) \
                if ctx.use_bias and kept is None else None
            dy8, dy8t, dy_inv = kept or _cast_per_tensor(
                ctx.recipe, dy2, E5M2, ctx.meta, DY, tp if mode == "column" else None, cols=True,
                sums_out=sums)
            fast = ctx.bwd_fast_accum
            dx = mm8(dy8, dy_inv, w8t, w_inv, ctx.out_dtype, fast_accum=fast)
            dx, handle = _dgrad_comm(ctx, dx)
            x8t = _gather(xs, tp).t().contiguous() if sp else xs
            if fused and ctx.wgrad_overwrite and ctx.main_grad.dtype == torch.float32 and (
                    (ctx.main_grad.is_cuda and torch.cuda.is_current_stream_capturing())
                    or not getattr(weight, "grad_added_to_main_grad", False)):
                # this step's only accumulation into main_grad (zeroed at the step's start):
                # the GEMM writes it, no fp32 product to add. Eagerly, DDP's per-step flag also
                # tells a second backward through the weight in one step (a train.step plugin
                # running the model twice) to add instead; a captured graph (one micro-batch
                # per step, one backward per weight) always writes
                res = mm8(dy8t, dy_inv, x8t, x_inv, torch.float32, fast_accum=fast,
                          out=ctx.main_grad)
                if res.data_ptr() != ctx.main_grad.data_ptr():  # an out= that did not write
                    ctx.main_grad.copy_(res)
                dw = None
            else:
                dw = mm8(dy8t, dy_inv, x8t, x_inv, w_dtype or weight.dtype, fast_accum=fast)
        else:
            sums = None
            x2, weight = ctx.saved_tensors
            # dgrad reduces over N: split over ranks for a column-parallel layer
            ngroup = tp if mode == "column" else None
            dy8, dy_inv = cast_rowwise(dy2, E4M3, 1, ngroup)
            wt8, wt_inv = cast_rowwise(weight, E4M3, 0, ngroup)
            dx = mm8(dy8, dy_inv, wt8, wt_inv, ctx.out_dtype, fast_accum=ctx.bwd_fast_accum)
            dx, handle = _dgrad_comm(ctx, dx)
            # wgrad reduces over the tokens: whole on every rank (SP gathers them)
            x_full = _gather(x2, tp) if sp else x2
            dyt8, dyt_inv = cast_rowwise(dy2, E4M3, 0)
            xt8, xt_inv = cast_rowwise(x_full, E4M3, 0)
            dw = mm8(dyt8, dyt_inv, xt8, xt_inv, w_dtype or weight.dtype,
                     fast_accum=ctx.bwd_fast_accum)
        grad_weight = _accumulate_wgrad(ctx, weight, dw) if fused else dw
        grad_bias = None if not ctx.use_bias else \
            dy2.sum(0) if sums is None else sums.to(dy2.dtype)
        if handle is not None:
            handle.wait()
        grad_act_bias = None
        if ctx.act is not None:  # dx is the activation's gradient: on to fc1's output (no comm)
            h2, act_bias = ctx.saved_tensors[5:]
            if ctx.act_meta is not None and ctx.act_meta.primed[DY]:
                # fc1's output gradient cast to FP8 in the same pass, for fc1's backward; not
                # stored where fc1's FP8 backward is its only reader
                store = ctx.act_x is None or ab_switch("FP8_STORE_ACT_GRAD") \
                    or _gradient_seen(ctx.act_x)
                dx, grad_act_bias, casts = act_backward_cast(h2, act_bias, ctx.act, dx,
                                                             ctx.act_meta, store_dh=store)
                ctx.act_meta.dy_cast = (dx, casts, store)
            else:
                dx, grad_act_bias = act_backward(h2, act_bias, ctx.act, dx)
        return dx.view(-1, *ctx.lead, dx.shape[-1]), grad_weight, grad_bias, \
            None, None, None, None, None, None, None, None, None, grad_act_bias, None, None


def _dgrad_comm(ctx, dx):
    """Start the input gradient's TP communication: all-reduce (column-parallel without SP) or
    reduce-scatter (SP); the weight-gradient GEMM runs meanwhile."""
    if ctx.sp:
        return _reduce_scatter_start(dx, ctx.tp)
    if ctx.allreduce_dgrad:
        return dx, dist.all_reduce(dx, group=ctx.tp, async_op=True)
    return dx, None


def _accumulate_wgrad(ctx, weight, dw):
    """main_grad += dw (fp32; dw None: the GEMM wrote main_grad itself), then what
    megatron-core's layer returns as the weight's grad: a dummy when DDP's hook checks
    `grad_added_to_main_grad`, else None."""
    main_grad = ctx.main_grad
    weight.main_grad = main_grad
    if dw is not None:
        main_grad.add_(dw)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    weight.grad_added_to_main_grad = True
    return make(main_grad.shape, dtype=ctx.out_dtype, device=main_grad.device)


def shapes_supported(tokens: int, k: int, n: int) -> bool:
    """torch._scaled_mm needs the reduction dims and the output width to be multiples of 16;
    the three GEMMs reduce over K, N and the tokens."""
    return tokens % 16 == 0 and k % 16 == 0 and n % 16 == 0


def fp8_linear(x, weight, bias, recipe: str, mode: str, wgrad_fusion: bool,
               allreduce_dgrad: bool, sequence_parallel: bool, group,
               meta: Optional[Fp8Meta] = None, wgrad_overwrite: bool = False,
               act: Optional[str] = None, act_bias: Optional[torch.Tensor] = None,
               act_meta: Optional[Fp8Meta] = None, bwd_fast_accum: bool = False):
    """y = x @ weight^T (+ bias) with FP8 GEMMs in forward and backward. `mode`: "column" or
    "row" (megatron-core's ColumnParallelLinear / RowParallelLinear), which says which tensors
    are split over the TP `group`; the communication arguments are mcore's. `meta`: the
    layer's amax histories (recipe "delayed"). `wgrad_overwrite` (with `wgrad_fusion`, one
    scale per tensor): the weight-gradient GEMM writes `weight.main_grad` instead of adding to
    it; only right where this backward is the step's only one for the weight (one micro-batch
    per step, main_grad zeroed at its start: `build_model`'s `fp8_wgrad_overwrite`).
    `act` (one of ACTS; recipe delayed, an MLP's row-parallel fc2): x is fc1's output and the
    layer computes act_ref(x, act_bias, act) @ weight^T, the activation made inside the FP8
    cast, and its backward returns the gradients of x and act_bias. `act_meta` (with `act`):
    the amax histories of the layer that made x (fc1), whose output gradient the activation's
    backward then also casts to FP8, once that gradient has a history (`act_backward_cast`);
    fc1's backward takes those casts instead of casting again. `bwd_fast_accum`: the
    backward's GEMMs with cuBLAS's fast accumulation too (`model.fp8_backward_fast_accum`)."""
    assert recipe in RECIPES, recipe
    assert (recipe == "delayed") == (meta is not None), "recipe delayed needs the layer's meta"
    args = (x, weight, bias, recipe, mode, wgrad_fusion, allreduce_dgrad, sequence_parallel,
            group, meta, wgrad_overwrite, act, act_bias, act_meta, bwd_fast_accum)
    if torch.compiler.is_compiling():
        # model.torch_compile: a graph break (the casts are our own kernels). Only there: the
        # disable wrapper costs host time on every eager call, and eager FP8 layers are bound
        # by the host (benchmarks/fp8_linear.py --host-only)
        return _fp8_linear_eager(*args)
    return _Fp8Linear.apply(*args)


@torch.compiler.disable
def _fp8_linear_eager(*args):
    return _Fp8Linear.apply(*args)


def device_supports_fp8(device=None) -> Tuple[bool, str]:
    """(ok, why not): FP8 GEMMs need CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cap < (8, 9):
        return False, f"{name} has compute capability {cap[0]}.{cap[1]}; FP8 needs 8.9 or newer"
    if triton is None:
        return False, "triton is not installed"
    return True, ""
