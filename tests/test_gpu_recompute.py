"""GPU check of recompute (run with `pytest -m gpu`; the CPU ones are in
tests/test_recompute.py): mlp_act with megatron-core's fused bias-GeLU kernel in bf16."""
import pytest
import torch

from framework.config import ParallelConfig
from framework.patching import patched
from test_recompute import MLP_ACT, _counting, _train_steps, mp1  # noqa: F401


@pytest.mark.gpu
def test_mlp_act_recompute_matches_bf16_fused_gelu_cuda(mp1):
    """CUDA, bf16, gelu_tanh with biases: the MLP runs mcore's fused bias-GeLU kernel
    (bias_gelu_impl; CPU runs never take it). With mlp_act the kernel runs again in backward,
    and losses and gradients over three steps match the run without recompute."""
    from megatron.core.transformer import mlp as mcore_mlp

    from framework.models import transformer

    # gradient_accumulation_fusion writes main_grad, which only DDP gives the parameters
    # every parameter perturbed (tests/perturb.py): fc1's bias, which the fused bias-GeLU adds
    # again in the recompute, starts non-zero
    kw = dict(activation="gelu_tanh", add_bias_linear=True, fused_wgrad=False, perturb=5)
    calls = {}
    with patched(mcore_mlp, **_counting(mcore_mlp, "bias_gelu_impl", calls)), \
            patched(transformer, _has_fused_wgrad=lambda: False):
        ref_losses, ref_grads = _train_steps(ParallelConfig(), device="cuda", bf16=True, **kw)
        n_ref = calls.pop("bias_gelu_impl", 0)
        losses, grads = _train_steps(MLP_ACT, device="cuda", bf16=True, **kw)
        n_act = calls.pop("bias_gelu_impl", 0)
    assert n_ref == 2 * 3, n_ref  # fused path: once per layer and step
    assert n_act == 2 * n_ref, n_act  # ... and once more in each backward
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3,
                               atol=0)
    for step, (got, want) in enumerate(zip(grads, ref_grads)):
        for name, g in want.items():
            # the recompute sees the forward's inputs; the slack is for nondeterministic kernels
            err = ((got[name].float() - g.float()).abs().max()
                   / g.float().abs().max().clamp_min(1e-12)).item()
            assert err < 2e-2, (step, name, err)
