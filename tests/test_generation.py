"""Generation: Hugging Face parity (greedy, beam search), KV cache, padding, sampling
distributions, TP2 / PP2 / PP2xVPP2 == single (gloo), bad input, generate.py end to end (CPU).
The GPU checks (PP2 / TP2 over NCCL, RoPE, bf16, decode CUDA graphs) are in
tests/test_gpu_generation.py."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from framework.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig
from perturb import perturb_
from helpers import GENERATE, ROOT, free_ports, gloo_world, left_padded, run, spawn

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mp1():
    with gloo_world(tp=1):
        yield


def build(model_cfg, vocab, parallel=None, seed=0):
    from framework.models.build import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg, parallel or ParallelConfig(), vocab_size=vocab, bf16=False,
                        fp16=False, device=CPU, wrap_ddp=False)
    perturb_(model, seed=seed)  # non-zero biases, non-unit norms (tests/perturb.py)
    return model


# --------------------------------------------------------------------------------------------
# Hugging Face parity
# --------------------------------------------------------------------------------------------
V, H, LAYERS, HEADS, POS, EOS = 40, 32, 2, 4, 48, 3
PROMPTS = [[5, 9, 11, 2, 7], [8, 1], [20, 21, 22]]


HF_CASES = [
    dict(),
    dict(num_beams=3, length_penalty=0.7),
    dict(num_beams=3, length_penalty=1.0),
    dict(num_beams=3, length_penalty=1.0, early_stopping=True),
    dict(num_beams=4, length_penalty=-0.5, early_stopping="never"),
]


def copy_hf_gpt2(hf, chunk):
    """GPT2LMHeadModel weights -> our GPTModel (TP1): Conv1D weights transposed, fused QKV
    reordered from [q | k | v] to megatron's per-head [q_h k_h v_h] groups."""
    from framework.models.wrappers import unwrap

    sd, d = hf.state_dict(), H // HEADS

    def qkv(w):
        return w.reshape(3, HEADS, d, *w.shape[1:]).transpose(0, 1).reshape(3 * H, *w.shape[1:])

    wte = unwrap(chunk).embedding.word_embeddings.weight.detach().clone()
    wte.zero_()[:V] = sd["transformer.wte.weight"]  # megatron pads the vocabulary
    ours = {"embedding.word_embeddings.weight": wte,
            "embedding.position_embeddings.weight": sd["transformer.wpe.weight"],
            "decoder.final_layernorm.weight": sd["transformer.ln_f.weight"],
            "decoder.final_layernorm.bias": sd["transformer.ln_f.bias"]}
    for i in range(LAYERS):
        h, o = f"transformer.h.{i}.", f"decoder.layers.{i}."
        ours.update({
            o + "input_layernorm.weight": sd[h + "ln_1.weight"],
            o + "input_layernorm.bias": sd[h + "ln_1.bias"],
            o + "self_attention.linear_qkv.weight": qkv(sd[h + "attn.c_attn.weight"].t()),
            o + "self_attention.linear_qkv.bias": qkv(sd[h + "attn.c_attn.bias"]),
            o + "self_attention.linear_proj.weight": sd[h + "attn.c_proj.weight"].t(),
            o + "self_attention.linear_proj.bias": sd[h + "attn.c_proj.bias"],
            o + "pre_mlp_layernorm.weight": sd[h + "ln_2.weight"],
            o + "pre_mlp_layernorm.bias": sd[h + "ln_2.bias"],
            o + "mlp.linear_fc1.weight": sd[h + "mlp.c_fc.weight"].t(),
            o + "mlp.linear_fc1.bias": sd[h + "mlp.c_fc.bias"],
            o + "mlp.linear_fc2.weight": sd[h + "mlp.c_proj.weight"].t(),
            o + "mlp.linear_fc2.bias": sd[h + "mlp.c_proj.bias"]})
    missing, unexpected = unwrap(chunk).load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing


@pytest.fixture(scope="module")
def hf_pair(mp1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # exact GeLU on both sides; large init so logits are peaked (no near-ties between
    # implementations); a larger EOS embedding so that EOS is often among the candidates
    hcfg = GPT2Config(vocab_size=V, n_positions=POS, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, initializer_range=0.3, bos_token_id=EOS,
                      eos_token_id=EOS, pad_token_id=EOS)
    hf = GPT2LMHeadModel(hcfg).eval()
    perturb_(hf)  # non-zero biases, non-unit norms (tests/perturb.py)
    with torch.no_grad():  # (x3: with these perturbed weights x2 never reaches EOS)
        hf.transformer.wte.weight[EOS] *= 3.0
    ours = build(ModelConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                             seq_length=POS, hidden_dropout=0.0, attention_dropout=0.0,
                             make_vocab_size_divisible_by=16), 48)  # 8 padded ids
    copy_hf_gpt2(hf, ours[0])
    ids, mask = left_padded(PROMPTS, EOS)
    single = torch.tensor([PROMPTS[0]])
    refs = [(hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kw),
             hf.generate(single, attention_mask=torch.ones_like(single), max_new_tokens=12,
                         do_sample=False, **kw)) for kw in HF_CASES]
    return refs, ours


@pytest.mark.parametrize("kw", HF_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "greedy")
def test_matches_hf_generate(hf_pair, kw):
    from framework.generation import generate

    refs, ours = hf_pair
    ref, ref1 = refs[HF_CASES.index(kw)]
    ids, mask = left_padded(PROMPTS, EOS)
    got = generate(ours, ids, mask, eos_id=EOS, vocab_size=V, max_new_tokens=12, **kw)
    assert torch.equal(got, ref), (got[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    # one prompt alone (no padding), as a token list, without the KV cache
    got1 = generate(ours, [PROMPTS[0]], eos_id=EOS, vocab_size=V, max_new_tokens=12,
                    use_cache=False, **kw)
    assert torch.equal(got1, ref1)


def test_hf_cases_exercise_eos(hf_pair):
    """The parity cases are only meaningful if some hypotheses end at EOS before the limit."""
    refs, _ = hf_pair
    s = max(map(len, PROMPTS))
    ended = sum(int((out[:, s:-1] == EOS).any(dim=1).sum()) for out, _ in refs)
    assert ended >= 3


# --------------------------------------------------------------------------------------------
# KV cache, padding, sampling
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rope_model(mp1):
    """Another architecture: GQA, RMSNorm, SwiGLU, no biases, untied output. (RoPE runs on GPU
    only: megatron-core's RotaryEmbedding moves its frequencies to CUDA; see the GPU test.)"""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      seq_length=40, hidden_dropout=0.0, attention_dropout=0.0,
                      normalization="RMSNorm",
                      activation="swiglu", add_bias_linear=False,
                      share_embeddings_and_output_weights=False, init_method_std=0.1)
    return build(cfg, 64, seed=1)


@pytest.mark.parametrize("kw", [dict(), dict(top_p=0.9, temperature=0.8, seed=7),
                                dict(num_beams=3, length_penalty=0.9)],
                         ids=["greedy", "top_p", "beams"])
def test_kv_cache_matches_full_recompute(rope_model, kw):
    from framework.generation import generate

    prompts = [[5, 9, 11, 2, 7, 30, 31], [8, 1], [20, 21, 22, 23]]
    a, la = generate(rope_model, prompts, eos_id=EOS, max_new_tokens=10, use_cache=True,
                     return_logprobs=True, **kw)
    b, lb = generate(rope_model, prompts, eos_id=EOS, max_new_tokens=10, use_cache=False,
                     return_logprobs=True, **kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    if "top_p" in kw:
        return  # sampling draws differ with the batch; the deterministic modes check padding:
    # a prompt decodes the same alone as inside a left-padded batch
    for i, p in enumerate(prompts):
        alone = generate(rope_model, [p], eos_id=EOS, max_new_tokens=10, **kw)[0, len(p):]
        batched = a[i, 7:]
        assert torch.equal(alone, batched[:len(alone)]) and (batched[len(alone):] == EOS).all()


def test_right_padding_is_realigned(rope_model):
    from framework.generation import generate

    ids = torch.tensor([[5, 9, 11, 0], [8, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = generate(rope_model, ids, mask, max_new_tokens=4, pad_id=0)
    ref = generate(rope_model, [[5, 9, 11], [8, 1]], max_new_tokens=4, pad_id=0)
    assert torch.equal(got[:, 1:], ref)


def _allowed(logits, top_k, top_p, temperature, tol=1e-4):
    """Tokens a sampler may emit, with a margin for cache-vs-recompute rounding."""
    x = logits / temperature
    ok = torch.ones_like(x, dtype=torch.bool)
    if top_k:
        ok &= x >= x.topk(top_k, dim=-1).values[..., -1:] - tol
        x = x.masked_fill(~ok, float("-inf"))
    if top_p:
        probs = x.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        before = torch.zeros_like(probs).scatter(-1, order, sorted_p.cumsum(-1) - sorted_p)
        ok &= before < top_p + tol
    return ok


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.9, top_p_decay=0.7, top_p_bound=0.3),
                                dict(top_k=5, top_p=0.6, temperature=1.5)],
                         ids=["top_k", "top_p_decay", "top_k+top_p"])
def test_sampling_stays_in_allowed_set(rope_model, kw):
    from framework.generation import forward_logits, generate

    prompts = [[5, 9, 11, 2], [8, 1, 4, 4]] * 8
    out = generate(rope_model, prompts, max_new_tokens=12, seed=3, **kw)
    logits = forward_logits(rope_model, out)
    s, top_p = 4, kw.get("top_p", 0.0)
    for t in range(12):
        ok = _allowed(logits[:, s + t - 1], kw.get("top_k", 0), top_p, kw.get("temperature", 1.0))
        assert ok.gather(1, out[:, s + t, None]).all(), t
        if kw.get("top_p_decay"):
            top_p = max(top_p * kw["top_p_decay"], kw["top_p_bound"])
    assert len({tuple(r) for r in out[:, s:].tolist()}) > 2  # it does sample


@pytest.mark.parametrize("kw", [dict(top_k=6, temperature=0.8), dict(top_p=0.7)],
                         ids=["top_k", "top_p"])
def test_first_token_distribution(rope_model, kw):
    """Chi-square of 4000 first tokens against the truncated, renormalised softmax."""
    from framework.generation import filter_logits, forward_logits, generate

    prompt = [5, 9, 11, 2]
    n = 4000
    out = generate(rope_model, [prompt] * n, max_new_tokens=1, seed=11, **kw)
    with torch.no_grad():  # forward_logits keeps autograd on (for training scripts)
        logits = forward_logits(rope_model, torch.tensor([prompt]))[0, -1]
    expected = filter_logits(logits[None] / kw.get("temperature", 1.0), kw.get("top_k", 0),
                             kw.get("top_p", 0.0)).softmax(-1)[0]
    support = expected > 0
    counts = torch.bincount(out[:, -1], minlength=logits.shape[-1]).double()
    assert counts[~support].sum() == 0
    df = int(support.sum()) - 1
    assert 1 <= df < logits.shape[-1] - 1  # truncation is active and leaves a choice
    exp = expected[support].double() * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    # chi-square critical value at p = 0.001 (Wilson-Hilferty); the seed is fixed anyway
    crit = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    assert chi2 < crit, (chi2, crit, counts[support].tolist(), exp.tolist())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,fragment", [
    (dict(num_beams=2, top_k=5), "cannot be combined with sampling"),
    (dict(num_beams=2, top_p=0.5), "cannot be combined with sampling"),
    (dict(num_beams=2, temperature=0.7), "cannot be combined with sampling"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_options(kw, fragment):
    from framework.generation import GenerationOptions

    with pytest.raises(ConfigError, match=fragment):
        GenerationOptions(**kw)


def test_bad_prompts(rope_model):
    from framework.generation import generate
    from framework.inference import GenerateConfig

    with pytest.raises(ConfigError, match="empty"):
        generate(rope_model, [])
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        generate(rope_model, [[1], []])
    with pytest.raises(ConfigError, match="context is 40"):
        generate(rope_model, [list(range(41))])
    with pytest.raises(ConfigError, match="prompts=\\[\\] is empty"):
        GenerateConfig(prompts=[])


# --------------------------------------------------------------------------------------------
# checkpoints: TP2 == TP1, generate.py
# --------------------------------------------------------------------------------------------
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
            hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8,
            init_method_std=0.1)
GEN_CASES = [dict(), dict(num_beams=3, length_penalty=0.8), dict(top_k=4, seed=5)]
CK_PROMPTS = [[4, 5, 13, 6, 16], [11, 15, 12, 16], [8, 8, 14, 9, 16]]
UNTIED4 = dict(num_layers=4, share_embeddings_and_output_weights=False)


@pytest.fixture(scope="module")
def checkpoint(mp1, tmp_path_factory):
    """A tiny GPT checkpoint 'trained' on data=embedded (random weights), another with 4 layers
    and untied embeddings (PP runs on CPU only without tying), and their TP1 outputs."""
    from framework.generation import generate
    from framework.tokenizer import embedded_tokenizer
    from framework.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("gen")
    tok = embedded_tokenizer()
    refs = {}
    for name, extra in (("ckpt", {}), ("ckpt_pp", UNTIED4)):
        cfg = Config(model=ModelConfig(**{**TINY, **extra}), data=DataConfig(type="embedded"))
        model = build(cfg.model, 24, seed=2)  # 19 tokens padded to 24
        save_checkpoint(str(root / name), 3, model, None, None, consumed_samples=0,
                        config=asdict(cfg), tokenizer=tok)
        refs[name] = [generate(model, CK_PROMPTS, eos_id=tok.eod, vocab_size=19,
                               max_new_tokens=8, return_logprobs=True, **kw) for kw in GEN_CASES]
    torch.save(refs, root / "tp1.pt")
    return root / "ckpt"


LEAN_CASES = [
    dict(),  # learned absolute positions, LayerNorm, tanh-GeLU with biases, tied embeddings
    dict(position_embedding_type="alibi"),
    dict(num_query_groups=2, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
         position_embedding_type="none", share_embeddings_and_output_weights=False),
]


@pytest.mark.parametrize("extra", LEAN_CASES, ids=["gpt2", "alibi", "gqa_rms_swiglu_untied"])
def test_lean_decode_equals_megatron_modules(mp1, extra):
    """Decode steps without megatron-core's module stack give megatron-core's tokens and
    logprobs (fp32, prompts of different lengths, so padding masks are exercised)."""
    from framework.fast.lean_decode import supported
    from framework.generation import generate
    from framework.models.wrappers import unwrap

    model = build(ModelConfig(**{**TINY, **extra}), 24, seed=3)
    assert supported(unwrap(model[0]))
    for kw in GEN_CASES:
        lean = generate(model, CK_PROMPTS + [[7, 3]], max_new_tokens=12, vocab_size=19,
                        return_logprobs=True, **kw)
        ref = generate(model, CK_PROMPTS + [[7, 3]], max_new_tokens=12, vocab_size=19,
                       return_logprobs=True, lean_decode=False, **kw)
        assert torch.equal(lean[0], ref[0]), kw
        torch.testing.assert_close(lean[1], ref[1], rtol=0, atol=1e-6)
        # the static-shape step behind decode_cuda_graph (run eagerly on CPU): every step
        # attends over the whole cache buffer with a key mask, so sums differ in the last bits
        static = generate(model, CK_PROMPTS + [[7, 3]], max_new_tokens=12, vocab_size=19,
                          return_logprobs=True, decode_cuda_graph=True, **kw)
        assert torch.equal(static[0], ref[0]), kw
        torch.testing.assert_close(static[1], ref[1], rtol=0, atol=1e-5)
    rope = build(ModelConfig(**{**TINY, "position_embedding_type": "rope"}), 24)
    assert supported(unwrap(rope[0]))  # RoPE takes the lean path (tests/test_lean_decode_rope.py)


def _load(ckpt, parallel):
    from framework.checkpoint import stored_model_config
    from framework.models.build import build_model
    from framework.checkpoint import load_checkpoint, read_meta

    mcfg = stored_model_config(read_meta(ckpt))
    model = build_model(mcfg, parallel, vocab_size=24, bf16=False, fp16=False, device=CPU,
                        wrap_ddp=False)
    load_checkpoint(ckpt, model, None, None, model_cfg=mcfg, with_optimizer=False)
    return model


def _parallel_worker(rank, ports, ckpt, out):
    """TP2 (with sequence parallelism on, as in training), PP2, PP2 x VPP2, then DP2."""
    from framework.generation import gather_across_data_parallel_groups, generate
    from framework.models.wrappers import unwrap

    def run(model):
        return [generate(model, CK_PROMPTS, eos_id=0, vocab_size=19, max_new_tokens=8,
                         return_logprobs=True, **kw) for kw in GEN_CASES]

    results = {}
    with gloo_world(rank, 2, tp=2, port=ports[0]):
        model = _load(ckpt, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
        model[0].train()
        results["tp2"] = run(model)
        # the lean decode path (default) against megatron-core's modules, at TP2
        results["tp2_modules"] = [generate(model, CK_PROMPTS, eos_id=0, vocab_size=19,
                                           max_new_tokens=8, return_logprobs=True,
                                           lean_decode=False, **kw) for kw in GEN_CASES]
        results["tp2_static"] = [generate(model, CK_PROMPTS, eos_id=0, vocab_size=19,
                                          max_new_tokens=8, return_logprobs=True,
                                          decode_cuda_graph=True, **kw) for kw in GEN_CASES]
        results["restored"] = (unwrap(model[0]).config.sequence_parallel
                               and unwrap(model[0]).output_layer.sequence_parallel
                               and model[0].training)
    for vpp in (None, 2):
        with gloo_world(rank, 2, tp=1, pp=2, vpp=vpp, port=ports[vpp or 1]):
            model = _load(ckpt + "_pp", ParallelConfig(pipeline_model_parallel_size=2,
                                                       virtual_pipeline_model_parallel_size=vpp))
            assert len(model) == (vpp or 1)
            results[f"pp2_vpp{vpp}"] = run(model)
    with gloo_world(rank, 2, tp=1, port=ports[3]):  # DP2
        part = torch.arange(2 + rank * 3, dtype=torch.float)[:, None].expand(-1, 3) + 10 * rank
        results["gathered"] = gather_across_data_parallel_groups(part)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_tp_pp_vpp_match_single(checkpoint, tmp_path):
    spawn(_parallel_worker, (free_ports(4), str(checkpoint), str(tmp_path)))
    refs = torch.load(checkpoint.parent / "tp1.pt")
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["restored"]
        for (t, lp), (t2, lp2), (t3, lp3) in zip(res["tp2"], res["tp2_modules"],
                                                 res["tp2_static"]):
            assert torch.equal(t, t2) and torch.equal(t, t3)
            torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-6)
            torch.testing.assert_close(lp, lp3, rtol=0, atol=1e-5)
        for layout, ref in (("tp2", "ckpt"), ("pp2_vppNone", "ckpt_pp"), ("pp2_vpp2", "ckpt_pp")):
            for (ref_t, ref_lp), (t, lp), kw in zip(refs[ref], res[layout], GEN_CASES):
                assert torch.equal(t, ref_t), (layout, kw)
                torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
        expected = torch.cat([torch.arange(2, dtype=torch.float), torch.arange(5) + 10.0])
        assert torch.equal(res["gathered"], expected[:, None].expand(-1, 3))


def _generate_py(cwd, *overrides, device="cpu"):
    path = os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                                     else []))
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return run(GENERATE, f"device={device}", *overrides, cwd=cwd, env=env, timeout=300)


def test_generate_py_end_to_end(checkpoint, tmp_path):
    """`python generate.py` with no load and no prompts: checkpoints/default under the launch
    dir, held-out arithmetic prompts; JSONL tokens/logprobs equal the Python API's."""
    from framework.data.embedded import heldout_problems
    from framework.generation import generate
    from framework.tokenizer import embedded_tokenizer
    from framework.checkpoint import load_checkpoint

    (tmp_path / "checkpoints").mkdir()
    os.symlink(checkpoint, tmp_path / "checkpoints" / "default")
    opts = dict(max_new_tokens=6, num_beams=3, length_penalty=0.8)
    r = _generate_py(tmp_path, "num_heldout=5", "return_logprobs=true", "output_file=out.jsonl",
                     *[f"{k}={v}" for k, v in opts.items()])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "held-out arithmetic accuracy: " in r.stdout and "/5 = " in r.stdout
    recs = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    problems = heldout_problems(5)
    assert [(x["prompt"], x["answer"]) for x in recs] == problems
    tok = embedded_tokenizer()
    model = build(ModelConfig(**TINY), 24, seed=99)
    load_checkpoint(str(checkpoint), model, None, None, model_cfg=ModelConfig(**TINY),
                    with_optimizer=False)
    ids = [tok.encode(p) for p, _ in problems]
    eos = tok.encode("\n")[0]  # a data=embedded checkpoint's completions end with their line
    tokens, logprobs = generate(model, ids, eos_id=eos, vocab_size=19, return_logprobs=True,
                                **opts)
    s = max(map(len, ids))
    for i, x in enumerate(recs):
        assert set(x) == {"prompt", "completion", "tokens", "logprobs", "answer"}
        ref = tokens[i, s:].tolist()
        ref = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert x["tokens"] == ref and x["logprobs"] == pytest.approx(
            logprobs[i, :len(ref)].tolist(), abs=1e-5)
        assert x["completion"] == tok.decode([t for t in x["tokens"] if t != eos],
                                             skip_special_tokens=True)
    # bad input: one line on stderr, exit code 2, before any model work
    r = _generate_py(tmp_path, "num_beams=2", "top_k=3")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: "), r.stderr[-3000:]
    assert "cannot be combined with sampling" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_prepare_job_checks_prompts(checkpoint):
    """Checks made against the checkpoint before launch (tokenizer and context known)."""
    from framework.inference import GenerateConfig, prepare_job

    job = prepare_job(GenerateConfig(load=str(checkpoint), prompts=["12+3=", "7*8="],
                                     add_bos=True, max_new_tokens=64))
    assert job.prompt_ids[0] == [0, 4, 5, 13, 6, 16] and job.vocab_size == 19
    assert job.padded_vocab == 24 and job.max_new_tokens == 32 - 6 + 1  # capped by the context
    assert job.parallel.tensor_model_parallel_size == 1 and job.answers is None
    with pytest.raises(ConfigError, match="prompt 1 is 40 tokens long but the model's context "
                                          "is 32"):
        prepare_job(GenerateConfig(load=str(checkpoint), prompts=["1+1=", "1+" * 20]))
    with pytest.raises(ConfigError, match="prompt 0 .* has no tokens"):
        prepare_job(GenerateConfig(load=str(checkpoint), prompts=[""]))
    with pytest.raises(ConfigError, match="no committed checkpoint"):
        prepare_job(GenerateConfig(load=str(checkpoint.parent / "nothing"), prompts=["1"]))
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=2 needs GPUs for a model "
                                          "with tied embeddings"):
        prepare_job(GenerateConfig(load=str(checkpoint), prompts=["1"], device="cpu",
                                   parallel=ParallelConfig(pipeline_model_parallel_size=2)))
    job = prepare_job(GenerateConfig(load=f"{checkpoint}_pp", prompts=["1"], device="cpu",
                                     parallel=ParallelConfig(pipeline_model_parallel_size=2)))
    assert job.parallel.pipeline_model_parallel_size == 2  # untied embeddings: PP runs on CPU


# --------------------------------------------------------------------------------------------
# benchmarks/generation.py (smoke test on CPU, tiny dimensions)
# --------------------------------------------------------------------------------------------
def test_generation_benchmark_tiny_cpu():
    """The throughput benchmark runs end to end (ours with and without cache, HF) and prints a
    table row per candidate and batch size."""
    r = run(os.path.join(ROOT, "benchmarks", "generation.py"), "--tiny", "--batches", "1,2",
            "--max-new-tokens", "4", "--prompt-len", "8", "--iters", "1", timeout=300,
            cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| candidate")]
    got = {(row[0], row[1]) for row in rows}
    assert got == {("HF GPT2LMHeadModel.generate (KV cache)", "1"),
                   ("HF GPT2LMHeadModel.generate (KV cache)", "2"),
                   ("ours, KV cache, lean eager decode steps", "1"),
                   ("ours, KV cache, lean eager decode steps", "2"),
                   ("ours, KV cache, megatron-core modules every step (lean_decode=False)", "1"),
                   ("ours, KV cache, megatron-core modules every step (lean_decode=False)", "2"),
                   ("ours, no KV cache (use_cache=False)", "1")}, r.stdout
    assert all(float(row[2]) > 0 and row[5].endswith("x") for row in rows), r.stdout
    assert "# CPU  torch" in r.stdout
