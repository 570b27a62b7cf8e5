"""`train.fp8` on CPU (framework/fast/fp8.py): FP8 itself needs a GPU, so the GEMMs are emulated
(quantise to e4m3/e5m2 with torch's float8 casts, dequantise, fp32 matmul), which is also what
the linear layers run on CPU tensors. Checked here:
* the power-of-two scales, and the emulated GEMM against torch's own `_scaled_mm` on CPU;
* the FP8 linear (both recipes, forward and both backward GEMMs, fused main-grad accumulation)
  against the exact GEMM on perturbed inputs, within a rigorous elementwise bound of FP8's
  rounding error (and not error-free: the operands really are quantised);
* TP2 over gloo (2 processes): the amax all-reduce, and column / sequence-parallel / row
  layers equal to the TP1 layer up to fp32 summation order (without the reduction they differ
  by FP8 rounding);
* the GPT model: the four linears per layer run FP8 in training only; the state dict and a
  checkpoint are the same with the switch on or off and load across it; recompute unchanged;
* the config field and its errors.
"""
import dataclasses

import pytest
import torch

from framework.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from framework.fast import fp8
from helpers import free_port, spawn

FMAX = {fp8.E4M3: 448.0, fp8.E5M2: 57344.0}
UNIT = {fp8.E4M3: 2.0 ** -4, fp8.E5M2: 2.0 ** -3}  # half an ulp, relative (3 / 2 mantissa bits)
SUB = {fp8.E4M3: 2.0 ** -10, fp8.E5M2: 2.0 ** -17}  # half the subnormal spacing, absolute


# --------------------------------------------------------------------------------------------
# scales and the emulated GEMM
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_pow2_scale_is_the_largest_power_of_two_that_fits(dtype):
    g = torch.Generator().manual_seed(0)
    amax = torch.cat([torch.exp(torch.randn(2000, generator=g, dtype=torch.float64) * 20).float(),
                      torch.tensor([0.0, 1.0, 1.75, 1.7500001, 448.0, 448.00003, 57344.0, 3e38])])
    scale, inv = fp8.pow2_scale(amax, dtype)
    s, a = scale.double(), amax.double()
    assert torch.equal(scale * inv, torch.ones_like(scale))
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two
    big = a > 2.0 ** -90
    assert (a * s <= FMAX[dtype]).all()
    assert (2 * a[big] * s[big] > FMAX[dtype]).all()  # the largest such
    assert torch.isfinite(scale).all() and scale[amax.numel() - 8] > 0  # amax 0: finite
    # the scaled amax itself is representable: no overflow to NaN/inf in the cast
    assert torch.isfinite((amax * scale).to(dtype).float()).all()


def test_emulated_gemm_matches_torch_scaled_mm_on_cpu():
    """mm8's emulation (dequantise + fp32 matmul) against torch's own FP8 GEMM on CPU, for
    one scale per tensor and for row scales (the scale layouts _scaled_mm expects)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(48, 64, generator=g) * torch.linspace(0.1, 10, 48)[:, None]
    b = torch.randn(32, 64, generator=g) * torch.linspace(3, 0.2, 32)[:, None]
    for bdtype in (fp8.E4M3, fp8.E5M2):
        a8, _, ai = fp8.cast_tensorwise(a, fp8.E4M3)
        b8, _, bi = fp8.cast_tensorwise(b, bdtype)
        ref = torch._scaled_mm(a8, b8.t(), scale_a=ai, scale_b=bi, out_dtype=torch.float32)
        torch.testing.assert_close(fp8.mm8(a8, ai, b8, bi, torch.float32), ref,
                                   rtol=1e-5, atol=1e-5)
    a8, ai = fp8.cast_rowwise(a, fp8.E4M3, 1)
    b8, bi = fp8.cast_rowwise(b, fp8.E4M3, 1)
    got = fp8.mm8(a8, ai, b8, bi, torch.float32)
    try:
        ref = torch._scaled_mm(a8, b8.t(), scale_a=ai[:, None], scale_b=bi[None, :],
                               out_dtype=torch.float32)
    except RuntimeError:  # this torch has no rowwise scaling on CPU: compare to dequantised
        ref = (a8.double() * ai[:, None].double()) @ (b8.double() * bi[:, None].double()).t()
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)
    # rows quantised along dim 0 come out transposed: x^T's rows
    at8, ati = fp8.cast_rowwise(a, fp8.E4M3, 0)
    assert at8.shape == (64, 48) and ati.shape == (64,)
    ref8, _ = fp8.cast_rowwise(a.t().contiguous(), fp8.E4M3, 1)
    assert torch.equal(at8.view(torch.uint8), ref8.view(torch.uint8))


def _gemm_bound(a, b, a_rows_amax, b_rows_amax, da, db):
    """Elementwise bound on |fp8(a) @ fp8(b)^T - a @ b^T| (float64): each element of a is
    rounded with relative error <= UNIT[da] plus, below the normal range, an absolute error
    <= SUB[da] / scale, where 1/scale <= 2 amax / FMAX (amax of its row, or of the tensor)."""
    a, b = a.double().abs(), b.double().abs()
    ea = UNIT[da] * a + SUB[da] * 2 * a_rows_amax.double()[:, None] / FMAX[da]
    eb = UNIT[db] * b + SUB[db] * 2 * b_rows_amax.double()[:, None] / FMAX[db]
    return ea @ b.t() + a @ eb.t() + ea @ eb.t() + 1e-5 * (a @ b.t()) + 1e-30


def _perturbed_case(seed, m=96, k=80, n=48):
    """Inputs with uneven magnitudes (rows, columns and a few outliers): random biases,
    weights with per-row scales; nothing zero-initialised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[:, 3] *= 20
    w = torch.randn(n, k, generator=g) * 0.05 * torch.exp(torch.randn(n, 1, generator=g))
    w[5, 7] = 2.0
    b = torch.randn(n, generator=g) * 0.1
    dy = torch.randn(m, n, generator=g) * torch.exp(torch.randn(1, n, generator=g))
    return x, w, b, dy


def _amaxes(t, recipe, dim):
    """Per-row amax of the GEMM operand t (rows along `dim` of t), or the tensor's amax."""
    rows = t.shape[0] if dim == 1 else t.shape[1]
    if recipe == "tensorwise":
        return t.abs().max().expand(rows)
    return t.abs().amax(dim=dim)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_matches_exact_gemm_within_fp8_error(recipe):
    x, w, b, dy = _perturbed_case(2)
    grad_dtype = fp8.GRAD_DTYPE[recipe]
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    y = fp8.fp8_linear(xx, ww, bb, recipe, "column", False, False, False, None)
    y.backward(dy)
    e4 = fp8.E4M3
    checks = {
        # forward: x [M,K] . w [N,K]^T, both e4m3, rows along K
        "forward": (y - b, x @ w.t(), _gemm_bound(x, w, _amaxes(x, recipe, 1),
                                                  _amaxes(w, recipe, 1), e4, e4)),
        # dgrad: dy [M,N] . (w^T) [K,N]^T
        "dgrad": (xx.grad, dy @ w, _gemm_bound(dy, w.t(), _amaxes(dy, recipe, 1),
                                               _amaxes(w, recipe, 0), grad_dtype, e4)),
        # wgrad: dy^T [N,M] . (x^T) [K,M]^T
        "wgrad": (ww.grad, dy.t() @ x, _gemm_bound(dy.t(), x.t(), _amaxes(dy, recipe, 0),
                                                   _amaxes(x, recipe, 0), grad_dtype, e4)),
    }
    for name, (got, ref, bound) in checks.items():
        err = (got.double() - ref.double()).abs()
        worst = (err / bound).max().item()
        rel = (err.norm() / ref.double().norm()).item()
        print(f"{recipe} {name}: rel error {rel:.2e}, worst error / bound {worst:.2f}")
        assert worst <= 1.0, (name, worst)
        # quantised for real: FP8 rounding leaves an error of the order of its unit
        assert rel > UNIT[e4] / 50, (name, rel)
    torch.testing.assert_close(bb.grad, dy.sum(0), rtol=1e-6, atol=1e-5)


def _delayed_layer():
    holder = type("Layer", (), {})()
    return fp8.Fp8History([holder], torch.device("cpu")), holder.fp8_meta


def _run_linear(x, w, b, dy, recipe, meta=None):
    xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8.fp8_linear(xx, ww, bb, recipe, "column", False, False, False, None, meta)
    y.backward(dy)
    return [y.detach(), xx.grad, ww.grad, bb.grad]


def test_delayed_scaling_history_saturation_and_roll():
    """train.fp8=delayed: the first step scales like tensorwise (current amaxes) and fills each
    tensor's history; the roll pushes the step's amaxes in and clears the step slot; a later step
    scales by the history's max (a 3x larger input saturates at the format's max, a 3x smaller
    one keeps the old scale) and records its own amax; HISTORY steps later an amax is gone."""
    x, w, b, dy = _perturbed_case(2)
    hist, meta = _delayed_layer()
    h = fp8.HISTORY
    got = _run_linear(x, w, b, dy, "delayed", meta)
    for a, r in zip(got, _run_linear(x, w, b, dy, "tensorwise")):
        assert torch.equal(a, r)  # the same bits: no history yet, so the current amax
    amax = {fp8.X: x.abs().max(), fp8.W: w.abs().max(), fp8.DY: dy.abs().max()}
    for role, a in amax.items():
        assert torch.equal(meta.rows[role], a.expand(h + 1))
    hist.step()
    for role, a in amax.items():
        assert torch.equal(meta.rows[role, :h], a.expand(h)) and meta.rows[role, h] == 0
    for factor in (3.0, 1 / 3):
        xs = x * factor
        y = _run_linear(xs, w, b, dy, "delayed", meta)[0]
        q, inv = fp8.quantise_ref(xs, amax[fp8.X], fp8.E4M3, None, saturate=True)
        wq, winv = fp8.quantise_ref(w, amax[fp8.W], fp8.E4M3, None)
        assert torch.equal(y, fp8.mm8(q, inv, wq, winv, y.dtype, b))
        assert (q.float().abs() == 448).any() == (factor > 1)  # saturated: 3x the history's max
        assert meta.rows[fp8.X, h] == xs.abs().max()  # this step's amax, recorded
        meta.rows[:, h] = 0.0
    for _ in range(h - 1):
        hist.step()
        assert meta.rows[fp8.X, :h].max() == amax[fp8.X]
    hist.step()
    assert meta.rows[fp8.X, :h].max() == 0  # HISTORY steps of nothing recorded: forgotten
    # checkpoints: the buffer, back into a chunk of the same shape only
    saved = hist.state()
    other, ometa = _delayed_layer()
    assert not any(ometa.primed)
    assert other.load(saved) and all(ometa.primed) and torch.equal(other.buf, hist.buf)
    assert not other.load({"amax": torch.zeros(2, 3, h + 1), "primed": torch.ones(2, 3).bool()})
    assert not other.load(torch.zeros(1, 3, h + 1))


def test_delayed_resume_edge_cases():
    """A checkpoint saved before any step holds all-zero histories: loaded, they are not primed,
    and the next step casts by the current amax, as a fresh run does (not by a zero history,
    which would saturate everything). An inf in a tensor's first cast reaches that cast (as
    with tensorwise) but the history keeps the finite amax. A primed history of zeros scales
    by 1."""
    x, w, b, dy = _perturbed_case(2)
    fresh, _ = _delayed_layer()
    loaded, meta = _delayed_layer()
    assert loaded.load(fresh.state()) and not any(meta.primed)
    for a, r in zip(_run_linear(x, w, b, dy, "delayed", meta),
                    _run_linear(x, w, b, dy, "tensorwise")):
        assert torch.equal(a, r)
    _, meta = _delayed_layer()
    xi = x.clone()
    xi[0, 0] = float("inf")
    _run_linear(xi, w, b, dy, "delayed", meta)
    assert torch.equal(meta.rows[fp8.X], fp8.finite_amax(xi).expand(fp8.HISTORY + 1))
    zero = torch.zeros(fp8.HISTORY)
    q, _, inv = fp8.cast(x, zero, fp8.E4M3, None, amax_out=torch.zeros(1))
    assert inv == 1.0 and torch.equal(q, x.clamp(-448, 448).to(fp8.E4M3))


def test_delayed_history_records_finite_amax_only():
    """A NaN in a tensor reaches its FP8 copy (and the loss, which the NaN guard skips) and an
    inf saturates like any value beyond the max, but neither reaches the history, whose spoiled
    scale would outlive the step."""
    hist, meta = _delayed_layer()
    meta.rows[fp8.X, :fp8.HISTORY] = 4.0
    t = torch.tensor([[1.0, -7.0, float("inf")], [float("nan"), 2.0, 0.5]])
    q, _, _ = fp8.cast(t, meta.rows[fp8.X, :fp8.HISTORY], fp8.E4M3, None,
                       amax_out=meta.rows[fp8.X, fp8.HISTORY:])
    assert meta.rows[fp8.X, fp8.HISTORY] == 7.0
    assert q.float()[0, 2] == 448 and q.float()[1, 0].isnan()


def test_delayed_cast_kernel_interpreted():
    """The Triton cast's delayed form under Triton's CPU interpreter: it equals the plain cast
    of the input clamped to the format's range (saturation; bits and transpose), and it maxes the
    tensor's finite amax into the step slot across tiles (an inf and a NaN left out). The
    interpreter's own float8 rounding differs from the GPU's, so bits against torch's reference
    are the GPU test's (test_gpu_fp8)."""
    from helpers import interpret_triton

    out = interpret_triton("""
import torch
from framework.fast import fp8
g = torch.Generator().manual_seed(0)
x = torch.randn(70, 136, generator=g) * 3
x[5, 9], x[66, 130], x[40, 100] = float("inf"), float("nan"), -50.0
grid = ((70 + fp8.BLOCK_M - 1) // fp8.BLOCK_M, (136 + fp8.BLOCK_K - 1) // fp8.BLOCK_K)

def run(t, hist, delayed, dtype):
    q, qt = torch.empty(70, 136, dtype=dtype), torch.empty(136, 70, dtype=dtype)
    inv = torch.empty(())
    fp8._cast_kernel[grid](t, hist, q, qt, inv, hist[fp8.HISTORY:], inv, 70, 136, t.stride(0),
                           EMAX_=fp8.EMAX[dtype], MODE=0, ROWS=True, COLS=True,
                           BM=fp8.BLOCK_M, BK=fp8.BLOCK_K, NPARTS=fp8.HISTORY, DELAYED=delayed,
                           ACT=0, HAS_BIAS=False)
    return q.view(torch.uint8), qt.view(torch.uint8), inv

for dtype in (fp8.E4M3, fp8.E5M2):
    hist = torch.zeros(fp8.HISTORY + 1)
    hist[3] = 12.0  # the history's max: 50 and inf saturate
    q, qt, inv = run(x, hist, True, dtype)
    assert hist[fp8.HISTORY] == 50.0, hist
    lim = torch.finfo(dtype).max * inv
    clamped = torch.where(x.isnan(), x, x.clamp(-lim, lim))
    q2, qt2, inv2 = run(clamped, hist.clone(), False, dtype)
    assert torch.equal(q, q2) and torch.equal(qt, qt2) and inv == inv2
    assert torch.equal(qt, q.t().contiguous())
    assert inv == fp8.pow2_scale(torch.tensor(12.0), dtype)[1]
    q0, _, inv0 = run(x, torch.zeros(fp8.HISTORY + 1), True, dtype)  # a history of zeros
    assert inv0 == 1.0
print("ok")
""")
    assert "ok" in out


def test_activation_cast_kernel_interpreted():
    """The cast kernel's activation prologue (bias + tanh-GeLU, and without bias) under Triton's
    interpreter: against the plain cast of the activation computed in fp32 by torch
    (`act_ref`), the FP8 bits agree but for rounding ties the two fp32 activations straddle
    (at most one FP8 step, in a few elements), in both layouts, and the recorded amax agrees."""
    from helpers import interpret_triton

    out = interpret_triton("""
import torch
from framework.fast import fp8
g = torch.Generator().manual_seed(1)
M, K = 70, 136
grid = ((M + fp8.BLOCK_M - 1) // fp8.BLOCK_M, (K + fp8.BLOCK_K - 1) // fp8.BLOCK_K)

def run(t, bias, act, trans=True):
    hist = torch.zeros(fp8.HISTORY + 1)
    hist[0] = 3.0
    q, qt = torch.empty(M, K, dtype=fp8.E4M3), torch.empty(K, M, dtype=fp8.E4M3)
    inv = torch.empty(())
    fp8._cast_kernel[grid](t, hist, q, qt, inv, hist[fp8.HISTORY:],
                           bias if bias is not None else inv, M, K, t.stride(0),
                           EMAX_=fp8.EMAX[fp8.E4M3], MODE=0, ROWS=True, COLS=True,
                           BM=fp8.BLOCK_M, BK=fp8.BLOCK_K, NPARTS=fp8.HISTORY, DELAYED=True,
                           ACT=act, HAS_BIAS=bias is not None, TRANS=trans)
    return q.view(torch.int8).int(), qt.view(torch.int8).int(), inv, hist[fp8.HISTORY]

for name, width, bias in (("gelu_tanh", K, torch.randn(K, generator=g)),
                          ("gelu_tanh", K, None)):
    h = torch.randn(M, width, generator=g) * 2
    q, qt, inv, amax = run(h, bias, fp8.ACTS.index(name) + 1)
    a = fp8.act_ref(h, bias, name)
    q2, qt2, inv2, amax2 = run(a, None, 0)
    assert inv == inv2 and torch.equal(qt, q.t().contiguous())
    diff = (q - q2).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, diff.max(), diff.sum())
    assert abs(amax - amax2) <= 1e-5 * amax2, (name, amax, amax2)
    assert a.min() < -0.1 and q.float().std() > 10  # a real activation, quantised
    # the transpose stored through transposed addresses (no tl.trans): the same bytes
    q3, qt3, inv3, amax3 = run(h, bias, fp8.ACTS.index(name) + 1, trans=False)
    assert torch.equal(q3, q) and torch.equal(qt3, qt) and inv3 == inv and amax3 == amax
# rows past the tensor's end (70 of a 128-row tile) hold gelu(bias): kept out of the amax
h = torch.full((M, K), -12.0)
_, _, _, amax = run(h, torch.full((K,), 3.0), 1)
assert amax < 1e-6, amax
print("ok")
""")
    assert "ok" in out


@pytest.mark.parametrize("act", fp8.ACTS)
def test_fused_activation_linear_equals_activation_then_linear(act):
    """fp8_linear(h, act=...) (fc2 of an MLP computing its input activation inside the FP8 cast,
    recipe delayed) against the activation as its own autograd op followed by the FP8 linear,
    in fp32 on CPU: the same output, gradients of h, the bias and the weight, and the same amax
    histories, bit for bit, over a first (unprimed) and a second (primed) step."""
    x, w, b, _ = _perturbed_case(4, m=64, k=96, n=48)
    h = x.clone()
    bias = 0.1 * b.repeat(2)[:96]
    dy = torch.randn(64, 48, generator=torch.Generator().manual_seed(9))
    hist_ref, meta_ref = _delayed_layer()
    hist_got, meta_got = _delayed_layer()
    for step in range(2):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb = None if bias is None else bias.clone().requires_grad_()
        a = fp8.act_ref(hh, bb, act)
        y_ref = fp8.fp8_linear(a, ww, None, "delayed", "row", False, False, False, None,
                               meta_ref)
        y_ref.backward(dy)
        ref = [y_ref.detach(), hh.grad, ww.grad] + ([bb.grad] if bb is not None else [])
        hh2, ww2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb2 = None if bias is None else bias.clone().requires_grad_()
        y = fp8.fp8_linear(hh2, ww2, None, "delayed", "row", False, False, False, None,
                           meta_got, act=act, act_bias=bb2)
        y.backward(dy)
        got = [y.detach(), hh2.grad, ww2.grad] + ([bb2.grad] if bb2 is not None else [])
        for r, g_ in zip(ref, got):
            assert torch.equal(r, g_), step
        assert torch.equal(hist_ref.buf, hist_got.buf)
        hist_ref.step()
        hist_got.step()
        h = h * 1.5  # the second step's activations exceed the history: saturation included
    assert meta_got.primed == [True, True, True]


def test_mlp_casts_the_activation_in_fc2_with_delayed(mp1, monkeypatch):
    """An MLP built with `fp8_act_cast` (what model.fp8_fused_act resolves to) hands fc1's output
    and bias to fc2, whose FP8 path computes the activation in its cast; in evaluation it runs
    the unfused activation. Same output and gradients as the MLP without it (fp32, CPU)."""
    import torch.nn.functional as F

    from framework.models import layers
    from framework.models.transformer import transformer_config

    cfg = transformer_config(_tiny(), ParallelConfig(), bf16=False, fp16=False, on_gpu=False,
                             fp8="delayed")
    cfg = dataclasses.replace(cfg, activation_func=F.gelu, bias_activation_fusion=True)
    # mcore's jit-fused bias-GeLU is a GPU kernel: its torch arithmetic on CPU
    monkeypatch.setattr("megatron.core.fusions.fused_bias_gelu.bias_gelu_impl",
                        lambda h, b: fp8.act_ref(h, b, "gelu_tanh"))
    monkeypatch.setattr("megatron.core.transformer.mlp.bias_gelu_impl",
                        lambda h, b: fp8.act_ref(h, b, "gelu_tanh"))
    acts = []
    real = layers.fp8_linear
    monkeypatch.setattr(layers, "fp8_linear",
                        lambda *a, **k: acts.append(a[11]) or real(*a, **k))
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        mlp = layers.ActRecomputeMLP(dataclasses.replace(cfg, fp8_act_cast=fused))
        assert mlp.fp8_act == ("gelu_tanh" if fused else None)
        hist = fp8.Fp8History([mlp.linear_fc1, mlp.linear_fc2], torch.device("cpu"))
        with torch.no_grad():
            for p_ in mlp.parameters():
                p_.add_(0.05 * torch.randn_like(p_))
        x = torch.randn(16, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        y, yb = mlp(x)
        (y + yb).backward(torch.ones_like(y))
        out[fused] = [y.detach(), x.grad] + [p_.grad for p_ in mlp.parameters()]
        assert mlp.linear_fc2.fp8_meta.primed == [True, True, True]
        assert hist.buf[1, fp8.X, 0] > 0
        assert getattr(mlp.linear_fc2, "fp8_act_input", None) is None
    assert acts == [None, None, None, "gelu_tanh"]
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)
    mlp.eval()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x)[0], out[True][0], rtol=0.1, atol=0.1)
    assert len(acts) == 4  # evaluation: no FP8 call


def test_mlp_casts_fc1_output_gradient_in_the_activation_backward(mp1, monkeypatch):
    """model.fp8_fused_act_backward (`fp8_act_bwd_cast`): from the second step (fc1's output
    gradient has an amax history), fc2's activation backward also casts that gradient for fc1,
    whose backward takes the casts instead of casting again. Three steps of the MLP, fp32 on
    CPU (the torch form of the fused pass): outputs, gradients and amax histories bit for bit
    those of the MLP without it; fc1 casts its own output gradient only at the first step, and
    the gradient the activation backward hands fc1 is `unstored`'s stand-in (never read)."""
    import torch.nn.functional as F

    from framework.models import layers
    from framework.models.transformer import transformer_config

    cfg = transformer_config(_tiny(), ParallelConfig(), bf16=False, fp16=False, on_gpu=False,
                             fp8="delayed")
    cfg = dataclasses.replace(cfg, activation_func=F.gelu, bias_activation_fusion=True,
                              fp8_act_cast=True)
    monkeypatch.setattr("megatron.core.fusions.fused_bias_gelu.bias_gelu_impl",
                        lambda h, b: fp8.act_ref(h, b, "gelu_tanh"))
    monkeypatch.setattr("megatron.core.transformer.mlp.bias_gelu_impl",
                        lambda h, b: fp8.act_ref(h, b, "gelu_tanh"))
    fused_calls, dy_casts = [], []
    real_fused, real_cast = fp8.act_backward_cast, fp8._cast_per_tensor
    monkeypatch.setattr(fp8, "act_backward_cast",
                        lambda *a, **k: fused_calls.append(k["store_dh"]) or real_fused(*a, **k))
    monkeypatch.setattr(fp8, "_cast_per_tensor", lambda recipe, x, dtype, meta, role, *a, **k: (
        dy_casts.append(meta) if role == fp8.DY else None) or real_cast(recipe, x, dtype, meta,
                                                                        role, *a, **k))
    out = {}
    for bwd in (False, True):
        fused_calls.clear()
        dy_casts.clear()
        torch.manual_seed(0)
        mlp = layers.ActRecomputeMLP(dataclasses.replace(cfg, fp8_act_bwd_cast=bwd))
        assert mlp.fp8_act_bwd is bwd
        hist = fp8.Fp8History([mlp.linear_fc1, mlp.linear_fc2], torch.device("cpu"))
        with torch.no_grad():
            for p_ in mlp.parameters():
                p_.add_(0.05 * torch.randn_like(p_))
        got = []
        for step in range(3):
            x = torch.randn(16, 2, cfg.hidden_size, requires_grad=True,
                            generator=torch.Generator().manual_seed(2 + step)) * (1 + step)
            x.retain_grad()
            y, yb = mlp(x)
            (y + yb).backward(torch.ones_like(y))
            got += [y.detach(), x.grad] + [p_.grad.clone() for p_ in mlp.parameters()]
            got.append(hist.buf.clone())
            mlp.zero_grad()
            hist.step()
            assert mlp.linear_fc1.fp8_meta.dy_cast is None  # taken (or never made)
        out[bwd] = got
        fc1_meta = mlp.linear_fc1.fp8_meta
        fc1_casts = sum(m is fc1_meta for m in dy_casts)
        assert (len(fused_calls), fc1_casts) == ((2, 1) if bwd else (0, 3)), (bwd, fused_calls,
                                                                            fc1_casts)
        # fc1's output went straight into fc2: its gradient is cast, never stored
        assert not any(fused_calls), fused_calls
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("watch", ["hook", "retain_grad", "anomaly", "second_use"])
def test_unstored_fc1_gradient_is_stored_where_something_else_sees_it(mp1, monkeypatch, watch):
    """Through autograd, from the second step of an MLP (perturbed parameters) with both fused
    activation casts: a hook
    on fc1's output, `retain_grad` or anomaly mode each see that gradient, so it is stored (the
    same finite gradients as without the fused backward); a second use of fc1's output (its
    gradient accumulated from two places) is the error naming the setting, not NaN."""
    import contextlib

    import torch.nn.functional as F

    from framework.models import layers
    from framework.models.transformer import transformer_config

    cfg = transformer_config(_tiny(), ParallelConfig(), bf16=False, fp16=False, on_gpu=False,
                             fp8="delayed")
    cfg = dataclasses.replace(cfg, activation_func=F.gelu, bias_activation_fusion=True,
                              fp8_act_cast=True)
    for where in ("megatron.core.fusions.fused_bias_gelu", "megatron.core.transformer.mlp"):
        monkeypatch.setattr(f"{where}.bias_gelu_impl",
                            lambda h, b: fp8.act_ref(h, b, "gelu_tanh"))
    stores = []
    real_fused = fp8.act_backward_cast
    monkeypatch.setattr(fp8, "act_backward_cast",
                        lambda *a, **k: stores.append(k["store_dh"]) or real_fused(*a, **k))
    grads = {}
    for bwd in (False, True):
        torch.manual_seed(0)
        mlp = layers.ActRecomputeMLP(dataclasses.replace(cfg, fp8_act_bwd_cast=bwd))
        fp8.Fp8History([mlp.linear_fc1, mlp.linear_fc2], torch.device("cpu"))
        with torch.no_grad():  # non-zero biases, uneven weights
            for p_ in mlp.parameters():
                p_.add_(0.05 * torch.randn_like(p_))
        seen = []

        def watch_input(_mod, args):
            h = args[0]
            if watch == "hook":
                h.register_hook(lambda g: seen.append(g.clone()))
            elif watch == "retain_grad":
                h.retain_grad()
                seen.append(h)

        stores.clear()
        for step in range(2):
            x = torch.randn(16, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(step))
            hook = mlp.linear_fc2.register_forward_pre_hook(watch_input) if step else None
            ctx = torch.autograd.detect_anomaly() if watch == "anomaly" and step \
                else contextlib.nullcontext()
            with ctx:
                if watch == "second_use" and step and bwd:
                    fc1_out, bias = mlp.linear_fc1(x)
                    mlp.linear_fc2.fp8_act_input = ("gelu_tanh", bias, mlp.linear_fc1.fp8_meta)
                    y, yb = mlp.linear_fc2(fc1_out)
                    mlp.linear_fc2.fp8_act_input = None
                    with pytest.raises(RuntimeError,
                                       match="model.fp8_fused_act_backward=false"):
                        ((y + yb).sum() + fc1_out.sum()).backward()
                    return
                y, yb = mlp(x)
                (y + yb).sum().backward()
            if hook is not None:
                hook.remove()
        grads[bwd] = [p_.grad.clone() for p_ in mlp.parameters()]
        if bwd:
            assert stores == [True], stores  # the second step: seen, so stored
            if watch in ("hook", "retain_grad"):
                g = seen[0] if watch == "hook" else seen[0].grad
                assert g.stride() != (0, 0, 0) and g.isfinite().all()
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


def test_take_dy_cast_only_for_the_tensor_it_was_made_from():
    """fc1's backward takes the kept casts only for the very gradient they were made from
    (another tensor of the same shape, e.g. with a second gradient added on the way, is cast
    afresh), and drops them either way."""
    _, meta = _delayed_layer()
    dh = torch.randn(8, 4)
    casts = ("q", "qt", "inv")
    meta.dy_cast = (dh, casts, True)
    assert fp8._take_dy_cast(meta, dh.view(8, 4)) == casts and meta.dy_cast is None
    meta.dy_cast = (dh, casts, True)
    assert fp8._take_dy_cast(meta, dh + 1) is None and meta.dy_cast is None
    meta.dy_cast = (dh, casts, True)
    assert fp8._take_dy_cast(meta, dh.t().contiguous().t()) is None  # other strides
    assert fp8._take_dy_cast(meta, dh) is None  # nothing kept
    meta.dy_cast = (dh, casts, True)
    assert fp8._take_dy_cast(meta, dh, reads_dy=True) == casts  # a stored dh may be read


def test_unstored_activation_gradient_is_taken_or_refused():
    """`act_backward_cast(store_dh=False)` returns `unstored`'s stand-in for dh: dh's shape and
    dtype, no memory, NaN. fc1's backward takes its casts when the stand-in itself reaches it;
    another tensor made from it (a hook, a second gradient added), or a backward that would
    read it for a bias of its own, is an error that names the setting, not NaN gradients."""
    h = torch.randn(16, 8)
    da = torch.randn(16, 8)
    bias = torch.randn(8)
    _, meta = _delayed_layer()
    meta.primed[fp8.DY] = True
    meta.rows[fp8.DY, :fp8.HISTORY] = 4.0
    dh, dbias, casts = fp8.act_backward_cast(h, bias, "gelu_tanh", da, meta, store_dh=True)
    meta.rows[fp8.DY, fp8.HISTORY] = 0.0
    dh2, dbias2, casts2 = fp8.act_backward_cast(h, bias, "gelu_tanh", da, meta, store_dh=False)
    assert dh2.shape == dh.shape and dh2.dtype == dh.dtype and dh2.stride() == (0, 0)
    assert dh2.untyped_storage().nbytes() == dh.element_size() and dh2.isnan().all()
    assert torch.equal(dbias, dbias2) and all(torch.equal(a, b) for a, b in zip(casts, casts2))
    view = dh2.view(2, 8, 8).reshape(-1, 8)  # the layer's view and fc1's reshape keep it
    meta.dy_cast = (dh2, casts2, False)
    assert fp8._take_dy_cast(meta, view) is casts2 and meta.dy_cast is None
    for other, reads in ((dh2 + 1, False), (dh2.contiguous(), False), (view, True)):
        meta.dy_cast = (dh2, casts2, False)
        with pytest.raises(RuntimeError, match="model.fp8_fused_act_backward=false"):
            fp8._take_dy_cast(meta, other, reads_dy=reads)
        assert meta.dy_cast is None


def test_activation_backward_cast_kernel_interpreted():
    """The fused activation-backward cast under Triton's interpreter: dh equals megatron-core's
    bias-GeLU backward formula (fp32, rounded to bf16) but for a rounding step in a few
    elements; its FP8 casts are the delayed cast kernel's of that dh, bit for bit, in both
    layouts; the bias gradient is dh's column sum; the recorded amax is dh's (rows past the
    tensor's end left out)."""
    from helpers import interpret_triton

    out = interpret_triton("""
import torch
from framework.fast import fp8
g = torch.Generator().manual_seed(3)
M, K = 70, 136
grid = ((M + fp8.BLOCK_M - 1) // fp8.BLOCK_M, (K + fp8.BLOCK_K - 1) // fp8.BLOCK_K)
h = (torch.randn(M, K, generator=g) * 2).bfloat16()
da = (torch.randn(M, K, generator=g) * 0.01).bfloat16()
bias = (torch.randn(K, generator=g) * 0.5).bfloat16()
for b in (bias, None):
    meta = fp8.Fp8Meta(torch.zeros(3, fp8.HISTORY + 1))
    meta.rows[fp8.DY, 2] = 0.004  # the history's max: larger values saturate
    meta.primed = [True, True, True]
    # the kernel on CPU tensors (act_backward_cast itself takes the torch path off CUDA)
    dh = torch.empty(M, K, dtype=torch.bfloat16)
    q, qt = torch.empty(M, K, dtype=fp8.E5M2), torch.empty(K, M, dtype=fp8.E5M2)
    inv = torch.empty(())
    part = torch.empty(grid[0], K)
    hist = meta.rows[fp8.DY]
    fp8._act_bwd_cast_kernel[grid](h, da, b if b is not None else inv, dh, hist, q, qt, inv,
                                   hist[fp8.HISTORY:], part, M, K, h.stride(0), da.stride(0),
                                   EMAX_=fp8.EMAX[fp8.E5M2], BM=fp8.BLOCK_M, BK=fp8.BLOCK_K,
                                   NPARTS=fp8.HISTORY, HAS_BIAS=b is not None)
    x = h.float() + (b.float() if b is not None else 0.0)
    t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    ff = 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)
    ref = (ff * da.float()).bfloat16()
    close = (dh.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-30
    assert close.float().mean() > 0.999, close.float().mean()
    torch.testing.assert_close(part.sum(0), dh.float().sum(0), rtol=1e-5, atol=1e-7)
    assert hist[fp8.HISTORY] == dh.float().abs().max(), (hist[fp8.HISTORY], dh.abs().max())
    # the same cast through the delayed cast kernel, from the kernel's own dh
    h2 = torch.zeros(fp8.HISTORY + 1)
    h2[:fp8.HISTORY] = hist[:fp8.HISTORY]
    q2, qt2 = torch.empty(M, K, dtype=fp8.E5M2), torch.empty(K, M, dtype=fp8.E5M2)
    inv2 = torch.empty(())
    fp8._cast_kernel[grid](dh, h2, q2, qt2, inv2, h2[fp8.HISTORY:], inv2, M, K, dh.stride(0),
                           EMAX_=fp8.EMAX[fp8.E5M2], MODE=0, ROWS=True, COLS=True,
                           BM=fp8.BLOCK_M, BK=fp8.BLOCK_K, NPARTS=fp8.HISTORY, DELAYED=True,
                           ACT=0, HAS_BIAS=False)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), qt2.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), q.view(torch.uint8).t().contiguous())
    assert inv == inv2 and h2[fp8.HISTORY] == hist[fp8.HISTORY]
    assert (q.float().abs() == 57344).any()  # saturation happened
    # STORE_DH=False: the same casts, bias gradient and amax; dh's memory untouched
    dh3 = torch.full((M, K), 7.0, dtype=torch.bfloat16)
    q3, qt3 = torch.empty(M, K, dtype=fp8.E5M2), torch.empty(K, M, dtype=fp8.E5M2)
    inv3, part3 = torch.empty(()), torch.empty(grid[0], K)
    h3 = hist.clone()
    h3[fp8.HISTORY] = 0.0
    fp8._act_bwd_cast_kernel[grid](h, da, b if b is not None else inv3, dh3, h3, q3, qt3, inv3,
                                   h3[fp8.HISTORY:], part3, M, K, h.stride(0), da.stride(0),
                                   EMAX_=fp8.EMAX[fp8.E5M2], BM=fp8.BLOCK_M, BK=fp8.BLOCK_K,
                                   NPARTS=fp8.HISTORY, HAS_BIAS=b is not None, STORE_DH=False)
    assert (dh3 == 7.0).all()
    assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(qt3.view(torch.uint8), qt.view(torch.uint8))
    assert torch.equal(part3, part) and inv3 == inv and h3[fp8.HISTORY] == hist[fp8.HISTORY]
print("ok")
""")
    assert "ok" in out


def test_fused_wgrad_accumulates_into_main_grad():
    """gradient_accumulation_fusion: dw is added to weight.main_grad (fp32) in place, and the
    weight's own grad is megatron-core's: none, or a dummy once DDP's flag exists."""
    x, w, _, dy = _perturbed_case(3)

    def run(fusion, flag):
        ww = w.clone().requires_grad_()
        ww.main_grad = torch.full_like(w, 0.5)
        if flag:
            ww.grad_added_to_main_grad = False
        fp8.fp8_linear(x.clone().requires_grad_(), ww, None, "tensorwise", "column", fusion,
                       False, False, None).backward(dy)
        return ww

    plain = run(False, False)
    fused = run(True, False)
    torch.testing.assert_close(fused.main_grad - 0.5, plain.grad, rtol=1e-6, atol=1e-6)
    assert fused.grad is None
    flagged = run(True, True)
    assert flagged.grad_added_to_main_grad is True and flagged.grad is not None
    torch.testing.assert_close(flagged.main_grad, fused.main_grad, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_wgrad_overwrite_writes_main_grad(recipe):
    """fp8_wgrad_overwrite (one micro-batch per step): the weight-gradient GEMM writes
    main_grad, whatever it held, with the bits the add path gives from a zeroed main_grad;
    rowwise, which scales the GEMM's output afterwards, keeps adding."""
    x, w, _, dy = _perturbed_case(3)

    def run(start, overwrite):
        ww = w.clone().requires_grad_()
        ww.main_grad = torch.full_like(w, start)
        ww.grad_added_to_main_grad = False
        meta = _delayed_layer()[1] if recipe == "delayed" else None
        fp8.fp8_linear(x.clone().requires_grad_(), ww, None, recipe, "column", True, False,
                       False, None, meta, overwrite).backward(dy)
        assert ww.grad_added_to_main_grad is True
        return ww.main_grad

    zero_add = run(0.0, False)
    # a second backward through the weight in the same step (DDP's flag set): it adds
    ww = w.clone().requires_grad_()
    ww.main_grad, ww.grad_added_to_main_grad = torch.full_like(w, 0.5), True
    fp8.fp8_linear(x.clone().requires_grad_(), ww, None, recipe, "column", True, False, False,
                   None, _delayed_layer()[1] if recipe == "delayed" else None, True).backward(dy)
    torch.testing.assert_close(ww.main_grad - 0.5, zero_add, rtol=1e-6, atol=1e-6)
    if recipe == "rowwise":
        torch.testing.assert_close(run(0.5, True) - 0.5, zero_add, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(run(0.5, True), zero_add)
        assert torch.equal(run(0.0, True), zero_add)
    assert zero_add.abs().sum() > 0


def test_build_model_marks_fp8_linears_for_overwrite(mp1):
    """build_model(fp8_wgrad_overwrite=True) reaches every FP8 linear of tensorwise/delayed
    models (runner.py passes it for one micro-batch per step); rowwise and False leave them."""
    from framework.models import layers
    from framework.models.build import build_model

    def marks(recipe, flag):
        torch.manual_seed(0)
        m = build_model(_tiny(), ParallelConfig(), vocab_size=VOCAB, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False, fp8=recipe,
                        fp8_wgrad_overwrite=flag)[0]
        return [getattr(x, "fp8_wgrad_overwrite", False) for x in m.modules()
                if isinstance(x, layers.Fp8Linear)]

    assert marks("tensorwise", True) == [True] * 8 and marks("delayed", True) == [True] * 8
    assert not any(marks("rowwise", True) + marks("tensorwise", False))


# --------------------------------------------------------------------------------------------
# TP2 over gloo
# --------------------------------------------------------------------------------------------
def test_tp2_amax_reduction_and_layers_over_gloo(tmp_path):
    """Two gloo ranks. With the amax reduced over TP, every FP8 operand is the same as at TP1, so
    TP2's outputs and gradients equal TP1's up to fp32 summation order (1e-5); without it they
    would differ by FP8 rounding (~1e-2: the shards are built with different amaxes), and under
    SP by the other rank's scale. Then a tiny GPT with train.fp8 through megatron-core's TP
    layers: TP2 gives TP1's loss and gradients."""
    from fp8_tp2_worker import tp2_worker

    spawn(tp2_worker, args=(free_port(), str(tmp_path)), nprocs=2)  # forked from the warm server
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        inv, want, local = r.pop("amax")
        assert inv == want, (rank, inv, want)
        if rank == 0:
            assert local != want  # rank 0's own amax is smaller: the reduction mattered
        assert r.pop("row_amax")
        for recipe in ("tensorwise", "delayed", "rowwise"):
            # the GPT's own check: TP2's FP8 model is TP1's, far closer than FP8 is to fp32
            loss_diff, grad_diff = r.pop(f"gpt {recipe}")
            vs_fp32 = r.pop(f"gpt {recipe} vs fp32")
            print(f"rank {rank} GPT {recipe} TP2 vs TP1: loss {loss_diff:.1e}, worst grad "
                  f"{grad_diff:.1e} (FP8 vs fp32 loss at TP1: {vs_fp32:.1e})")
            assert loss_diff < 1e-5 and grad_diff < 1e-3, (recipe, loss_diff, grad_diff)
            assert vs_fp32 > 10 * loss_diff
        for name, diffs in r.items():
            print(f"rank {rank} {name}: max rel diff vs TP1 (out, dx, dw) {diffs}")
            assert max(diffs) < 1e-5, (rank, name, diffs)


# --------------------------------------------------------------------------------------------
# the GPT model
# --------------------------------------------------------------------------------------------
VOCAB = 256


def _tiny(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mp1():
    from test_attention_variants import model_parallel, world

    with world(), model_parallel(1):
        yield


def _build(fp8_recipe, parallel=None, seed=0, **kw):
    from framework.models.build import build_model

    torch.manual_seed(seed)
    return build_model(_tiny(**kw), parallel or ParallelConfig(), vocab_size=VOCAB, bf16=False,
                       fp16=False, device=torch.device("cpu"), wrap_ddp=False, fp8=fp8_recipe)


def _perturb(model, seed=5):
    """Random biases and non-unit norm weights (nothing left at its zero/one init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "norm" in name.split(".")[-2]:
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _loss_and_grads(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    pos = torch.arange(16)[None].expand(2, 16)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gpt_linears_run_fp8_in_training_only(mp1, monkeypatch):
    from framework.models import layers

    model = _build("tensorwise")[0]
    _perturb(model)
    kinds = {}
    for name, mod in model.named_modules():
        if isinstance(mod, layers.Fp8Linear):
            kinds.setdefault(name.split(".")[-1], []).append(type(mod).__name__)
    assert sorted(kinds) == ["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"]
    assert all(len(v) == 2 for v in kinds.values())  # one per layer
    assert kinds["linear_qkv"] == ["Fp8BiasAddLinear"] * 2  # model.fused_bias_add's QKV
    assert not isinstance(model.output_layer, layers.Fp8Linear)
    calls, biased, bias_adds = [], [], []
    real = layers.fp8_linear
    monkeypatch.setattr(layers, "fp8_linear", lambda *a, **k: calls.append(a[3])
                        or biased.append(a[2] is not None) or real(*a, **k))
    real_add = layers.bias_add
    monkeypatch.setattr(layers, "bias_add", lambda *a: bias_adds.append(1) or real_add(*a))
    loss8, grads8 = _loss_and_grads(model)
    assert calls == ["tensorwise"] * 8  # 4 linears x 2 layers; embeddings, output layer: not
    # QKV's bias goes into its FP8 GEMM (no bias-add pass); the others' biases are fused later
    # (bias-GeLU, bias-dropout-add), as in bf16
    assert biased == [True, False, False, False] * 2 and bias_adds == [], (biased, bias_adds)
    ref = _build(None)[0]
    _perturb(ref)
    ref.load_state_dict(model.state_dict())
    loss, grads = _loss_and_grads(ref)
    # the same model within FP8's error, but not the fp32 GEMMs
    assert loss8 != loss and abs(loss8 - loss) < 0.02 * abs(loss)
    for name, g in grads.items():
        assert ((grads8[name] - g).norm() / g.norm()).item() < 0.15, name
    calls.clear()
    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
        model(tokens, torch.arange(16)[None].expand(2, 16), None)
    assert calls == []  # evaluation runs the bf16 (here fp32) GEMMs


def test_state_dict_and_checkpoint_unchanged_by_the_switch(mp1, tmp_path):
    """FP8 adds no parameter, buffer or extra state: the same keys, shapes and dtypes in the
    state dict and megatron-core's sharded state dict; a checkpoint saved with FP8 on loads with
    it off and the other way round (weights and optimizer state)."""
    from framework.config import OptimizerConfig
    from framework.optimizer import build_optimizer
    from framework import checkpoint as ckpt

    on, off = _build("tensorwise", seed=1), _build(None, seed=2)

    def layout(sd):
        return {k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else type(v).__name__
                for k, v in sd.items()}

    assert layout(on[0].state_dict()) == layout(off[0].state_dict())
    assert sorted(on[0].sharded_state_dict()) == sorted(off[0].sharded_state_dict())

    def with_opt(model):
        opt, sched = build_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=0), model, max_steps=10,
                                     bf16=False, fp16=False, use_distributed_optimizer=False,
                                     overlap_param_gather=False, on_gpu=False)
        _loss_and_grads(model[0])
        opt.step()
        return opt, sched

    for src, dst, name in ((on, off, "on_to_off"), (off, on, "off_to_on")):
        opt, sched = with_opt(src)
        d = str(tmp_path / name)
        ckpt.save_checkpoint(d, 1, src, opt, sched, consumed_samples=4,
                             config={"model": dataclasses.asdict(_tiny())})
        dopt, dsched = with_opt(dst)
        ckpt.load_checkpoint(d, dst, dopt, dsched, model_cfg=_tiny())
        for (n, a), b in zip(src[0].state_dict().items(), dst[0].state_dict().values()):
            if torch.is_tensor(a):
                assert torch.equal(a, b), (name, n)
        sa, sb = opt.state_dict()["state"], dopt.state_dict()["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]), (name, i)


def test_delayed_histories_travel_with_checkpoints(mp1, tmp_path):
    """train.fp8=delayed: a checkpoint keeps each rank's amax histories and primed flags (next
    to its RNG states); a delayed model loads them, a tensorwise one ignores them, and a
    checkpoint saved with FP8 off leaves a delayed model's histories unprimed."""
    from framework import checkpoint as ckpt

    src = _build("delayed", seed=1)
    _perturb(src[0])
    _loss_and_grads(src[0])
    src[0].fp8_history.step()
    assert src[0].fp8_history.buf.abs().sum() > 0
    d = str(tmp_path / "delayed")
    ckpt.save_checkpoint(d, 1, src, None, None, consumed_samples=4,
                         config={"model": dataclasses.asdict(_tiny())})
    dst = _build("delayed", seed=2)
    ckpt.load_checkpoint(d, dst, None, None, model_cfg=_tiny(), with_optimizer=False)
    assert not any(any(m.primed) for m in dst[0].fp8_history.metas)  # weights only: no RNG
    ckpt.load_checkpoint(d, dst, None, None, model_cfg=_tiny())
    assert torch.equal(dst[0].fp8_history.buf, src[0].fp8_history.buf)
    assert all(all(m.primed) for m in dst[0].fp8_history.metas)
    ckpt.load_checkpoint(d, _build("tensorwise", seed=3), None, None, model_cfg=_tiny())
    off = str(tmp_path / "off")
    ckpt.save_checkpoint(off, 1, _build(None, seed=4), None, None, consumed_samples=4,
                         config={"model": dataclasses.asdict(_tiny())})
    fresh = _build("delayed", seed=5)
    ckpt.load_checkpoint(off, fresh, None, None, model_cfg=_tiny())
    assert not any(any(m.primed) for m in fresh[0].fp8_history.metas)


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective", recompute_modules=["mlp_act"]),
    dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"]),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
])
def test_recompute_gives_the_same_fp8_gradients(mp1, recompute):
    """Recompute reruns the FP8 forward (the same casts: the scales come from the same
    tensors), so loss and every gradient equal the run without it."""
    from megatron.core.tensor_parallel import random as tp_random

    from framework.patching import patched
    from test_recompute import _cpu_rng_states

    ref = _build("rowwise")[0]
    _perturb(ref)
    ref_loss, ref_grads = _loss_and_grads(ref)
    with patched(tp_random, **_cpu_rng_states(tp_random)):
        model = _build("rowwise", ParallelConfig(**recompute))[0]
        _perturb(model)
        loss, grads = _loss_and_grads(model)
    assert loss == ref_loss
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def test_config_field_and_errors():
    assert TrainConfig().fp8 is None
    assert TrainConfig(fp8="False").fp8 is None  # Hydra's train.fp8=false
    assert TrainConfig(fp8="True").fp8 == "tensorwise"
    assert TrainConfig(fp8="rowwise").fp8 == "rowwise"
    with pytest.raises(ConfigError, match="train.fp8='columnwise' is not one of"):
        TrainConfig(fp8="columnwise")
    with pytest.raises(ConfigError, match="train.fp8=tensorwise needs bf16"):
        TrainConfig(fp8="tensorwise", fp16=True)
    with pytest.raises(ConfigError, match="model.type=gpt"):
        Config(model=ModelConfig(name="bert", type="bert", num_layers=2, hidden_size=64,
                                 num_attention_heads=4, seq_length=16),
               train=TrainConfig(fp8="tensorwise"))
    with pytest.raises(ConfigError, match="model.hidden_size to be a multiple of 16"):
        Config(model=_tiny(hidden_size=72, num_attention_heads=4),
               train=TrainConfig(fp8="tensorwise"))
    with pytest.raises(ConfigError, match=r"ffn_hidden_size / TP to be a multiple of 16 \(got 8"):
        Config(model=_tiny(ffn_hidden_size=16), parallel=ParallelConfig(
            tensor_model_parallel_size=2), train=TrainConfig(fp8="tensorwise"))
    Config(model=_tiny(), train=TrainConfig(fp8="tensorwise", micro_batch_size=2,
                                            global_batch_size=4))


def test_fp8_fused_act_resolution_and_errors():
    """model.fp8_fused_act=true turns it on (on GPU) for train.fp8=delayed with the fused
    bias-GeLU (not SwiGLU: withdrawn), unless the MLP is recomputed or compiled; null (the
    default for now) and false leave it off; an explicit true that cannot run is a one-line
    error naming the field."""
    from framework.models.transformer import transformer_config

    def act_cast(model, fp8_recipe="delayed", on_gpu=True, parallel=None):
        return transformer_config(model, parallel or ParallelConfig(), bf16=True, fp16=False,
                                  on_gpu=on_gpu, fp8=fp8_recipe).fp8_act_cast

    gelu = _tiny(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True)
    assert act_cast(gelu) is True
    assert act_cast(_tiny(activation="gelu_tanh", add_bias_linear=True)) is False  # null: off
    assert act_cast(gelu, "tensorwise") is False and act_cast(gelu, None) is False
    assert act_cast(gelu, on_gpu=False) is False  # no fused activation on CPU
    assert act_cast(_tiny(activation="gelu_tanh", add_bias_linear=True,
                          fp8_fused_act=False)) is False
    assert act_cast(gelu, parallel=ParallelConfig(recompute_granularity="full",
                                                  recompute_method="uniform")) is False
    assert act_cast(gelu, parallel=ParallelConfig(recompute_granularity="selective",
                                                  recompute_modules=["mlp"])) is False
    assert act_cast(gelu, parallel=ParallelConfig(recompute_granularity="selective",
                                                  recompute_modules=["layernorm"])) is True
    assert act_cast(gelu, parallel=ParallelConfig(recompute_granularity="selective",
                                                  recompute_modules=["mlp_act"])) is False
    assert act_cast(_tiny(activation="gelu", add_bias_linear=True)) is False  # exact GeLU
    assert act_cast(gelu, on_gpu=True, fp8_recipe="delayed") is True
    with pytest.raises(ConfigError, match="model.fp8_fused_act=true needs the fused gelu_tanh"):
        ModelConfig(activation="gelu", fp8_fused_act=True)
    with pytest.raises(ConfigError, match="model.fp8_fused_act=true needs the fused"):
        ModelConfig(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True,
                    torch_compile=True)
    with pytest.raises(ConfigError, match="model.fp8_fused_act=true needs the fused"):
        ModelConfig(activation="swiglu", add_bias_linear=False, fp8_fused_act=True)
    assert act_cast(_tiny(activation="swiglu", add_bias_linear=False)) is False
    assert act_cast(_tiny(activation="swiglu", add_bias_linear=False, swiglu_kernel=None)) \
        is False
    with pytest.raises(ConfigError, match="model.fp8_fused_act=true needs train.fp8=delayed"):
        Config(model=_tiny(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True),
               train=TrainConfig(fp8="tensorwise", micro_batch_size=2, global_batch_size=4))
    with pytest.raises(ConfigError, match="model.fp8_fused_act=true cannot run with the MLP"):
        Config(model=_tiny(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True),
               parallel=ParallelConfig(recompute_granularity="selective",
                                       recompute_modules=["mlp"]),
               train=TrainConfig(fp8="delayed", micro_batch_size=2, global_batch_size=4))
    with pytest.raises(ConfigError, match=r"recompute_modules=\['mlp_act'\]"):
        Config(model=_tiny(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True),
               parallel=ParallelConfig(recompute_granularity="selective",
                                       recompute_modules=["mlp_act"]),
               train=TrainConfig(fp8="delayed", micro_batch_size=2, global_batch_size=4))
    Config(model=_tiny(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True),
           train=TrainConfig(fp8="delayed", micro_batch_size=2, global_batch_size=4))


def test_fp8_fused_act_backward_resolution_and_errors():
    """model.fp8_fused_act_backward=true rides on the fused activation (on where it is on, off
    where it falls back); null and false leave it off; without fp8_fused_act it is a one-line
    error naming both fields."""
    from framework.models.transformer import transformer_config

    def bwd_cast(model, fp8_recipe="delayed", on_gpu=True):
        return transformer_config(model, ParallelConfig(), bf16=True, fp16=False,
                                  on_gpu=on_gpu, fp8=fp8_recipe).fp8_act_bwd_cast

    kw = dict(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act=True)
    assert bwd_cast(_tiny(**kw, fp8_fused_act_backward=True)) is True
    assert bwd_cast(_tiny(**kw)) is False  # null: off
    assert bwd_cast(_tiny(**kw, fp8_fused_act_backward=False)) is False
    assert bwd_cast(_tiny(**kw, fp8_fused_act_backward=True), on_gpu=False) is False
    assert bwd_cast(_tiny(**kw, fp8_fused_act_backward=True), "tensorwise") is False
    with pytest.raises(ConfigError, match="model.fp8_fused_act_backward=true needs "
                                          "model.fp8_fused_act=true"):
        ModelConfig(activation="gelu_tanh", add_bias_linear=True, fp8_fused_act_backward=True)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_backward_fast_accum_setting(recipe, monkeypatch):
    """model.fp8_backward_fast_accum: off by default; on, every backward GEMM of the FP8 linear
    asks for fast accumulation (the forward GEMM always does), off, none does; the layer's
    config carries it only with train.fp8; without train.fp8 it is a one-line error."""
    from framework.models.transformer import transformer_config

    def cfg(model, fp8_recipe):
        return transformer_config(model, ParallelConfig(), bf16=True, fp16=False, on_gpu=True,
                                  fp8=fp8_recipe).fp8_bwd_fast_accum

    assert ModelConfig().fp8_backward_fast_accum is False
    assert cfg(_tiny(fp8_backward_fast_accum=True), recipe) is True
    assert cfg(_tiny(fp8_backward_fast_accum=True), None) is False
    assert cfg(_tiny(), recipe) is False
    with pytest.raises(ConfigError, match="model.fp8_backward_fast_accum=true needs train.fp8"):
        Config(model=_tiny(fp8_backward_fast_accum=True),
               train=TrainConfig(micro_batch_size=2, global_batch_size=4))
    Config(model=_tiny(fp8_backward_fast_accum=True),
           train=TrainConfig(fp8=recipe, micro_batch_size=2, global_batch_size=4))
    seen = []
    real = fp8.mm8
    monkeypatch.setattr(fp8, "mm8", lambda *a, **k: seen.append(k.get("fast_accum", False))
                        or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((32, 16), (16, 16), (16,)))
    for on in (False, True):
        seen.clear()
        meta = _delayed_layer()[1] if recipe == "delayed" else None
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xx, ww, b.clone().requires_grad_(), recipe, "column", False, False,
                           False, None, meta, bwd_fast_accum=on)
        y.backward(torch.randn(32, 16, generator=g))
        assert seen == [True, on, on], (on, seen)  # forward, dgrad, wgrad


def test_cuda_graph_default_follows_fp8():
    """model.cuda_graph=null, resolved with the world size: on with train.fp8 on one GPU without
    recompute or torch.compile (where the combination is GPU-tested), off otherwise; an explicit
    value always stands."""
    fp8_on = TrainConfig(fp8="tensorwise", micro_batch_size=2, global_batch_size=4)

    def resolved(model, world=1, on_gpu=True, parallel=None, train=fp8_on):
        cfg = Config(model=model, parallel=parallel or ParallelConfig(),
                     train=dataclasses.replace(train))
        assert cfg.model.cuda_graph is model.cuda_graph  # nothing decided before the world
        cfg.resolve_world(world, on_gpu=on_gpu)
        return cfg.model.cuda_graph

    assert resolved(_tiny()) is True
    assert resolved(_tiny(), train=TrainConfig()) is False  # no FP8
    assert resolved(_tiny(cuda_graph=False)) is False
    assert resolved(_tiny(cuda_graph=True), train=TrainConfig()) is True
    assert resolved(_tiny(), world=2) is False  # DP 2
    assert resolved(_tiny(), world=2, parallel=ParallelConfig(tensor_model_parallel_size=2)) \
        is False
    assert resolved(_tiny(), parallel=ParallelConfig(recompute_granularity="selective")) is False
    assert resolved(_tiny(torch_compile=True)) is False


def test_rng_tracker_states_saved_as_tensors_and_loaded_in_the_trackers_form(tmp_path,
                                                                             monkeypatch):
    """Under model.cuda_graph the RNG tracker holds graph-safe generators: a checkpoint stores
    them as byte tensors (every load here is weights-only, which refuses a generator) and a
    load hands them back in the form the tracker uses."""
    from megatron.core.tensor_parallel import random as mrandom

    from framework import distributed as state  # the RNG save/restore checkpoints use

    g = torch.Generator().manual_seed(7)
    saved = state._tracker_states({"model-parallel-rng": g, "data": torch.get_rng_state()})
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    assert torch.equal(saved["model-parallel-rng"], g.get_state())
    torch.save(saved, tmp_path / "rng.pt")
    back = torch.load(tmp_path / "rng.pt", weights_only=True)
    with pytest.raises(Exception):  # what the tensors replace: a generator does not load
        torch.save({"g": g}, tmp_path / "gen.pt")
        torch.load(tmp_path / "gen.pt", weights_only=True)

    assert state._tracker_states(back).keys() == back.keys()
    assert all(torch.equal(back[k], v) for k, v in state._tracker_states(back).items())
    calls = []
    monkeypatch.setattr(mrandom, "convert_cuda_rng_state",  # the CUDA-only conversion
                        lambda v, to_graphable=False: calls.append(to_graphable) or v)
    state._tracker_states(back, graphable=True)
    assert calls == [True, True]


def test_gpu_without_fp8_is_refused(monkeypatch):
    """An A100-class GPU (compute capability 8.0): refused with one line before any model is
    built; a CPU run the same (tests/test_bad_inputs.py runs it through train.py)."""
    from framework import plan, runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    ok, why = fp8.device_supports_fp8()
    assert not ok and "A100 has compute capability 8.0" in why
    cfg = Config(model=_tiny(), train=TrainConfig(fp8="tensorwise", micro_batch_size=2,
                                                  global_batch_size=4))
    monkeypatch.setattr(plan, "resolve_device", lambda kind: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runner, "launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(ConfigError, match="train.fp8=tensorwise needs a GPU with FP8.*A100"):
        runner.run(cfg)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.device_supports_fp8() == (True, "") or fp8.triton is None


def test_cast_tiles_setting(tmp_path):
    """FP8_CAST_TILES (a benchmark's A/B of the cast kernels' tiles): parsed per kernel, a bad
    entry is one error naming the variable; with train.fp8 set it is checked before any model is
    built (on CPU, before the FP8-needs-a-GPU refusal)."""
    import os

    import pytest

    from framework.fast import fp8
    from helpers import run_train

    assert fp8.parse_tiles("cast=128x64x8, act_bwd=32x128x4") == {
        "cast": (128, 64, 8), "act_bwd": (32, 128, 4)}
    assert fp8.parse_tiles("") == {}
    for bad in ("cast=128x64", "cast=100x64x4", "gemm=64x64x4", "cast=64x64x3", "cast"):
        with pytest.raises(ValueError, match="FP8_CAST_TILES: .* is not <kernel>="):
            fp8.parse_tiles(bad)
    r = run_train("train.fp8=delayed", cwd=tmp_path, expect=2,
                  env=dict(os.environ, FP8_CAST_TILES="cast=64x64x3"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: FP8_CAST_TILES: 'cast=64x64x3' is not <kernel>=<rows>x<columns>x"
                     "<warps> with kernel one of cast, act_bwd, rows and columns in (16, 32, 64, "
                     "128, 256), warps in (1, 2, 4, 8, 16)"], r.stderr[-2000:]


def test_cast_kernels_give_the_same_bits_at_every_tile_interpreted():
    """The tile of the cast kernels (`fp8.TILES`, FP8_CAST_TILES) changes how the work is split,
    not the result: under Triton's interpreter, on a shape no tile divides, the delayed cast with
    the activation prologue gives the same FP8 bits in both layouts, the same scale and the same
    recorded amax at other tiles as at the default; the activation-backward cast the same dh and
    casts, and its bias gradient (one fp32 partial sum per row block) within fp32 rounding."""
    from helpers import interpret_triton

    out = interpret_triton("""
import torch
from framework.fast import fp8
g = torch.Generator().manual_seed(3)
M, K = 77, 144
h = (torch.randn(M, K, generator=g) * 2).bfloat16()
bias = (torch.randn(K, generator=g) * 0.5).bfloat16()
da = (torch.randn(M, K, generator=g) * 0.01).bfloat16()
h[3, 7] = float("inf")  # left out of the recorded amax at every tile

def cast(tile):
    bm, bk, _ = tile
    hist = torch.zeros(fp8.HISTORY + 1)
    hist[0] = 3.0
    q, qt = torch.empty(M, K, dtype=fp8.E4M3), torch.empty(K, M, dtype=fp8.E4M3)
    inv = torch.empty(())
    fp8._cast_kernel[((M + bm - 1) // bm, (K + bk - 1) // bk)](
        h, hist, q, qt, inv, hist[fp8.HISTORY:], bias, M, K, h.stride(0),
        EMAX_=fp8.EMAX[fp8.E4M3], MODE=0, ROWS=True, COLS=True, BM=bm, BK=bk,
        NPARTS=fp8.HISTORY, DELAYED=True, ACT=1, HAS_BIAS=True)
    return q.view(torch.uint8), qt.view(torch.uint8), inv, hist[fp8.HISTORY].clone()

def act_bwd(tile):
    bm, bk, _ = tile
    grid = ((M + bm - 1) // bm, (K + bk - 1) // bk)
    hist = torch.zeros(fp8.HISTORY + 1)
    hist[2] = 0.004
    dh = torch.empty(M, K, dtype=torch.bfloat16)
    q, qt = torch.empty(M, K, dtype=fp8.E5M2), torch.empty(K, M, dtype=fp8.E5M2)
    inv = torch.empty(())
    part = torch.empty(grid[0], K)
    hh = h.clone()
    hh[3, 7] = 1.0
    fp8._act_bwd_cast_kernel[grid](hh, da, bias, dh, hist, q, qt, inv, hist[fp8.HISTORY:], part,
                                   M, K, hh.stride(0), da.stride(0), EMAX_=fp8.EMAX[fp8.E5M2],
                                   BM=bm, BK=bk, NPARTS=fp8.HISTORY, HAS_BIAS=True)
    return dh, q.view(torch.uint8), qt.view(torch.uint8), inv, hist[fp8.HISTORY].clone(), \\
        part.sum(0)

ref_c, ref_b = cast(fp8.TILES["cast"]), act_bwd(fp8.TILES["act_bwd"])
assert ref_c[3] > 0 and ref_c[3].isfinite() and ref_b[4] > 0
for tile in ((32, 128, 4), (128, 32, 8), (16, 256, 2)):
    got = cast(tile)
    assert all(torch.equal(a, b) for a, b in zip(got, ref_c)), tile
    got = act_bwd(tile)
    assert all(torch.equal(a, b) for a, b in zip(got[:5], ref_b[:5])), tile
    assert torch.allclose(got[5], ref_b[5], rtol=1e-5, atol=1e-7), tile
print("ok")
""")
    assert "ok" in out


def test_cast_kernel_column_sums_interpreted():
    """The cast kernel's column sums (`SUMS`: a linear's bias gradient made in its output
    gradient's cast, one fp32 partial sum per row block) under Triton's interpreter, on a shape
    no tile divides, with and without a delayed history: the FP8 bits, scale and recorded amax
    are those of the cast without sums, and the partials sum to the fp32 column sums of the input
    within fp32 rounding at every tile."""
    from helpers import interpret_triton

    out = interpret_triton("""
import torch
from framework.fast import fp8
g = torch.Generator().manual_seed(5)
M, K = 77, 144
dy = (torch.randn(M, K, generator=g) * 0.01).bfloat16()
want = dy.float().sum(0)

def cast(tile, sums, delayed):
    bm, bk, _ = tile
    grid = ((M + bm - 1) // bm, (K + bk - 1) // bk)
    hist = torch.zeros(fp8.HISTORY + 1)
    hist[0] = 0.03
    amax = hist if delayed else fp8.amax_of(dy).reshape(1)
    q, qt = torch.empty(M, K, dtype=fp8.E5M2), torch.empty(K, M, dtype=fp8.E5M2)
    inv = torch.empty(())
    part = torch.full((grid[0], K), float("nan"))
    fp8._cast_kernel[grid](dy, amax, q, qt, inv, hist[fp8.HISTORY:], inv, M, K, dy.stride(0),
                           EMAX_=fp8.EMAX[fp8.E5M2], MODE=0, ROWS=True, COLS=True, BM=bm, BK=bk,
                           NPARTS=fp8.HISTORY if delayed else 1, DELAYED=delayed, ACT=0,
                           HAS_BIAS=False, **(dict(sums_ptr=part, SUMS=True) if sums else {}))
    return (q.view(torch.uint8), qt.view(torch.uint8), inv, hist[fp8.HISTORY].clone()), part

for delayed in (True, False):
    ref, _ = cast(fp8.TILES["cast"], False, delayed)
    for tile in (fp8.TILES["cast"], (32, 128, 4), (128, 32, 8), (16, 256, 2)):
        got, part = cast(tile, True, delayed)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (tile, delayed)
        assert not part.isnan().any(), tile
        assert torch.allclose(part.sum(0), want, rtol=1e-5, atol=1e-7), tile
print("ok")
""")
    assert "ok" in out


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_linear_bias_gradient_comes_from_the_output_gradient_cast(recipe, monkeypatch):
    """A one-scale recipe's bias gradient is routed through its output-gradient cast
    (`cast(..., sums_out=...)`: on the GPU the column sums of the cast's own pass over dy), with
    no `dy.sum` in the backward, and equals dy.sum(0); delayed: on its first (unprimed) cast
    and on a later step's cast from the history."""
    x, w, b, dy = _perturbed_case(2)
    history, meta = _delayed_layer() if recipe == "delayed" else (None, None)
    real = fp8.cast
    for step in range(2):
        seen = []

        def spy(*args, **kw):
            seen.append(kw.get("sums_out") is not None)
            return real(*args, **kw)

        monkeypatch.setattr(fp8, "cast", spy)
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = fp8.fp8_linear(xx, ww, bb, recipe, "column", False, False, False, None, meta)
        n_fwd = len(seen)
        monkeypatch.setattr(torch.Tensor, "sum",
                            lambda *a, **k: pytest.fail("dy.sum in backward"))
        y.backward(dy)
        monkeypatch.undo()
        assert seen[n_fwd:] == [True] and not any(seen[:n_fwd]), (step, seen)
        torch.testing.assert_close(bb.grad, dy.sum(0), rtol=1e-6, atol=1e-5)
        if history is not None:
            assert all(meta.primed)
            history.step()
