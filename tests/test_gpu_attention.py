"""GPU checks of the attention variants (run with `pytest -m gpu`; the CPU ones are in
tests/test_attention_variants.py): augmented and cuDNN ALiBi against the dense-bias reference,
cuDNN's bias form and dropout, FlexAttention ALiBi, the fused Triton RoPE against megatron-core's,
and TP2 == TP1 over NCCL."""
import pytest
import torch
import torch.multiprocessing as mp

from framework.config import ParallelConfig
from framework.fast.alibi import alibi_bias, alibi_slopes
from helpers import free_port
from test_attention_variants import TP_CASES, _check_tp, _tp_worker, mp1, tiny  # noqa: F401


@pytest.mark.gpu
@pytest.mark.gpus(2)
def test_tp2_matches_tp1_nccl(tmp_path):
    """The same on GPU, where mcore's own all-gather path replicates the KV heads and ALiBi runs
    through FlexAttention."""
    cases = list(TP_CASES)
    mp.spawn(_tp_worker, args=(free_port(), cases, "nccl", str(tmp_path)), nprocs=2, join=True)
    _check_tp(torch.load(tmp_path / "results.pt"), cases, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["augmented", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_augmented_alibi_matches_dense_cuda(mp1, dtype, kernel):
    """alibi_kernel=augmented (and =cudnn) on CUDA equals the dense-bias reference (fp32,
    float64 bias) in outputs and q/k/v gradients: MHA and GQA, 1024 and 4096 keys. bf16 runs the
    extra head dims through SDPA (or cuDNN's own ALiBi mask, whose slopes must be ours for 20
    and 8 heads); fp32 falls back to FlexAttention (the extra dims missed the fp32 tolerance)."""
    from framework.fast import cudnn_attention

    if kernel == "cudnn" and not cudnn_attention.available():
        pytest.skip("nvidia-cudnn-frontend is not installed")
    from megatron.core.transformer.enums import AttnMaskType

    from framework.models.transformer import transformer_config
    from framework.models.layers import SDPAttention

    torch.manual_seed(0)
    dev = torch.device("cuda")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for heads, groups, s in ((20, 20, 1024), (8, 2, 4096)):
        cfg = tiny(hidden_size=heads * 64, num_attention_heads=heads, num_query_groups=groups,
                   position_embedding_type="alibi")
        tcfg = transformer_config(cfg, ParallelConfig(), bf16=False, fp16=False, on_gpu=False)
        # training mode (no dropout in this config): the cuDNN kernel serves training only
        att = SDPAttention(tcfg, 1, AttnMaskType.causal, "self", alibi=True,
                           alibi_kernel=kernel).train()
        assert tcfg.attention_dropout == 0
        q = torch.randn(s, 2, heads, 64, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(s, 2, groups, 64, device=dev, dtype=dtype, requires_grad=True)
                for _ in range(2))
        built = len(cudnn_attention._GRAPHS)
        out = att(q, k, v, None)
        if kernel == "cudnn" and dtype == torch.bfloat16:  # cuDNN ran, not a silent fallback
            assert not cudnn_attention._BROKEN and len(cudnn_attention._GRAPHS) > built, \
                cudnn_attention._BROKEN
        qq, kk, vv = (t.float().permute(1, 2, 0, 3) for t in (q, k, v))
        kk, vv = (t.repeat_interleave(heads // groups, 1) for t in (kk, vv))
        bias = alibi_bias(alibi_slopes(heads).to(dev), s, s, dev, torch.float64).float()
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias,
                                                               scale=0.125)
        ref = ref.permute(2, 0, 1, 3).reshape(s, 2, -1)
        torch.testing.assert_close(out.float(), ref, **tol)
        w = torch.randn_like(ref)
        got = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
        want = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, e in zip(got, want):
            # gradients sum over many keys/queries: compare relative to their scale
            err = (a.float() - e.float()).abs().max() / e.float().abs().max()
            assert err < (3e-2 if dtype == torch.bfloat16 else 2e-3), (heads, s, err)


@pytest.mark.gpu
def test_cudnn_alibi_bias_form_and_dropout(mp1):
    """The cuDNN kernel's dense-bias form (a TP rank's slopes, here rank 1 of 2 for 20 heads,
    GQA) equals the dense reference in outputs and gradients; with attention dropout it is
    reproducible from torch's CUDA seed, drops about p of the probabilities, and backward uses
    the forward's mask (the gradient of sum(out * w) w.r.t. v is P_dropped^T w)."""
    from framework.fast import cudnn_attention
    from framework.fast.alibi import alibi_slopes_for_rank

    if not cudnn_attention.available():
        pytest.skip("nvidia-cudnn-frontend is not installed")
    torch.manual_seed(0)
    dev, s, b, heads, groups = torch.device("cuda"), 512, 2, 10, 5
    slopes = alibi_slopes_for_rank(20, 2, 1).float().to(dev)
    q = torch.randn(b, heads, s, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, groups, s, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out = cudnn_attention.cudnn_causal_attention(q, k, v, 0.125, slopes, mode="bias")
    qq, kk, vv = (t.float() for t in (q, k, v))
    kk, vv = (t.repeat_interleave(heads // groups, 1) for t in (kk, vv))
    bias = alibi_bias(slopes.double(), s, s, dev, torch.float64).float()
    ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias, scale=0.125)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, e in zip(got, want):
        assert (a.float() - e.float()).abs().max() / e.float().abs().max() < 3e-2
    # dropout: same seed -> same output; about p of the probabilities dropped, the rest scaled
    # by 1/(1-p); backward applies the forward's mask. v = identity columns, so
    # out[..., j] = P_dropped[:, j] for the first 64 keys.
    p = 0.25
    v1 = torch.eye(s, 64, device=dev).repeat(b, groups, 1, 1).bfloat16().requires_grad_()
    k1 = k.detach()
    plain = cudnn_attention.cudnn_causal_attention(q.detach(), k1, v1, 0.125,
                                                   mode="alibi").float()[..., :64]
    runs = []
    for _ in range(2):
        torch.cuda.manual_seed(123)
        runs.append(cudnn_attention.cudnn_causal_attention(q.detach(), k1, v1, 0.125,
                                                           dropout_p=p, mode="alibi"))
    assert torch.equal(runs[0], runs[1])
    pd = runs[0].float()[..., :64]
    live = plain > 1e-2  # probabilities well above bf16 underflow
    kept = pd[live] > 0
    assert abs(1 - kept.float().mean().item() - p) < 0.03
    torch.testing.assert_close(pd[live][kept], plain[live][kept] / (1 - p), rtol=2e-2, atol=1e-3)
    w = torch.randn(b, heads, s, 64, device=dev)
    gv, = torch.autograd.grad((runs[0].float() * w).sum(), (v1,))
    want = torch.einsum("bhij,bhid->bhjd", pd, w)
    want = want.view(b, groups, heads // groups, 64, 64).sum(2)
    err = (gv[:, :, :64].float() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err


@pytest.mark.gpu
def test_flex_alibi_matches_reference():
    from framework.fast.alibi import flex_alibi

    torch.manual_seed(0)
    dev = torch.device("cuda")
    for heads, groups, s in ((8, 8, 256), (6, 2, 200)):
        q = torch.randn(2, heads, s, 64, device=dev, requires_grad=True)
        k = torch.randn(2, groups, s, 64, device=dev, requires_grad=True)
        v = torch.randn(2, groups, s, 64, device=dev, requires_grad=True)
        slopes = alibi_slopes(heads).float().to(dev)
        out = flex_alibi(q, k, v, slopes, 0.125)
        # dense reference on GPU (the loops of _reference are for small sizes)
        kk, vv = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        bias = alibi_bias(slopes, s, s, dev)
        ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=bias,
                                                               scale=0.125)
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        out.sum().backward()
        gq = q.grad.clone()
        q.grad = None
        ref.sum().backward()
        torch.testing.assert_close(gq, q.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_megatron_core(dtype):
    """framework/fast/rope.py's Triton RoPE equals mcore's unfused `_apply_rotary_pos_emb_bshd`
    in outputs and input gradients: full and partial rotary dims (pass-through part), a
    non-contiguous input (a slice of a fused qkv tensor, as mcore hands it over)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from framework.fast.rope import fused_rope, fused_supported

    torch.manual_seed(0)
    dev = torch.device("cuda")
    s, b, n, d = 256, 3, 5, 64
    for rot in (64, 32):
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=dev).float() / rot))
        ang = torch.outer(torch.arange(s, device=dev).float(), inv)
        freqs = torch.cat([ang, ang], -1)[:, None, None, :]
        qkv = torch.randn(s, b, n, 3 * d, device=dev, dtype=dtype, requires_grad=True)
        t = qkv[..., d:2 * d]  # non-contiguous
        assert fused_supported(t, freqs)
        got = fused_rope(t, freqs)
        # reference in float64 (mcore rounds cos/sin to the input dtype; we keep them in fp32)
        ref = _apply_rotary_pos_emb_bshd(t.double(), freqs.double())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.double(), ref, **tol)
        w = torch.randn_like(ref)
        g_got, = torch.autograd.grad((got.double() * w).sum(), qkv)
        g_ref, = torch.autograd.grad((ref * w).sum(), qkv)
        torch.testing.assert_close(g_got.double(), g_ref.double(), **tol)
        assert g_got[..., :d].abs().max() == 0 and g_got[..., 2 * d:].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("qpg", [1, 4])
def test_fused_qkv_rope_is_split_then_fused_rope_cuda(qpg):
    """`fused_qkv_rope` (model.qkv_rope_fusion) compiled on the GPU, at the Llama-3.2-1B
    attention shape (8 KV groups of 4 query heads, d 64, seq 2048) and MHA: bit-identical q, k, v
    and mixed-QKV gradient to mcore's split followed by `fused_rope` on q and k."""
    from framework.fast.rope import fused_qkv_rope, fused_qkv_rope_supported, fused_rope

    torch.manual_seed(0)
    dev = torch.device("cuda")
    s, b, g, d = 2048, 2, 8, 64
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    ang = torch.outer(torch.arange(s, device=dev).float(), inv)
    freqs = torch.cat([ang, ang], -1)[:, None, None, :]
    mixed = torch.randn(s, b, g, (qpg + 2) * d, device=dev, dtype=torch.bfloat16)
    assert fused_qkv_rope_supported(mixed.is_cuda, s, d, freqs, freqs)
    m1 = mixed.clone().requires_grad_()
    m2 = mixed.clone().requires_grad_()
    got = fused_qkv_rope(m1, freqs, freqs, qpg)
    q, k, v = torch.split(m2, [qpg * d, d, d], dim=3)
    want = (fused_rope(q.reshape(s, b, g * qpg, d), freqs), fused_rope(k, freqs), v)
    for a, r in zip(got, want):
        assert a.shape == r.shape and torch.equal(a, r)
    grads = [torch.randn_like(t) for t in got]
    torch.autograd.backward(list(got), grads)
    torch.autograd.backward(list(want), grads)
    assert torch.equal(m1.grad, m2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliding_window_matches_reference_cuda(mp1, dtype):
    """model.sliding_window on CUDA: SDPA with the band mask against the float64 reference
    (tests/test_sliding_window.py), outputs and q/k/v gradients, MHA and GQA, in training and
    for a decode query over a padded cache. Written 2026-12-05 without a GPU."""
    from megatron.core.transformer.enums import AttnMaskType

    from test_sliding_window import windowed_attention, windowed_reference

    torch.manual_seed(0)
    dev = torch.device("cuda")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for heads, groups, s, window in ((16, 16, 1024, 128), (8, 2, 2048, 256)):
        att = windowed_attention(window, heads, groups).train()
        q = torch.randn(s, 2, heads, 16, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(s, 2, groups, 16, device=dev, dtype=dtype, requires_grad=True)
                for _ in range(2))
        go = torch.randn(s, 2, heads * 16, device=dev, dtype=torch.float64)
        out = att(q, k, v, None)
        (out.double() * go).sum().backward()
        got = [out.detach().double()] + [t.grad.double() for t in (q, k, v)]
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = windowed_reference(qr, kr, vr, window)
        (ref * go).sum().backward()
        for a, b, name in zip(got, [ref.detach(), qr.grad, kr.grad, vr.grad],
                              ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(a, b, **tol, msg=f"{name} {heads}/{groups} {s}")
        pad = torch.zeros(2, s, dtype=torch.bool, device=dev)
        pad[1, :5] = True
        with torch.no_grad():
            one = att.eval()(q[-1:], k, v, pad[:, None, None, :],
                             attn_mask_type=AttnMaskType.no_mask)
        torch.testing.assert_close(one.double(), windowed_reference(q[-1:], k, v, window, pad),
                                   **tol)
