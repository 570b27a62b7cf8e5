"""Lean decode (framework/fast/lean_decode.py) on RoPE models, CPU, fp32, every parameter
perturbed (tests/perturb.py): its logits at every step of a teacher-forced continuation, its
greedy and beam-search tokens and logprobs equal megatron-core's modules (`lean_decode=False`)
and the full recompute (`use_cache=False`); the static-shape step behind `decode_cuda_graph`
(run eagerly on CPU) too. Batches are left-padded with prompts of different lengths, so every
row has its own positions. Each case also checks that the lean functions really ran (a counter
on `forward_chunk` / `forward_static`, and `_Decoder.lean`), not megatron-core's fallback.

Models:
* gpt_rope: gpt_tiny's architecture (RoPE, LayerNorm, GeLU, biases, tied embeddings);
* gpt_rope_half: the same with rotary_percent 0.5 (half of each head's dims pass through);
* llama_gqa_odd: 9 heads in 3 KV groups, RMSNorm, SwiGLU, no biases, untied, rotary_base
  50000, Llama-3 rope scaling (original context 16, so the scaling acts at these positions);
* qwen_like: 6 heads in 2 groups, q/k/v biases (`add_qkv_bias`), RMSNorm, SwiGLU, rope 1e6;
* qwen3_like: 6 heads of 16 dims (!= hidden/heads) in 2 groups, per-head q/k RMSNorm
  (`qk_layernorm`, weights perturbed), no biases;
* with megatron-core's `rotary_interleaved`, and with `apply_rope_fusion` (on CPU mcore's fused
  entry point falls back to its unfused function: this checks the lean path's layout for it);
* HF llama_odd (5 heads in 1 group, head_dim 16 != hidden/heads, theta 50000, Llama-3
  scaling with HF's four parameters, untied), HF qwen2 (q/k/v biases, tied) and HF qwen3
  (q/k norms, head_dim 16, untied), from
  tests/test_llama.py, converted with data_tools.convert: all our paths equal HF `generate`.
* TP2 and PP2 over gloo (two processes): HF qwen2 loaded at TP2 (2 KV groups, one per rank)
  and HF llama_odd at PP2 (one layer per stage): the lean, static (TP2), megatron-core and
  no-cache paths equal HF `generate` and each other.
"""
from __future__ import annotations

import os

import pytest
import torch

from framework.config import ModelConfig, ParallelConfig
from helpers import checkpoint_model_cfg, free_port, gloo_world, spawn
from perturb import assert_perturbed
from test_generation import build
from test_llama import NEW, PROMPTS, _hf_generate, _padded, cli, make_hf

CPU = torch.device("cpu")
VOCAB, PADDED = 61, 64
PAD, EOS = 0, 2
# left-padded batch: prompts of 7, 2, 4, 1 and 5 tokens
BATCH = [[5, 9, 11, 12, 7, 30, 31], [8, 1], [20, 21, 22, 23], [44], [3, 17, 40, 39, 6]]
STEPS = 10

BASE = dict(num_layers=2, hidden_size=48, num_attention_heads=4, seq_length=32,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1,
            position_embedding_type="rope")
LLAMA = dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             share_embeddings_and_output_weights=False)
MODELS = {
    "gpt_rope": dict(),
    "gpt_rope_half": dict(rotary_percent=0.5),
    "llama_gqa_odd": dict(LLAMA, hidden_size=72, num_attention_heads=9, num_query_groups=3,
                          ffn_hidden_size=96, rotary_base=50000, rope_scaling=True,
                          rope_scaling_factor=4.0, rope_scaling_low_freq_factor=1.0,
                          rope_scaling_high_freq_factor=3.0,
                          rope_scaling_original_max_position_embeddings=16),
    "qwen_like": dict(LLAMA, num_attention_heads=6, num_query_groups=2, add_qkv_bias=True,
                      ffn_hidden_size=80, rotary_base=1000000,
                      share_embeddings_and_output_weights=True),
    "qwen3_like": dict(LLAMA, num_attention_heads=6, num_query_groups=2, kv_channels=16,
                       qk_layernorm=True, ffn_hidden_size=80, rotary_base=1000000),
}
GEN_CASES = {"greedy": dict(), "beam3": dict(num_beams=3, length_penalty=0.8),
             "beam2_early": dict(num_beams=2, length_penalty=1.2, early_stopping=True)}


@pytest.fixture(scope="module")
def models(mp1):
    out = {}
    for i, (name, extra) in enumerate(MODELS.items()):
        model = build(ModelConfig(**{**BASE, **extra}), PADDED, seed=10 + i)
        assert_perturbed(model)
        out[name] = model
    return out


def count_lean_calls(set_attr=setattr):
    """Counts of the lean functions' calls from now on (`set_attr` swaps in the counting
    wrappers: monkeypatch.setattr in a test, setattr in a worker process): proof that decode
    steps took the lean path."""
    from framework.fast import lean_decode

    calls = {"chunk": 0, "static": 0}
    chunk, static = lean_decode.forward_chunk, lean_decode.forward_static

    def counted_chunk(*a, **k):
        calls["chunk"] += 1
        return chunk(*a, **k)

    def counted_static(*a, **k):
        calls["static"] += 1
        return static(*a, **k)

    set_attr(lean_decode, "forward_chunk", counted_chunk)
    set_attr(lean_decode, "forward_static", counted_static)
    return calls


@pytest.fixture
def lean_calls(monkeypatch):
    return count_lean_calls(monkeypatch.setattr)


def forced_logits(model, prompts, forced, **decoder_kw):
    """fp32 next-token logits [rows, steps, vocab] at every step of a continuation fixed in
    advance (`forced` [rows, steps]), so every path sees the same tokens whatever it would pick;
    and whether the decoder took the lean path."""
    from framework.generation import _Decoder, _prepare_batch, generation_mode

    tokens, real = _prepare_batch(prompts, None, PAD, CPU)
    out = []
    with generation_mode(model):
        dec = _Decoder(model, tokens, real, max_len=tokens.shape[1] + forced.shape[1],
                       **decoder_kw)
        for t in range(forced.shape[1]):
            out.append(dec.logits())
            dec.advance(forced[:, t])
    return torch.stack(out, dim=1), dec.lean


@pytest.mark.parametrize("name", list(MODELS))
def test_supported(models, name):
    from framework.fast.lean_decode import supported
    from framework.models.wrappers import unwrap

    assert supported(unwrap(models[name][0]))


@pytest.mark.parametrize("name", list(MODELS))
def test_step_logits_equal_megatron_and_full_recompute(models, name, lean_calls):
    model = models[name]
    forced = torch.randint(3, VOCAB, (len(BATCH), STEPS),
                           generator=torch.Generator().manual_seed(1))
    lean, took_lean = forced_logits(model, BATCH, forced, use_cache=True)
    assert took_lean and lean_calls["chunk"] == STEPS - 1  # every step after the prefill
    static, _ = forced_logits(model, BATCH, forced, use_cache=True, static=True)
    assert lean_calls["static"] == STEPS - 1
    mcore, took_lean = forced_logits(model, BATCH, forced, use_cache=True, lean=False)
    assert not took_lean and lean_calls["chunk"] == STEPS - 1
    full, _ = forced_logits(model, BATCH, forced, use_cache=False)
    assert lean.abs().max() > 1.0  # logits of some size, so the tolerances below mean something
    # row i's logits depend on its own tokens only: a wrong rotation shows in every row
    torch.testing.assert_close(lean, mcore, rtol=0, atol=2e-5)
    torch.testing.assert_close(lean, full, rtol=0, atol=2e-5)
    torch.testing.assert_close(static, mcore, rtol=0, atol=2e-5)


def test_fused_rope_layout(mp1, lean_calls):
    """With `apply_rope_fusion` (a GPU option) the lean step hands mcore's
    `apply_rotary_pos_emb` one angle row per (position, row): t as [s * b, 1, n, d]. On CPU our
    fused entry point (framework/fast/rope.py) falls back to mcore's unfused function, so this
    checks that layout against mcore's own fused-path call (tests/test_gpu_lean_decode_rope.py
    runs the Triton kernel)."""
    from megatron.core.models.common.embeddings import rope_utils

    from framework import mcore_patches
    from framework.fast.lean_decode import _rope
    from framework.generation import _Decoder
    from framework.models.wrappers import unwrap

    mcore_patches.install_fused_rope()
    assert rope_utils.fused_apply_rotary_pos_emb is not None
    model = build(ModelConfig(**{**BASE, **MODELS["llama_gqa_odd"]}), PADDED, seed=7)
    mod = unwrap(model[0])
    mod.config.apply_rope_fusion = True
    dec = _Decoder(model, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                   max_len=4, use_cache=True)
    assert _rope(mod, dec.ctx).fused
    forced = torch.randint(3, VOCAB, (len(BATCH), STEPS),
                           generator=torch.Generator().manual_seed(2))
    lean, took_lean = forced_logits(model, BATCH, forced, use_cache=True)
    static, _ = forced_logits(model, BATCH, forced, use_cache=True, static=True)
    mcore, _ = forced_logits(model, BATCH, forced, use_cache=True, lean=False)
    assert took_lean and lean_calls["chunk"] == STEPS - 1 and lean_calls["static"] == STEPS - 1
    torch.testing.assert_close(lean, mcore, rtol=0, atol=2e-5)
    torch.testing.assert_close(static, mcore, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["gpt_rope", "llama_gqa_odd"])
def test_interleaved_rope(mp1, name, lean_calls):
    """megatron-core's `rotary_interleaved` (pairs (0, 1), (2, 3), ... rotated; not a field of
    our ModelConfig, so set on the built model: the shared TransformerConfig and the
    RotaryEmbedding, as GPTModel would have built them)."""
    from framework.models.wrappers import unwrap

    model = build(ModelConfig(**{**BASE, **MODELS[name]}), PADDED, seed=8)
    mod = unwrap(model[0])
    mod.config.rotary_interleaved = True
    mod.rotary_pos_emb.rotary_interleaved = True
    forced = torch.randint(3, VOCAB, (len(BATCH), STEPS),
                           generator=torch.Generator().manual_seed(3))
    lean, took_lean = forced_logits(model, BATCH, forced, use_cache=True)
    static, _ = forced_logits(model, BATCH, forced, use_cache=True, static=True)
    mcore, _ = forced_logits(model, BATCH, forced, use_cache=True, lean=False)
    full, _ = forced_logits(model, BATCH, forced, use_cache=False)
    assert took_lean and lean_calls["chunk"] == STEPS - 1 and lean_calls["static"] == STEPS - 1
    for other in (mcore, full, static):
        torch.testing.assert_close(lean, other, rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", list(GEN_CASES))
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_equals_megatron_and_full_recompute(models, name, case, lean_calls):
    from framework.generation import generate

    model, kw = models[name], GEN_CASES[case]

    def run(**extra):
        return generate(model, BATCH, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB,
                        max_new_tokens=STEPS, return_logprobs=True, **kw, **extra)

    lean = run()
    assert lean_calls["chunk"] > 0
    mcore, full = run(lean_decode=False), run(use_cache=False)
    for other in (mcore, full):
        assert torch.equal(lean[0], other[0]), (case, lean[0].tolist(), other[0].tolist())
        torch.testing.assert_close(lean[1], other[1], rtol=0, atol=1e-5)
    if "num_beams" not in kw:  # the static step serves greedy and sampling
        static = run(decode_cuda_graph=True)
        assert lean_calls["static"] > 0
        assert torch.equal(static[0], mcore[0])
        torch.testing.assert_close(static[1], mcore[1], rtol=0, atol=1e-5)
    # a prompt decodes the same alone as in the left-padded batch
    s = max(map(len, BATCH))
    for i in (0, 3):
        alone = generate(model, [BATCH[i]], eos_id=EOS, pad_id=PAD, vocab_size=VOCAB,
                         max_new_tokens=STEPS, **kw)[0, len(BATCH[i]):]
        batched = lean[0][i, s:]
        assert torch.equal(alone, batched[:len(alone)])


# --------------------------------------------------------------------------------------------
# Hugging Face Llama / Qwen2, converted (tests/test_llama.py's references)
# --------------------------------------------------------------------------------------------
HF_KINDS = ["llama_odd", "qwen2", "qwen3"]
HF_CASES = {"greedy": ({}, {}),
            "beam4": (dict(num_beams=4, length_penalty=1.3, early_stopping=True),
                      dict(num_beams=4, length_penalty=1.3, early_stopping=True))}
PATHS = {"lean": dict(), "static": dict(decode_cuda_graph=True),
         "mcore": dict(lean_decode=False), "no_cache": dict(use_cache=False)}


@pytest.fixture(scope="module")
def hf_work(tmp_path_factory, mp1):
    from framework.config import TokenizerConfig
    from framework.inference import load_for_inference
    from framework.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("lean_rope_hf")
    out = {"dir": d}
    for seed, kind in enumerate(HF_KINDS):
        hf, vocab = make_hf(str(d / kind / "hf"), kind, 21 + seed)
        cli("hf-to-megatron", "--load", d / kind / "hf", "--save", d / kind / "tp1")
        model_cfg, _meta = checkpoint_model_cfg(d / kind / "tp1")
        model = load_for_inference(str(d / kind / "tp1"), model_cfg, ParallelConfig(),
                                   padded_vocab=_padded(vocab, 1), device=CPU, bf16=False)
        tok = build_tokenizer(TokenizerConfig(path=str(d / kind / "tp1" / "iter_0000000" /
                                                        "tokenizer")))
        refs = {case: _hf_generate(hf, tok, PROMPTS, **theirs)
                for case, (_ours, theirs) in HF_CASES.items()}
        out[kind] = dict(model=model, vocab=vocab, tok=tok, refs=refs,
                         ids=[tok.encode(p) for p in PROMPTS])
    return out


def _trim(rows, eod):
    return [r[:r.index(eod) + 1] if eod in r else r for r in rows]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("kind", HF_KINDS)
def test_converted_hf_generate_equals_hf(hf_work, kind, case, path, lean_calls):
    from framework.fast.lean_decode import supported
    from framework.generation import generate
    from framework.models.wrappers import unwrap

    w = hf_work[kind]
    ours = HF_CASES[case][0]
    if path == "static" and ours.get("num_beams", 1) > 1:
        pytest.skip("the static (CUDA-graph) step serves greedy and sampling")
    assert supported(unwrap(w["model"][0]))
    tok = w["tok"]
    out = generate(w["model"], w["ids"], eos_id=tok.eod, pad_id=tok.pad, vocab_size=w["vocab"],
                   max_new_tokens=NEW, **PATHS[path], **ours)
    s = max(map(len, w["ids"]))
    assert _trim(out[:, s:].tolist(), tok.eod) == w["refs"][case]
    if path in ("lean", "static"):
        assert lean_calls["chunk" if path == "lean" else "static"] > 0


# --------------------------------------------------------------------------------------------
# TP2 and PP2 over gloo
# --------------------------------------------------------------------------------------------
def _tp2_pp2_worker(rank, ports, d, jobs, out):
    """TP2 on jobs["tp2"] (qwen2), then PP2 on jobs["pp2"] (llama_odd: untied, 1 layer per
    stage); each job: (HF kind, vocab, prompt ids, eod, pad)."""
    from framework import interop
    from framework.fast import lean_decode
    from framework.generation import generate
    from framework.models.build import build_model
    from framework.models.wrappers import unwrap

    calls = count_lean_calls()
    results = {}
    for (layout, (kind, vocab, ids, eod, pad)), port in zip(sorted(jobs.items()), ports):
        tp, pp = (2, 1) if layout == "tp2" else (1, 2)
        with gloo_world(rank, 2, tp=tp, pp=pp, port=port):
            model_cfg, _meta = checkpoint_model_cfg(os.path.join(d, kind, "tp1"))
            model = build_model(model_cfg, ParallelConfig(tensor_model_parallel_size=tp,
                                                          pipeline_model_parallel_size=pp),
                                vocab_size=_padded(vocab, tp), bf16=False, fp16=False,
                                device=CPU, wrap_ddp=False)
            interop.load_hf_into_model(os.path.join(d, kind, "hf"), model, model_cfg)
            results[layout, "supported"] = lean_decode.supported(unwrap(model[0]))
            for case, (ours, _theirs) in HF_CASES.items():
                for path, kw in PATHS.items():
                    if path == "static" and (ours.get("num_beams", 1) > 1 or pp > 1):
                        continue  # the static step: greedy / sampling, one stage
                    before = dict(calls)
                    results[layout, case, path] = generate(
                        model, ids, eos_id=eod, pad_id=pad, vocab_size=vocab,
                        max_new_tokens=NEW, return_logprobs=True, **kw, **ours)
                    results[layout, case, path, "calls"] = {
                        k: calls[k] - before[k] for k in calls}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_tp2_and_pp2_equal_hf_and_megatron(hf_work, tmp_path):
    jobs = {}
    for layout, kind in (("tp2", "qwen2"), ("pp2", "llama_odd")):
        w = hf_work[kind]
        jobs[layout] = (kind, w["vocab"], w["ids"], w["tok"].eod, w["tok"].pad)
    spawn(_tp2_pp2_worker, ([free_port(), free_port()], str(hf_work["dir"]), jobs,
                            str(tmp_path)))
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for layout, (kind, _vocab, ids, eod, _pad) in jobs.items():
            s = max(map(len, ids))
            assert res[layout, "supported"], layout
            for case in HF_CASES:
                lean_t, lean_lp = res[layout, case, "lean"]
                # every rank gets the tokens (shared from the last stage)
                assert _trim(lean_t[:, s:].tolist(), eod) == hf_work[kind]["refs"][case], \
                    (layout, case)
                for path in PATHS:
                    if (layout, case, path) not in res:
                        continue
                    t, lp = res[layout, case, path]
                    calls = res[layout, case, path, "calls"]
                    if path == "lean":
                        assert calls["chunk"] > 0, (layout, case)
                    elif path == "static":
                        assert calls["static"] > 0, (layout, case)
                    else:
                        assert calls == {"chunk": 0, "static": 0}, (layout, case, path)
                    assert torch.equal(t, lean_t), (layout, case, path)
                    torch.testing.assert_close(lp, lean_lp, rtol=0, atol=1e-5)
