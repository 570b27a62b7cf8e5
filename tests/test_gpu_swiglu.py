"""GPU checks of `model.swiglu_kernel` (framework/fast/swiglu.py):
* the compiled Triton kernels, forward and backward, against float64 at a slice of the
  Llama-3.2-1B MLP (4096 tokens x 2 x 8192) in bf16 and at odd sizes in fp32, on perturbed
  inputs, next to megatron-core's fused SwiGLU's own error;
* 20 train steps of a swiglu gpt_tiny, kernel on (`model.swiglu_kernel=true`) against
  mcore's fused SwiGLU (`model.swiglu_kernel=false`) from the same perturbed weights: losses
  within 1% per step.
"""
import pytest
import torch
from gpu_shared import (TINY_STEPS, compare, log_parity, shared_once, tiny_losses,
                        tiny_perturbed_seed)

from framework.fast import swiglu as sw

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_triton():
    if not torch.cuda.is_available() or sw.triton is None:
        pytest.skip("needs CUDA and triton")


def _max_rel(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape,dtype,tol", [((4096, 2 * 8192), torch.bfloat16, 1e-2),
                                             ((3, 77, 2 * 1100), torch.float32, 1e-5)])
def test_kernels_match_float64(shape, dtype, tol):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.3).to(dtype).requires_grad_()
    dy = torch.randn(shape[:-1] + (shape[-1] // 2,), device="cuda", generator=g).to(dtype)
    y = sw.swiglu(x)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    yr = sw.swiglu_ref(xd)
    yr.backward(dy.double())
    errs = {"y": _max_rel(y, yr), "dx": _max_rel(x.grad, xd.grad)}
    xm = x.detach().clone().requires_grad_()
    ym = bias_swiglu_impl(xm, None, False, False)
    ym.backward(dy)
    mcore = {"y": _max_rel(ym, yr), "dx": _max_rel(xm.grad, xd.grad)}
    log_parity(f"swiglu kernel {tuple(shape)} {dtype}: max rel err vs float64 {errs}; "
               f"megatron-core fused swiglu {mcore}")
    assert y.dtype == x.grad.dtype == dtype
    for k, v in errs.items():
        assert v < tol, (k, v)


STEPS = TINY_STEPS
SWIGLU = ["model.activation=swiglu", "model.add_bias_linear=false", "model.hidden_dropout=0",
          "model.attention_dropout=0"]


@pytest.mark.parametrize("precision,tol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_swiglu_kernel_trains_like_mcores_fused_swiglu(tmp_path, precision, tol):
    """20 steps from the same perturbed weights (non-unit norms: tests/perturb.py), mcore's
    fused SwiGLU against ours. fp32 is the tight check (the tolerance of the fp32 layout-parity
    tests); in bf16 the two kernels round differently
    and the runs drift apart as any two bf16 layouts do, so bf16 uses the bf16 layout-parity
    tolerance (test_gpu_parallel's 3e-2; a first run measured 1.16e-2 here)."""
    flags = SWIGLU + (["train.bf16=false"] if precision == "fp32" else [])
    seed = shared_once(f"swiglu_seed_perturbed_{precision}",
                       lambda d: tiny_perturbed_seed(d, *flags))
    ref = tiny_losses(tmp_path, "mcore", *flags, seed, "model.swiglu_kernel=false")
    got = tiny_losses(tmp_path, "kernel", *flags, seed, "model.swiglu_kernel=true")
    assert sorted(ref) == list(range(1, STEPS + 1))
    compare(ref, got, tol, f"{precision} swiglu kernel (got) vs mcore fused swiglu (ref), gpt_tiny")


def test_gpt_mlps_use_the_kernel_on_gpu(mp1):
    """The default on a GPU: a swiglu GPT's MLPs run `_SwiGLU` (its backward node is in the
    graph), and with the switch off they run megatron-core's fused SwiGLU."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from framework.config import ModelConfig, ParallelConfig
    from framework.models.build import build_model

    model_parallel_cuda_manual_seed(0)  # mcore's GPU init draws from the RNG tracker

    def nodes(kernel):
        model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                            ffn_hidden_size=96, activation="swiglu", add_bias_linear=False,
                            swiglu_kernel=kernel)
        m = build_model(model, ParallelConfig(), vocab_size=128, bf16=True, fp16=False,
                        device=torch.device("cuda"), wrap_ddp=False)[0]
        m.train()
        tokens = torch.randint(0, 128, (2, 16), device="cuda")
        y = m(tokens, torch.arange(16, device="cuda")[None].expand(2, -1), None)
        seen, stack = set(), [y.grad_fn]
        while stack:
            f = stack.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            stack += [n for n, _ in f.next_functions]
        return {type(f).__name__ for f in seen}

    assert "_SwiGLUBackward" in nodes(None)
    assert "_SwiGLUBackward" not in nodes(False)
