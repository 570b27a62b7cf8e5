"""`model.swiglu_kernel` (framework/fast/swiglu.py) on CPU:
* the Triton kernels' forward and backward against the float64 reference, under Triton's CPU
  interpreter (skipped where triton is not installed; the GPU suite runs them compiled);
* the config: the switch's errors name the field, and where it resolves on and off;
* the MLP: with the switch on, a tiny swiglu GPT has the same state dict keys and, on CPU, the
  same outputs (the reference path), so checkpoints do not depend on it.
"""
import pytest
import torch

from framework.config import ConfigError, ModelConfig, ParallelConfig
from framework.fast import swiglu as sw
from helpers import interpret_triton


def test_triton_swiglu_matches_float64_interpreted():
    """Forward and backward through the autograd function (2-D and 3-D inputs, feature counts
    that do not fill a block, odd ones, a non-contiguous input) against torch's swiglu in
    float64. Tolerances are max abs error over max |reference|: 1e-5 in fp32 (the kernel computes
    in fp32), 1e-2 in bf16 and 2e-3 in fp16 (one rounding of the output; bf16's unit roundoff is
    2^-8, fp16's 2^-11)."""
    out = interpret_triton('''
import torch
from framework.fast.swiglu import _SwiGLU, swiglu_ref
torch.manual_seed(0)
cases = [((5, 2 * 96), torch.float32, 1e-5), ((3, 4, 2 * 1100), torch.float32, 1e-5),
         ((7, 2 * 300), torch.bfloat16, 1e-2), ((2, 3, 2 * 77), torch.bfloat16, 1e-2),
         ((4, 2 * 33), torch.float16, 2e-3)]
for shape, dt, tol in cases:
    x = (torch.randn(shape) * 3).to(dt).requires_grad_()
    y = _SwiGLU.apply(x)
    dy = torch.randn(y.shape).to(dt)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    yr = swiglu_ref(xd)
    yr.backward(dy.double())
    assert y.shape == yr.shape and y.dtype == dt and x.grad.dtype == dt
    for name, a, r in (("y", y, yr), ("dx", x.grad, xd.grad)):
        err = float((a.double() - r).abs().max() / r.abs().max())
        assert err < tol, (shape, dt, name, err)
# a non-contiguous input (a slice of a wider tensor)
base = torch.randn(6, 2 * 160 + 8)
x = base[:, : 2 * 160].requires_grad_()
y = _SwiGLU.apply(x)
y.sum().backward()
xd = base[:, : 2 * 160].double().requires_grad_()
swiglu_ref(xd).sum().backward()
assert torch.allclose(y.double(), swiglu_ref(xd), atol=1e-5)
assert torch.allclose(x.grad.double(), xd.grad, atol=1e-5)
print("ok")
''')
    assert "ok" in out


def test_triton_swiglu_in_the_mlp_with_and_without_act_recompute_interpreted():
    """The MLP's two routes to the kernel, forced on CPU (interpreted Triton): three SGD steps
    of a tiny swiglu GPT (every parameter perturbed) match the torch path to fp32 rounding, and
    with mlp_act recompute (the kernel's output discarded, recomputed before fc2's backward)
    they are bit-identical to the kernel without recompute."""
    out = interpret_triton('''
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
from megatron.core.tensor_parallel import random as tp_random
from framework.config import ParallelConfig
from framework.fast import swiglu as sw
from framework.models import layers
from framework.patching import patched
from test_attention_variants import model_parallel, world
from test_recompute import MLP_ACT, _cpu_rng_states, _train_steps

calls = []
base_init = layers.ActRecomputeMLP.__init__

def init(self, *a, **k):  # the switch as on a GPU
    base_init(self, *a, **k)
    self.swiglu_kernel = True

def kernel(x):  # the Triton autograd function also for CPU tensors
    calls.append(tuple(x.shape))
    return sw._SwiGLU.apply(x)

kw = dict(activation="swiglu", add_bias_linear=False, perturb=5)  # tests/perturb.py
with world(), model_parallel(1), patched(tp_random, **_cpu_rng_states(tp_random)):
    ref_losses, ref_grads = _train_steps(ParallelConfig(), **kw)
    with patched(layers.ActRecomputeMLP, __init__=init), patched(layers, swiglu=kernel):
        losses, grads = _train_steps(ParallelConfig(), **kw)
        assert len(calls) == 6, calls  # 2 layers x 3 steps
        rc_losses, rc_grads = _train_steps(MLP_ACT, **kw)
        assert len(calls) == 6 + 12, calls  # forward and recompute per layer and step
for a, b in zip(losses, ref_losses):
    assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
for got, want in zip(grads, ref_grads):
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
assert rc_losses == losses
for got, want in zip(rc_grads, grads):
    assert all(torch.equal(got[n], want[n]) for n in want)
print("ok")
''')
    assert "ok" in out


def test_reference_path_is_megatron_cores_swiglu():
    """On CPU `swiglu` is the torch reference: mcore's swiglu function (which mcore compiles,
    hence fp32 rounding differences only)."""
    from megatron.core.fusions.fused_bias_swiglu import swiglu as mcore_swiglu

    x = torch.randn(4, 3, 2 * 10)
    assert torch.allclose(sw.swiglu(x), mcore_swiglu(x), rtol=1e-6, atol=1e-6)
    assert not sw.supported(x)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.swiglu_kernel=true needs model.activation"):
        ModelConfig(activation="gelu", swiglu_kernel=True)
    with pytest.raises(ConfigError, match="model.swiglu_kernel=true .*add_bias_linear=True"):
        ModelConfig(activation="swiglu", add_bias_linear=True, swiglu_kernel=True)
    with pytest.raises(ConfigError, match="bias_activation_fusion=False"):
        ModelConfig(activation="swiglu", add_bias_linear=False, swiglu_kernel=True,
                    bias_activation_fusion=False)
    ModelConfig(activation="swiglu", add_bias_linear=False, swiglu_kernel=True)
    ModelConfig(activation="gelu", swiglu_kernel=False)


@pytest.mark.parametrize("on_gpu,kernel,bias,fusion,compiled,want", [
    (True, None, False, None, False, True),    # the default on GPU
    (True, False, False, None, False, False),  # mcore's fused SwiGLU
    (True, None, True, None, False, False),    # biases: mcore's bias + SwiGLU kernel
    (True, None, False, False, False, False),  # the unfused reference
    (True, None, False, None, True, False),    # torch.compile'd layers: mcore's, compiled inline
    (True, True, False, None, True, True),     # ... unless asked for (a graph break)
    (False, None, False, None, False, False),  # CPU
])
def test_switch_resolution(monkeypatch, on_gpu, kernel, bias, fusion, compiled, want):
    from framework.models import transformer

    monkeypatch.setattr(transformer, "swiglu_triton", object())  # as if triton were installed
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                        activation="swiglu", add_bias_linear=bias, swiglu_kernel=kernel,
                        bias_activation_fusion=fusion, torch_compile=compiled)
    cfg = transformer.transformer_config(model, ParallelConfig(), bf16=False, fp16=False,
                                         on_gpu=on_gpu)
    assert cfg.swiglu_kernel is want
    monkeypatch.setattr(transformer, "swiglu_triton", None)  # triton missing: never on
    assert transformer.transformer_config(model, ParallelConfig(), bf16=False, fp16=False,
                                          on_gpu=on_gpu).swiglu_kernel is False


def test_mlp_with_the_switch_keeps_state_dict_and_outputs(mp1, monkeypatch):
    """The switch changes no parameter: a swiglu GPT built with it on has the same state dict,
    and its MLPs route the activation through `swiglu` (CPU tensors: the reference path), giving
    the same logits and gradients as mcore's path on perturbed weights."""
    from framework.models import layers
    from helpers import build_cpu

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                        ffn_hidden_size=96, activation="swiglu", add_bias_linear=False,
                        hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    ref = build_cpu(model, 128)[0]
    on = build_cpu(model, 128)[0]
    mlps = [m for m in on.modules() if isinstance(m, layers.ActRecomputeMLP)]
    assert len(mlps) == 2 and not any(m.swiglu_kernel for m in mlps)  # CPU: off
    for m in mlps:  # forced on: the kernel's entry point, which takes the reference on CPU
        m.swiglu_kernel = True
    with torch.no_grad():  # perturb every parameter (zero biases / unit norms hide bugs)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    on.load_state_dict(ref.state_dict())
    assert list(on.state_dict()) == list(ref.state_dict())
    calls = []
    real = layers.swiglu
    monkeypatch.setattr(layers, "swiglu", lambda x: calls.append(x.shape) or real(x))
    tokens = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16)[None].expand(2, -1)
    outs = []
    for m in (ref, on):
        m.train()
        y = m(tokens, pos, None)
        y.float().pow(2).mean().backward()
        outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    assert len(calls) == 2 and calls[0][-1] == 2 * 96  # one per layer, on fc1's output
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_swiglu_kernel_on_a_gpu_without_triton_is_an_error(monkeypatch):
    """model.swiglu_kernel=true on a CUDA device where Triton is missing: a one-line error
    before any model is built (the switch would otherwise stay off without a word)."""
    import importlib.util

    from framework import plan
    from framework.config import register_configs
    from helpers import load_config

    register_configs()
    cfg = load_config("model=llama_tiny", "model.swiglu_kernel=true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ConfigError, match="model.swiglu_kernel=true needs Triton on the GPU"):
        plan._check_device_features(cfg, "cuda")
    plan._check_device_features(cfg, "cpu")  # the CPU run notes it instead
    rope = load_config("model=llama_tiny", "model.qkv_rope_fusion=true")
    with pytest.raises(ConfigError, match="model.qkv_rope_fusion=true needs Triton on the GPU"):
        plan._check_device_features(rope, "cuda")
