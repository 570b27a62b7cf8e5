"""Causal attention (plain or with ALiBi) through the cuDNN frontend's fused SDPA graphs
(an optional accelerator).

Needs the `nvidia-cudnn-frontend` package (PyPI, a self-contained binary wheel; pyproject pins
1.18 on Linux x86_64, whose Python API this file follows). It drives the libcudnn that torch
already loads; a frontend built against a newer cuDNN than that one can fail to build graphs
(1.24 with torch 2.11's cuDNN 9.19 did). Without it, on CPU, or after such a failure
(`CudnnUnavailable`, warned once), `available()` is False and callers use their other kernels.

Modes, all with cuDNN's causal diagonal band (fully masked key blocks are skipped):

* `mode="causal"`: plain causal attention.
* `mode="alibi"`: cuDNN's own ALiBi mask. cuDNN computes the slopes from the head count of the
  tensor it is given, with the ALiBi paper's formula, which is ours (`alibi_slopes`), also for
  head counts that are not a power of two. So it serves a rank that holds all heads (no tensor
  parallelism); under TP a rank's heads need the slopes of their global indices.
* `mode="bias"`: an additive [1, n, s, s] bias (our slopes, any TP rank), read by the kernel.

q, k, v are [b, n, s, d] views in any layout with a unit last stride (mcore's [s, b, n, d]
permuted is read in place, no copies); the output is laid out as [s, b, n, d], so turning it
back into mcore's [s, b, n*d] is free. GQA/MQA key/value heads are read directly (cuDNN's
native grouped attention, no expansion). Attention dropout uses cuDNN's Philox generator, seeded
from torch's current CUDA generator (so mcore's RNG tracker forks apply): a device-side draw,
no host synchronisation; backward reuses the forward's seed.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, Optional, Tuple

import torch

from framework.fast.alibi import alibi_bias

_GRAPHS: Dict[Tuple, tuple] = {}
_HANDLES: Dict[int, int] = {}
_BIAS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_BROKEN: list = []  # the first graph-build failure, if any: then never tried again


class CudnnUnavailable(RuntimeError):
    """cuDNN could not build the attention graphs here; the caller falls back."""


@functools.lru_cache(maxsize=None)
def _frontend_ready() -> bool:
    """Whether the cuDNN frontend imports and reaches a cuDNN 9 backend (asked once: every
    attention call checks `available()`)."""
    try:
        import cudnn

        return hasattr(cudnn, "pygraph") and cudnn.backend_version() >= 90000
    except Exception:  # not installed, or its libraries do not load
        return False


def available() -> bool:
    """True when the cuDNN frontend is ready and no graph build has failed in this process."""
    return not _BROKEN and _frontend_ready()


def supported(q: torch.Tensor, k: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether this call can run here: CUDA bf16/fp16, head dims a multiple of 8 up to 128,
    self-attention shapes (sq == sk), and the frontend present."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and q.shape[2] == k.shape[2] and 0.0 <= dropout_p < 1.0
            and available())


def _handle() -> int:
    import cudnn

    dev = torch.cuda.current_device()
    if dev not in _HANDLES:
        _HANDLES[dev] = cudnn.create_handle()
    cudnn.set_stream(handle=_HANDLES[dev], stream=torch.cuda.current_stream().cuda_stream)
    return _HANDLES[dev]


def _sbhd(b: int, n: int, s: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An empty [b, n, s, d] view of a contiguous [s, b, n, d] buffer."""
    return torch.empty(s, b, n, d, dtype=like.dtype, device=like.device).permute(1, 2, 0, 3)


def _mask_kwargs(cudnn, mode: str, bias_t) -> dict:
    kw = dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
    if mode == "alibi":
        kw["use_alibi_mask"] = True
    elif mode == "bias":
        kw["bias"] = bias_t
    return kw


def _build(g):
    import cudnn

    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _graphs(key, q, k, v, o, bias, scale: float, mode: str, dropout_p: float):
    """Forward and backward graphs for these shapes and layouts (built once, then cached)."""
    if key in _GRAPHS:
        return _GRAPHS[key]
    try:
        _GRAPHS[key] = _build_pair(q, k, v, o, bias, scale, mode, dropout_p)
    except Exception as e:  # an unsupported shape or a frontend/backend version mismatch
        _BROKEN.append(f"{type(e).__name__}: {e}")
        warnings.warn("cuDNN attention graphs could not be built, using the other kernels "
                      f"from now on: {_BROKEN[0][:300]}")
        raise CudnnUnavailable(_BROKEN[0]) from e
    return _GRAPHS[key]


def _build_pair(q, k, v, o, bias, scale: float, mode: str, dropout_p: float):
    import cudnn

    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[q.dtype]
    f32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT64
    b, n, s, _ = q.shape
    st_dim, st_stride = [b, n, s, 1], [n * s, s, 1, 1]

    def new_graph():
        return cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                             handle=_handle())

    def like(g, name, t, dtype=io):
        return g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=dtype)

    def common(g):
        t = {"q": like(g, "q", q), "k": like(g, "k", k), "v": like(g, "v", v)}
        if bias is not None:
            t["bias"] = like(g, "bias", bias)
        if dropout_p > 0:
            t["seed"] = g.tensor(name="seed", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i64)
            t["offset"] = g.tensor(name="offset", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                   data_type=i64)
        return t

    def extra(t):
        kw = _mask_kwargs(cudnn, mode, t.get("bias"))
        if dropout_p > 0:
            kw["dropout"] = (dropout_p, t["seed"], t["offset"])
        return kw

    fg = new_graph()
    ft = common(fg)
    o_t, stats_t = fg.sdpa(name="sdpa", q=ft["q"], k=ft["k"], v=ft["v"], generate_stats=True,
                           attn_scale=scale, **extra(ft))
    o_t.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(io)
    stats_t.set_output(True).set_dim(st_dim).set_stride(st_stride).set_data_type(f32)
    ft.update(o=o_t, stats=stats_t)

    bg = new_graph()
    bt = common(bg)
    bt["o"], bt["do"] = like(bg, "o", o), like(bg, "dO", o)
    bt["stats"] = bg.tensor(name="stats", dim=st_dim, stride=st_stride, data_type=f32)
    dq, dk, dv = bg.sdpa_backward(name="sdpa_bwd", q=bt["q"], k=bt["k"], v=bt["v"], o=bt["o"],
                                  dO=bt["do"], stats=bt["stats"], attn_scale=scale, **extra(bt))
    for grad_t, like_t in ((dq, q), (dk, k), (dv, v)):
        b_, n_, s_, d_ = like_t.shape  # grads are laid out [s, b, n, d] like the output
        grad_t.set_output(True).set_dim([b_, n_, s_, d_]) \
            .set_stride([n_ * d_, d_, b_ * n_ * d_, 1]).set_data_type(io)
    bt.update(dq=dq, dk=dk, dv=dv)
    return (_build(fg), ft), (_build(bg), bt)


def _execute(g, tensors: dict, buffers: dict) -> None:
    ws = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
    g.execute({tensors[name]: buf for name, buf in buffers.items()}, ws, handle=_handle())


class _CudnnAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale, mode, dropout_p):
        b, n, s, d = q.shape
        o = _sbhd(b, n, s, d, q)
        key = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), v.stride(),
               None if bias is None else (tuple(bias.shape), bias.stride()), q.dtype,
               q.device.index, scale, mode, dropout_p)
        (fg, ft), _ = _graphs(key, q, k, v, o, bias, scale, mode, dropout_p)
        stats = torch.empty(b, n, s, 1, dtype=torch.float32, device=q.device)
        bufs = {"q": q, "k": k, "v": v, "o": o, "stats": stats}
        if bias is not None:
            bufs["bias"] = bias
        if dropout_p > 0:  # torch's current generator: mcore's RNG tracker forks apply
            bufs["seed"] = torch.randint(0, 2 ** 62, (1, 1, 1, 1), dtype=torch.int64,
                                         device=q.device)
            bufs["offset"] = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=q.device)
        _execute(fg, ft, bufs)
        ctx.key = key
        ctx.extra = {n: bufs[n] for n in ("bias", "seed", "offset") if n in bufs}
        ctx.save_for_backward(q, k, v, o, stats)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, stats = ctx.saved_tensors
        _, (bg, bt) = _GRAPHS[ctx.key]
        if grad.stride() != o.stride():
            grad = _sbhd(*o.shape, o).copy_(grad)
        b, n, s, d = q.shape
        dq, dk, dv = _sbhd(b, n, s, d, q), _sbhd(*k.shape, k), _sbhd(*v.shape, v)
        bufs = dict(ctx.extra, q=q, k=k, v=v, o=o, stats=stats, do=grad, dq=dq, dk=dk, dv=dv)
        _execute(bg, bt, bufs)
        return dq, dk, dv, None, None, None, None


def alibi_bias_1hss(slopes: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, n, s, s] additive ALiBi bias slope * (k_pos - q_pos) (the causal band masks the
    rest), cached per slopes tensor (by address: no device-to-host read of its values), length
    and dtype, so all layers sharing the slopes share one copy. The cache keeps the slopes
    tensor alive, so its address is not reused for other values."""
    key = (slopes.data_ptr(), slopes.numel(), s, dtype, slopes.device)
    if key not in _BIAS:
        # the reference bias with 0 above the diagonal, where the causal band masks instead
        bias = alibi_bias(slopes, s, s, slopes.device).nan_to_num(neginf=0.0)
        _BIAS[key] = (slopes, bias.to(dtype).unsqueeze(0).contiguous())
    return _BIAS[key][1]


def cudnn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                           mode: str = "causal") -> torch.Tensor:
    """Causal attention; q [b, n, s, d], k/v [b, n_kv, s, d] (n_kv | n).

    mode "causal": no position bias. "alibi": cuDNN's ALiBi slopes for n heads
    (= `alibi_slopes(n)`; `slopes` unused). "bias": ALiBi with `slopes` (this rank's heads) as
    a dense additive bias. Returns [b, n, s, d] laid out as [s, b, n, d]."""
    if mode not in ("causal", "alibi", "bias"):
        raise ValueError(f"mode must be 'causal', 'alibi' or 'bias', got {mode!r}")
    qkv = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    bias = alibi_bias_1hss(slopes, q.shape[2], q.dtype) if mode == "bias" else None
    return _CudnnAttention.apply(*qkv, bias, float(scale), mode, float(dropout_p))
