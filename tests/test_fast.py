"""Fast-path kernels against the references they replace (CPU)."""
import pytest
import torch

from framework.fast import multi_tensor as mt
from helpers import interpret_triton


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(3, 5), (7,), (2, 2, 2), (1,)]]


def test_foreach_l2norm_matches_mcore_local():
    from megatron.core.utils import local_multi_tensor_l2_norm

    ts = _tensors()
    ours, per = mt.foreach_l2norm(0, None, [ts], True)
    ref = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]))
    assert ours.shape == (1,) and torch.allclose(ours, ref.reshape(1), rtol=1e-6)
    assert torch.allclose(per, torch.stack([t.norm() for t in ts]))
    assert local_multi_tensor_l2_norm  # the function it stands in for exists in this mcore


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_foreach_scale_copy_and_in_place(scale):
    src = _tensors(1)
    dst = [torch.zeros_like(t, dtype=torch.bfloat16) for t in src]
    mt.foreach_scale(0, None, [src, dst], scale)
    for s, d in zip(src, dst):
        assert torch.equal(d, (s * scale).to(torch.bfloat16))
    inplace = [t.clone() for t in src]
    mt.foreach_scale(0, None, [inplace, inplace], scale)
    for s, d in zip(src, inplace):
        assert torch.equal(d, s * scale)


def test_install_targets_mcore_fallbacks_only():
    from megatron.core.optimizer import clip_grads

    from framework.mcore_patches import install_foreach_optimizer_kernels

    before = (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl)
    try:
        assert install_foreach_optimizer_kernels() is True  # this machine has neither apex nor TE
        assert clip_grads.l2_norm_impl is mt.foreach_l2norm
        assert install_foreach_optimizer_kernels() is True  # idempotent
    finally:
        clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl = before


def test_fuse_adam_leaves_cpu_params_alone():
    p = torch.nn.Parameter(torch.randn(3))

    class Wrapped:
        optimizer = torch.optim.AdamW([p])

    assert mt.fuse_adam(Wrapped()) == (0, 1)
    assert not Wrapped.optimizer.param_groups[0].get("fused")


def test_addmm_wgrad_accumulates_and_installs_into_mcore():
    from megatron.core.tensor_parallel import layers as tp_layers

    from framework.mcore_patches import AddmmWgrad, install_fused_wgrad

    x, dy, acc = torch.randn(16, 4), torch.randn(16, 6), torch.randn(6, 4)
    want = acc + dy.t() @ x
    AddmmWgrad.wgrad_gemm_accum_fp32(x, dy, acc)
    assert torch.allclose(acc, want, atol=1e-6)
    before = (tp_layers._grad_accum_fusion_available,
              getattr(tp_layers, "fused_weight_gradient_mlp_cuda", None))
    try:
        install_fused_wgrad()
        assert tp_layers._grad_accum_fusion_available
        assert tp_layers.fused_weight_gradient_mlp_cuda in (AddmmWgrad, before[1])
    finally:
        tp_layers._grad_accum_fusion_available = before[0]
        if before[1] is None:
            del tp_layers.fused_weight_gradient_mlp_cuda
        else:
            tp_layers.fused_weight_gradient_mlp_cuda = before[1]


def test_triton_norm_kernels_match_float64_interpreted():
    """framework/fast/norm.py's LayerNorm and RMSNorm kernels (forward, input, weight and bias
    grads; rows that do not fill a tile, hidden sizes that are not powers of two, several
    programs accumulating weight-grad partials) against torch in float64."""
    out = interpret_triton('''
import torch, torch.nn.functional as F
from framework.fast.norm import _FusedNorm
torch.manual_seed(0)
for rms in (False, True):
    for m, n, dt, tol in [(37, 96, torch.float32, 1e-5), (130, 1280, torch.float32, 1e-5),
                          (50, 200, torch.bfloat16, 2e-2)]:
        x = (torch.randn(m, n) * 3 + 1).to(dt).requires_grad_()
        w = (torch.randn(n) * 0.5 + 1).to(dt).requires_grad_()
        b = None if rms else torch.randn(n).to(dt).requires_grad_()
        y = _FusedNorm.apply(x, w, b, 1e-5, rms)
        dy = torch.randn(m, n).to(dt)
        y.backward(dy)
        got = [y, x.grad, w.grad] + ([] if rms else [b.grad])
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        bd = None if rms else b.detach().double().requires_grad_()
        yr = F.rms_norm(xd, (n,), wd, 1e-5) if rms else F.layer_norm(xd, (n,), wd, bd, 1e-5)
        yr.backward(dy.double())
        ref = [yr, xd.grad, wd.grad] + ([] if rms else [bd.grad])
        for name, a, r in zip(["y", "dx", "dw", "db"], got, ref):
            assert a.dtype == dt, (name, a.dtype)
            err = float((a.double() - r).abs().max() / r.abs().max())
            assert err < tol, (rms, m, n, dt, name, err)
print("ok")
''')
    assert "ok" in out


def test_triton_bias_add_matches_torch_interpreted():
    """framework/fast/bias.py: the same values as torch's broadcast add (fp32 add, one rounding:
    bit for bit in fp32, within the interpreter's rounding in bf16), and the bias gradient as a
    row sum."""
    out = interpret_triton('''
import torch
from framework.fast.bias import _BiasAdd
torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(3, 5, 4100).to(dt).requires_grad_()
    b = torch.randn(4100).to(dt).requires_grad_()
    y = _BiasAdd.apply(x, b)
    ref = x.detach() + b.detach()
    if dt == torch.float32:
        assert torch.equal(y, ref)
    else:  # the interpreter rounds fp32 -> bf16 toward zero (GPUs: to nearest even, bitwise)
        assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7).all()
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, dy)
    torch.testing.assert_close(b.grad.float(), dy.float().reshape(-1, 4100).sum(0),
                               rtol=2e-2, atol=1e-1)
print("ok")
''')
    assert "ok" in out


def test_gpu_config_of_every_rope_preset_builds_without_te():
    """On a GPU, `transformer_config` asks mcore for RoPE fusion, which mcore validates against
    Transformer Engine's kernel when the config is built. Without TE ours must already be
    installed by then: the preflight check builds a config before any model does, and once
    refused every RoPE model on a GPU (the default gpt_tiny included). A fresh interpreter, so
    that no earlier test has installed the kernel."""
    code = """
import glob, os
from framework.config import register_configs
from framework.cli import register_resolvers
from framework.models.transformer import transformer_config
from tests.helpers import load_config
register_configs(); register_resolvers()
names = [os.path.basename(p)[:-5] for p in glob.glob("conf/model/*.yaml")]
built = 0
for name in sorted(names):
    cfg = load_config(f"model={name}")
    if cfg.model.type != "gpt" or cfg.model.position_embedding_type != "rope":
        continue
    tc = transformer_config(cfg.model, cfg.parallel, bf16=True, fp16=False, on_gpu=True)
    assert tc.apply_rope_fusion, name
    built += 1
print("built", built)
"""
    from helpers import run

    r = run("-c", code, timeout=300, fresh=True)  # fresh: not a fork of a warmed-up process
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= 1, r.stdout
