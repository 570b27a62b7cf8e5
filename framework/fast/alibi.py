"""ALiBi (Press et al., "Train Short, Test Long"): no position table; each head h adds
`slope_h * (k_pos - q_pos)` to its attention scores. The arithmetic and the ways a kernel runs it:

* `alibi_slopes` builds the paper's slopes (geometric for a power-of-two head count; otherwise the
  slopes of the closest lower power of two followed by every other slope of the next power of
  two). Under tensor parallelism rank r holds query heads [r*n/tp, (r+1)*n/tp) and uses only their
  slopes (`alibi_slopes_for_rank`).
* `alibi_bias`: the dense float bias for SDPA (the reference; padding masks, KV-cache decoding).
* `flex_alibi`: FlexAttention with a `score_mod` and a causal block mask (GPU).
* `alibi_augment`: ALiBi as extra q/k head dims, so SDPA's fused causal kernels run it.

`framework.models.layers.SDPAttention` chooses among them (`model.alibi_kernel`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch


# --------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------
def _power_of_two_slopes(n: int) -> list:
    # slope_i = 2^(-8 i / n), i = 1..n  (a geometric sequence starting at 2^(-8/n))
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Slopes of all `num_heads` heads (float64), as in the ALiBi paper."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _power_of_two_slopes(low)
    if low < num_heads:
        slopes += _power_of_two_slopes(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_slopes_for_rank(num_heads: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Slopes of the query heads held by one tensor-parallel rank (contiguous blocks of heads, as
    mcore shards them, also when KV heads are replicated because groups < tp)."""
    per = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * per:(tp_rank + 1) * per]


def alibi_bias(slopes: torch.Tensor, sq: int, sk: int, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal ALiBi bias [n, sq, sk]: slope * (k_pos - q_pos), -inf above the diagonal.

    The queries are the last `sq` of `sk` positions (q_pos = sk - sq + i), so with a KV cache the
    bias uses absolute positions."""
    q = torch.arange(sk - sq, sk, device=device)[:, None]
    k = torch.arange(sk, device=device)[None, :]
    dist = (k - q).to(torch.float64 if dtype == torch.float64 else torch.float32)
    bias = slopes.to(device=device, dtype=dist.dtype)[:, None, None] * dist
    return bias.masked_fill(k > q, float("-inf")).to(dtype)


_FLEX = None
_BLOCK_MASKS: Dict[Tuple[int, int, str], object] = {}


def _flex():
    """torch.compile(flex_attention), built once per process."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def causal_block_mask(sq: int, sk: int, device):
    """Causal block mask (queries are the last sq of sk positions), cached per (sq, sk)."""
    key = (sq, sk, str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        off = sk - sq

        def causal(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx

        _BLOCK_MASKS[key] = create_block_mask(causal, B=None, H=None, Q_LEN=sq, KV_LEN=sk,
                                              device=device)
    return _BLOCK_MASKS[key]


def flex_supported(q: torch.Tensor) -> bool:
    """FlexAttention's Triton kernels: CUDA, head dim a power of two and at least 16."""
    d = q.shape[-1]
    return q.is_cuda and d >= 16 and d & (d - 1) == 0


# FlexAttention kernel options used unless model.flex_kernel_options overrides them.
# ROWS_GUARANTEED_SAFE: with a causal mask every query row sees at least one key, so the kernel
# may skip its fully-masked-row guard.
FLEX_KERNEL_OPTIONS: Dict[str, object] = {"ROWS_GUARANTEED_SAFE": True}


def flex_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
               scale: float, kernel_options: Optional[Dict[str, object]] = None) -> torch.Tensor:
    """Causal ALiBi attention through FlexAttention. q [b, n, sq, d]; k, v [b, g, sk, d] with g
    dividing n (GQA); slopes [n] fp32 on q's device. `kernel_options` are merged over
    FLEX_KERNEL_OPTIONS. Returns [b, n, sq, d]."""
    sq, sk = q.shape[2], k.shape[2]
    off = sk - sq

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx - off)

    opts = {**FLEX_KERNEL_OPTIONS, **(kernel_options or {})}
    return _flex()(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(sq, sk, q.device),
                   scale=scale, enable_gqa=k.shape[1] != q.shape[1], kernel_options=opts)


# ALiBi as extra head dimensions (any SDPA backend: cuDNN / flash / efficient / math)
#
# With a causal mask, softmax over keys is unchanged by a constant added to a whole query row, so
# ALiBi's slope_h * (j - i) may drop its -slope_h * i part: the bias becomes slope_h * j, a product
# of a per-head factor and a per-key factor, which a dot product can carry. Appending columns to q
# (per head) and k (per key position) with sum_c qx[h, c] * kx[j, c] = slope_h * j / scale makes
# SDPA's own q.k * scale equal q.k * scale + slope_h * j, so the fused causal kernels of SDPA run
# ALiBi. The products must be exact in low precision: the key position is written in base 256
# (digits < 256 are exact in bf16/fp16/fp32) and slope_h / scale as a sum of three pieces of the
# input dtype (about 24 significant bits in bf16), so every product of a q and a k column is exact
# and the kernel's fp32 accumulation is the only rounding. The columns are padded to a multiple of
# 8 (the fused kernels' head-dim granule); v keeps its head dim where the backend allows.
# --------------------------------------------------------------------------------------------
_ALIBI_PIECES = 3
_ALIBI_BASE = 256
_ALIBI_MAX_KEYS = _ALIBI_BASE ** 2
_AUG_K: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def alibi_augment_width(d: int) -> int:
    """Head dim of q and k after the ALiBi columns: d + 2 * pieces, rounded up to 8."""
    return -(-(d + 2 * _ALIBI_PIECES) // 8) * 8


def _alibi_k_columns(sk: int, width: int, device, dtype) -> torch.Tensor:
    key = (sk, width, str(device), dtype)
    if key not in _AUG_K:
        j = torch.arange(sk, device=device, dtype=torch.float64)
        digits = torch.stack([torch.div(j, _ALIBI_BASE, rounding_mode="floor"),
                              torch.remainder(j, _ALIBI_BASE)], dim=-1)  # [sk, 2]
        cols = torch.zeros(sk, width, device=device, dtype=torch.float64)
        cols[:, :2 * _ALIBI_PIECES] = digits.repeat(1, _ALIBI_PIECES)
        _AUG_K[key] = cols.to(dtype)
    return _AUG_K[key]


def alibi_q_columns(slopes: torch.Tensor, scale: float, d: int, dtype) -> torch.Tensor:
    """The per-head columns [n, width - d]: slope / scale split into pieces of `dtype`, each
    written as (base * piece, piece) to meet the key position's two base-256 digits."""
    width = alibi_augment_width(d) - d
    rest = slopes.to(torch.float64) / scale
    cols = torch.zeros(slopes.shape[0], width, device=slopes.device, dtype=torch.float64)
    for p in range(_ALIBI_PIECES):
        piece = rest.to(dtype).to(torch.float64)
        cols[:, 2 * p] = piece * _ALIBI_BASE  # a power of two: exact
        cols[:, 2 * p + 1] = piece
        rest = rest - piece
    return cols.to(dtype)


def alibi_augment_supported(sk: int) -> bool:
    return sk <= _ALIBI_MAX_KEYS


def alibi_augment(q: torch.Tensor, k: torch.Tensor, q_columns: torch.Tensor):
    """q [b, n, sq, d], k [b, g, sk, d] -> (q', k') of head dim `alibi_augment_width(d)` with
    q' . k' * scale = q . k * scale + slope_h * j (`q_columns` = alibi_q_columns(slopes, scale,
    d, q.dtype)). Causal attention over (q', k', v) equals causal ALiBi attention over (q, k, v)
    when the queries are the last sq of the sk positions. Gradients reach q and k through the
    concatenation; the extra columns are constants."""
    b, n, sq, _ = q.shape
    sk = k.shape[2]
    if not alibi_augment_supported(sk):
        raise ValueError(f"ALiBi as extra head dims supports at most {_ALIBI_MAX_KEYS} keys, "
                         f"got {sk}")
    width = q_columns.shape[1]
    kx = _alibi_k_columns(sk, width, k.device, k.dtype)
    q2 = torch.cat([q, q_columns[None, :, None, :].expand(b, n, sq, width)], dim=-1)
    k2 = torch.cat([k, kx[None, None].expand(b, k.shape[1], sk, width)], dim=-1)
    return q2, k2
