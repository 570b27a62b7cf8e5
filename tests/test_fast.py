"""Fast-path kernels against the references they replace (CPU)."""
import pytest
import torch

from framework.fast import multi_tensor as mt


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

    before = (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl)
    try:
        assert mt.install() is True  # this machine has neither apex nor TE
        assert clip_grads.l2_norm_impl is mt.foreach_l2norm
        assert mt.install() is True  # idempotent
    finally:
        clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl = before


def test_fuse_adam_leaves_cpu_params_alone():
    p = torch.nn.Parameter(torch.randn(3))

    class Wrapped:
        optimizer = torch.optim.AdamW([p])

    assert mt.fuse_adam(Wrapped()) == 0
    assert not Wrapped.optimizer.param_groups[0].get("fused")


def test_addmm_wgrad_accumulates_and_installs_into_mcore():
    from megatron.core.tensor_parallel import layers as tp_layers

    from framework.models.layers import AddmmWgrad, install_fused_wgrad

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
