"""ALiBi through the cuDNN frontend's own SDPA ALiBi mask, as a candidate kernel for
benchmarks/attention.py (not used by the framework).

Needs `nvidia-cudnn-frontend` (PyPI; not in the GPU image: put its wheel in .whl/). cuDNN
computes the slopes itself from the head count of the tensor it is given, so at best it could
serve models without tensor parallelism; attention.py prints its deviation from the dense
reference (our slopes) next to the timing, so a slope mismatch shows at once.

The frontend's Python API changed across releases; this follows 1.32 (graph tensors with uids,
`diagonal_band_right_bound=0` for causal, `execute(buffers, workspace, tensor_uids=...)`) and
falls back to the older spellings (`use_causal_mask`, a {tensor: buffer} variant pack).
"""
from typing import Dict, Tuple

import torch

_GRAPHS: Dict[Tuple, Tuple] = {}
_HANDLES: Dict[int, object] = {}
Q, K, V, O, STATS, DO, DQ, DK, DV = 1, 2, 3, 4, 5, 6, 201, 202, 203


def available() -> bool:
    try:
        import cudnn
    except Exception:  # not installed, or its CUDA libraries do not load
        return False
    return hasattr(cudnn, "pygraph")


def _handle():
    import cudnn

    dev = torch.cuda.current_device()
    if dev not in _HANDLES:
        _HANDLES[dev] = cudnn.create_handle()
    cudnn.set_stream(handle=_HANDLES[dev], stream=torch.cuda.current_stream().cuda_stream)
    return _HANDLES[dev]


def _causal_alibi(**kw) -> dict:
    import cudnn

    kw.update(use_alibi_mask=True)
    try:
        kw.update(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                  diagonal_band_right_bound=0)
    except AttributeError:  # older frontends
        kw.update(use_causal_mask=True)
    return kw


def _finish(g):
    import cudnn

    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _graphs(q: torch.Tensor, scale: float):
    import cudnn

    key = (tuple(q.shape), tuple(q.stride()), q.dtype, scale)
    if key in _GRAPHS:
        return _GRAPHS[key]
    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[q.dtype]
    b, h, s, d = q.shape
    dim, stride = list(q.shape), list(q.stride())
    st_dim, st_stride = [b, h, s, 1], [h * s, s, 1, 1]
    handle = _handle()

    def graph():
        return cudnn.pygraph(handle=handle, io_data_type=io,
                             intermediate_data_type=cudnn.data_type.FLOAT,
                             compute_data_type=cudnn.data_type.FLOAT)

    def t(g, name, uid, dims=dim, strides=stride, dtype=io):
        return g.tensor(name=name, dim=dims, stride=strides, data_type=dtype, uid=uid)

    fwd = graph()
    qt, kt, vt = t(fwd, "q", Q), t(fwd, "k", K), t(fwd, "v", V)
    ot, stt = fwd.sdpa(**_causal_alibi(name="alibi_fwd", q=qt, k=kt, v=vt, generate_stats=True,
                                       attn_scale=scale))
    ot.set_uid(O).set_output(True).set_dim(dim).set_stride(stride).set_data_type(io)
    stt.set_uid(STATS).set_output(True).set_dim(st_dim).set_stride(st_stride) \
        .set_data_type(cudnn.data_type.FLOAT)
    fwd = (_finish(fwd), {"q": qt, "k": kt, "v": vt, "o": ot, "stats": stt})

    bwd = graph()
    tb = {"q": t(bwd, "q", Q), "k": t(bwd, "k", K), "v": t(bwd, "v", V), "o": t(bwd, "o", O),
          "do": t(bwd, "dO", DO),
          "stats": t(bwd, "stats", STATS, st_dim, st_stride, cudnn.data_type.FLOAT)}
    dq, dk, dv = bwd.sdpa_backward(**_causal_alibi(
        name="alibi_bwd", q=tb["q"], k=tb["k"], v=tb["v"], o=tb["o"], dO=tb["do"],
        stats=tb["stats"], attn_scale=scale))
    for x, uid in ((dq, DQ), (dk, DK), (dv, DV)):
        x.set_uid(uid).set_output(True).set_dim(dim).set_stride(stride).set_data_type(io)
    tb.update(dq=dq, dk=dk, dv=dv)
    _GRAPHS[key] = (fwd, (_finish(bwd), tb))
    return _GRAPHS[key]


def _run(g, tensors: dict, buffers: dict, uids: dict) -> None:
    ws = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
    names = list(buffers)
    try:
        g.execute([buffers[n] for n in names], ws, handle=_handle(),
                  tensor_uids=[uids[n] for n in names])
    except TypeError:  # older frontends: a {graph tensor: buffer} variant pack
        g.execute({tensors[n]: buffers[n] for n in names}, ws)


class _CudnnAlibi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        (fwd, ft), _ = _graphs(q, scale)
        b, h, s, _d = q.shape
        o = torch.empty_like(q)
        stats = torch.empty(b, h, s, 1, dtype=torch.float32, device=q.device)
        _run(fwd, ft, {"q": q, "k": k, "v": v, "o": o, "stats": stats},
             {"q": Q, "k": K, "v": V, "o": O, "stats": STATS})
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, stats = ctx.saved_tensors
        _, (bwd, bt) = _graphs(q, ctx.scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _run(bwd, bt, {"q": q, "k": k, "v": v, "o": o, "do": grad.contiguous(),
                       "stats": stats, "dq": dq, "dk": dk, "dv": dv},
             {"q": Q, "k": K, "v": V, "o": O, "do": DO, "stats": STATS, "dq": DQ, "dk": DK,
              "dv": DV})
        return dq, dk, dv, None


def cudnn_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention with cuDNN's ALiBi mask; q, k, v [b, n, s, d] contiguous, bf16/fp16."""
    return _CudnnAlibi.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)
