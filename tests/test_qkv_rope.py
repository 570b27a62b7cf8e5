"""RoPE of q and k as they are split out of megatron-core's fused QKV output
(`model.qkv_rope_fusion`: framework/fast/rope.py's `fused_qkv_rope`, routed by our
`SelfAttention`). The kernel runs on CPU under Triton's interpreter; the GPU suite runs it
compiled (tests/test_gpu_attention.py)."""
import torch

from helpers import interpret_triton
from test_attention_variants import model_parallel, world
from test_recompute import _train_steps

from framework.config import ParallelConfig
from framework.models import layers
from framework.patching import patched

GQA = dict(position_embedding_type="rope", num_attention_heads=4, num_query_groups=2,
           add_bias_linear=False, add_qkv_bias=True)


def test_fused_qkv_rope_is_mcores_split_then_fused_rope_interpreted():
    """Forward and backward, bit for bit, against mcore's split of the fused QKV output followed
    by `fused_rope` on q and k: MHA, GQA and MQA groupings, a partial rotary dim, fp32 and
    bf16, a gradient missing for q, and a mixed input that is a non-contiguous view."""
    out = interpret_triton('''
import torch
from framework.fast.rope import _FusedQKVRope, _FusedRope
torch.manual_seed(0)

def reference(mixed, fq, fk, qpg):
    s, b, g, w = mixed.shape
    d = w // (qpg + 2)
    q, k, v = torch.split(mixed, [qpg * d, d, d], dim=3)
    q = q.reshape(s, b, g * qpg, d)
    return _FusedRope.apply(q, fq), _FusedRope.apply(k, fk), v

cases = [(1, 16, 16, torch.float32), (2, 16, 16, torch.bfloat16), (4, 8, 8, torch.float32),
         (3, 16, 8, torch.bfloat16)]
for qpg, d, rot, dt in cases:
    s, b, g = 5, 3, 2
    fq = torch.randn(s, 1, 1, rot // 2).repeat(1, 1, 1, 2) * 3  # mcore's cat((f, f))
    fk = torch.randn(s, 1, 1, rot // 2).repeat(1, 1, 1, 2) * 3
    base = torch.randn(s, b, g, (qpg + 2) * d + 4).to(dt)
    for mixed0 in (base[..., :(qpg + 2) * d].contiguous(), base[..., :(qpg + 2) * d]):
        for drop_q in (False, True):
            m1 = mixed0.detach().clone().requires_grad_()
            m2 = mixed0.detach().clone().requires_grad_()
            got = _FusedQKVRope.apply(m1, fq, fk, qpg)
            want = reference(m2, fq, fk, qpg)
            for a, r in zip(got, want):
                assert a.shape == r.shape and a.dtype == r.dtype, (a.shape, r.shape)
                assert torch.equal(a, r), (qpg, d, rot, dt, float((a - r).abs().max()))
            assert all(t.is_contiguous() for t in got)
            grads = [torch.randn(t.shape).to(dt) for t in got]
            use = slice(1, 3) if drop_q else slice(0, 3)
            torch.autograd.backward(list(got)[use], grads[use])
            torch.autograd.backward(list(want)[use], grads[use])
            assert torch.equal(m1.grad, m2.grad), (qpg, d, rot, dt, drop_q)
print("ok")
''')
    assert "ok" in out


def _force_qkv_rope(model_calls, kernel=None, supported=None):
    """Patches that switch `qkv_rope_fusion` on in every SelfAttention built (as on a GPU) and
    count the calls of the fused function (`kernel` stands in for it where given)."""
    base_init = layers.SelfAttention.__init__
    real = kernel or layers.fused_qkv_rope

    def init(self, config, *a, **k):
        base_init(self, config, *a, **k)
        self.config.qkv_rope_fusion = True

    def counted(*a):
        model_calls.append(tuple(a[0].shape))
        return real(*a)

    return dict(init=init, counted=counted,
                supported=supported or (lambda *a: True))


def _reference_qkv_rope(mixed, fq, fk, qpg):
    """mcore's split and unfused RoPE, as one function (the CPU stand-in for the kernel)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    s, b, g, w = mixed.shape
    d = w // (qpg + 2)
    q, k, v = torch.split(mixed, [qpg * d, d, d], dim=3)
    q = q.reshape(s, b, g * qpg, d)
    return _apply_rotary_pos_emb_bshd(q, fq), _apply_rotary_pos_emb_bshd(k, fk), v


def _train(fused: bool, kernel=None, supported=None):
    calls = []
    p = _force_qkv_rope(calls, kernel, supported)
    with world(), model_parallel(1):
        if not fused:
            return _train_steps(ParallelConfig(), perturb=5, **GQA), calls
        with patched(layers.SelfAttention, __init__=p["init"]), \
                patched(layers, fused_qkv_rope=p["counted"],
                        fused_qkv_rope_supported=p["supported"]):
            return _train_steps(ParallelConfig(), perturb=5, **GQA), calls


def test_attention_takes_the_rotation_from_the_split_and_not_twice():
    """Three SGD steps of a tiny GQA RoPE GPT (every parameter perturbed) with the switch on and the fused function stood in
    for by mcore's own split + rotation: bit-identical losses and gradients to mcore's path, so
    mcore's forward did not rotate q and k a second time; one call per layer and step."""
    (ref_losses, ref_grads), _ = _train(False)
    (losses, grads), calls = _train(True, kernel=_reference_qkv_rope)
    assert len(calls) == 2 * 3, calls
    assert losses == ref_losses
    for got, want in zip(grads, ref_grads):
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_unsupported_layouts_fall_back_to_mcores_rotation():
    """Where the kernel does not take the tensors (here: CPU), the switch leaves the call to
    mcore's split and rotation: bit-identical to the path without it."""
    (ref_losses, ref_grads), _ = _train(False)
    (losses, grads), calls = _train(True, supported=lambda *a: False)
    assert calls == []
    assert losses == ref_losses
    for got, want in zip(grads, ref_grads):
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_fused_qkv_rope_in_training_interpreted():
    """The Triton kernel itself (interpreted, CPU tensors) in three SGD steps of the tiny GQA
    GPT: the same losses and gradients as mcore's path to fp32 rounding (the kernel computes
    cos/sin in registers), one call per layer and step."""
    out = interpret_triton('''
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
from test_qkv_rope import _train
(ref_losses, ref_grads), _ = _train(False)
(losses, grads), calls = _train(True)
assert len(calls) == 6, calls
for a, b in zip(losses, ref_losses):
    assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
for got, want in zip(grads, ref_grads):
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
print("ok")
''')
    assert "ok" in out


def test_the_switch_stays_out_of_evaluation_and_decoding():
    """`_fusable_rope` hands over the angles only in training, without a KV cache, packed
    sequences or positional arguments, and only for plain RoPE."""
    with world(), model_parallel(1):
        from framework.models.build import build_model
        from test_attention_variants import VOCAB, tiny

        model = build_model(tiny(**GQA), ParallelConfig(), vocab_size=VOCAB, bf16=False,
                            fp16=False, device=torch.device("cpu"), wrap_ddp=False)[0]
        attn = next(m for m in model.modules() if isinstance(m, layers.SelfAttention))
        attn.config.qkv_rope_fusion = True
        emb = torch.zeros(4, 1, 1, 8)
        x = torch.zeros(4, 1, 32)
        # (CPU tensors: the kernel's own support check stood in for, as on a GPU)
        with patched(layers, fused_qkv_rope_supported=lambda *a: True):
            attn.train()
            assert attn._fusable_rope(x, (), dict(rotary_pos_emb=emb)) == (emb, emb)
            assert attn._fusable_rope(x, (), dict(rotary_pos_emb=(emb, emb))) == (emb, emb)
            assert attn._fusable_rope(x, (None,), dict(rotary_pos_emb=emb)) is None
            assert attn._fusable_rope(x, (), dict(rotary_pos_emb=None)) is None
            for key in ("inference_context", "packed_seq_params", "rotary_pos_cos"):
                assert attn._fusable_rope(x, (), {"rotary_pos_emb": emb, key: object()}) is None
            with patched(attn.config, rotary_interleaved=True):
                assert attn._fusable_rope(x, (), dict(rotary_pos_emb=emb)) is None
            attn.eval()
            assert attn._fusable_rope(x, (), dict(rotary_pos_emb=emb)) is None
            attn.config.qkv_rope_fusion = False
            attn.train()
            assert attn._fusable_rope(x, (), dict(rotary_pos_emb=emb)) is None
        # where the kernel does not take the tensors (here: CPU), mcore's route
        attn.config.qkv_rope_fusion = True
        assert attn._fusable_rope(x, (), dict(rotary_pos_emb=emb)) is None

def test_config_switch():
    """model.qkv_rope_fusion: null stays off; true needs RoPE and rope_fusion (one-line error
    naming the field); on GPU it reaches the transformer config, on CPU it does not."""
    import pytest

    from framework.config import ModelConfig
    from framework.errors import ConfigError
    from framework.models.transformer import transformer_config

    rope = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                position_embedding_type="rope")
    with pytest.raises(ConfigError, match="model.qkv_rope_fusion=true needs RoPE"):
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                    qkv_rope_fusion=True)
    with pytest.raises(ConfigError, match="model.qkv_rope_fusion=true needs RoPE"):
        ModelConfig(**rope, rope_fusion=False, qkv_rope_fusion=True)
    for value, on_gpu, want in ((None, True, False), (False, True, False), (True, True, True),
                                (True, False, False)):
        m = ModelConfig(**rope, qkv_rope_fusion=value)
        c = transformer_config(m, ParallelConfig(), bf16=False, fp16=False, on_gpu=on_gpu)
        assert c.qkv_rope_fusion is want, (value, on_gpu)
