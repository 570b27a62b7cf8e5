"""Position encodings and attention layouts on top of megatron-core 0.16.

* ALiBi (Press et al., "Train Short, Test Long"): no position table; each head h adds
  `slope_h * (k_pos - q_pos)` to its attention scores. `alibi_slopes` builds the paper's slopes
  (geometric for a power-of-two head count; otherwise the slopes of the closest lower power of two
  followed by every other slope of the next power of two). Under tensor parallelism rank r holds
  query heads [r*n/tp, (r+1)*n/tp) and uses only their slopes (`alibi_slopes_for_rank`).
  `SDPAttention` applies it: on GPU through FlexAttention (`flex_alibi`, a `score_mod` plus a
  causal block mask), elsewhere through SDPA with a dense float bias (`alibi_bias`).
* RoPE on CPU: mcore's `RotaryEmbedding.get_emb` moves its inverse frequencies to
  `torch.cuda.current_device()` on the first forward whenever they live on the CPU
  (megatron/core/models/common/embeddings/rotary_pos_embedding.py). `RotaryEmbeddingOnDevice`
  leaves them where the model was built (mcore already creates them on the GPU when
  `use_cpu_initialization` is off), so RoPE also runs on CPU.
* MQA/GQA with fewer KV groups than TP ranks: mcore replicates each KV head over tp/groups ranks by
  all-gathering the fused QKV output (`Attention.get_query_key_value_tensors`); that all-gather
  allocates on CUDA. `SelfAttention` keeps mcore's path on GPU and takes an equivalent
  torch.distributed path on CPU, whose backward all-reduces, so the gradient of a replicated
  KV head is the sum over the ranks that use it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention as _McoreSelfAttention


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


# --------------------------------------------------------------------------------------------
# RoPE on any device
# --------------------------------------------------------------------------------------------
class RotaryEmbeddingOnDevice(RotaryEmbedding):
    """mcore's RotaryEmbedding without the move of `inv_freq` to CUDA in `get_emb`: the
    frequencies stay on the device the model was built on."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def keep_rotary_on_device(model: torch.nn.Module) -> None:
    """Make a GPTModel's RotaryEmbedding device-agnostic (see module docstring)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None and type(rope) is RotaryEmbedding:
        rope.__class__ = RotaryEmbeddingOnDevice


# --------------------------------------------------------------------------------------------
# KV heads replicated over TP ranks (num_query_groups < tp) on CPU
# --------------------------------------------------------------------------------------------
class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward sums the gradient over ranks and keeps this rank's
    slice (a reduce-scatter built from all-reduce, which gloo supports)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None


class SelfAttention(_McoreSelfAttention):
    """mcore SelfAttention; with num_query_groups < tp off the GPU, QKV is assembled through
    torch.distributed (mcore's all-gather allocates on CUDA). Same layout as mcore: the fused
    output is interleaved per group [q.. k v | q.. k v | ...]; rank r uses group r // (tp/g) and
    query heads [r*n/tp, (r+1)*n/tp)."""

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        groups, tp = self.config.num_query_groups, self.world_size
        if groups >= tp or hidden_states.is_cuda or output_gate or not split_qkv:
            return super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       output_gate=output_gate,
                                                       split_qkv=split_qkv)
        mixed, _ = self.linear_qkv(hidden_states)
        full = _GatherLastDim.apply(mixed, self.tp_group)
        rank = self.tp_group.rank()
        ranks_per_group = tp // groups
        size = full.shape[-1] // groups
        g = rank // ranks_per_group
        blob = full[..., g * size:(g + 1) * size]
        hn = self.hidden_size_per_attention_head
        q_per_group = self.config.num_attention_heads // groups
        query, key, value = torch.split(blob, [q_per_group * hn, hn, hn], dim=-1)
        s, b = blob.shape[0], blob.shape[1]
        query = query.reshape(s, b, q_per_group, hn)
        n = q_per_group // ranks_per_group
        j = rank % ranks_per_group
        query = query[:, :, j * n:(j + 1) * n, :]
        key, value = key.reshape(s, b, 1, hn), value.reshape(s, b, 1, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value


def tp_rank_and_size(pg_collection=None) -> Tuple[int, int]:
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp.rank(), pg_collection.tp.size()
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())
