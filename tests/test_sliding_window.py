"""Sliding-window attention (model.sliding_window / model.sliding_window_layers), on CPU.

Every HF reference is a random tiny model with all parameters perturbed (tests/perturb.py), with
windows far shorter than the sequences, so the window decides the logits:
* mistral_w: Mistral, sliding_window 4 on every layer;
* qwen2_w: Qwen2, 3 layers, use_sliding_window with max_window_layers 1 (layers 1 and 2 windowed,
  layer 0 full), sliding_window 3, q/k/v biases;
* qwen3_types: Qwen3, 3 layers, HF 5's `layer_types` windowing layers 0 and 2 (not a suffix),
  sliding_window 5, q/k norms.
Checked: the import records the window; our logits equal HF's, and differ without the window (so
the check can fail); teacher-forced decode logits of a left-padded batch equal HF's on every path
(lean, the static CUDA-graph step run eagerly, megatron-core's modules, no cache); greedy and
4-beam tokens equal HF `generate`; export writes the window back (HF reloads it to the same
logits) or refuses what the HF family cannot express; a checkpoint or HF model whose window
differs from the config is refused in one line; bad settings are one-line errors. Training: a
windowed run at TP2 over gloo gives TP1's losses.
"""
from __future__ import annotations

import json

import pytest
import torch

from framework.config import ModelConfig, ParallelConfig
from helpers import checkpoint_model_cfg, gpt_logits, run_train
from perturb import assert_perturbed, perturb_
from test_lean_decode_rope import PATHS
from test_llama import PROMPTS, _hf_generate, _padded, _tp1_logits, cli, make_tokenizer

CPU = torch.device("cpu")
TOL = 1e-4
NEW = 12
KINDS = ["mistral_w", "qwen2_w", "qwen3_types"]
WINDOWS = {"mistral_w": (4, None), "qwen2_w": (3, [1, 2]), "qwen3_types": (5, [0, 2])}


def hf_config(kind, vocab):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, max_position_embeddings=128, initializer_range=0.1,
                  hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=72, rms_norm_eps=1e-6, rope_theta=1000000.0)
    if kind == "mistral_w":
        return MistralConfig(**common, num_hidden_layers=2, sliding_window=4,
                             tie_word_embeddings=False)
    if kind == "qwen2_w":
        return Qwen2Config(**common, num_hidden_layers=3, use_sliding_window=True,
                           sliding_window=3, max_window_layers=1, tie_word_embeddings=True)
    return Qwen3Config(**common, num_hidden_layers=3, head_dim=16, use_sliding_window=True,
                       sliding_window=5, tie_word_embeddings=False,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.fixture(scope="module")
def work(tmp_path_factory, mp1):
    from transformers import AutoModelForCausalLM

    from framework.config import TokenizerConfig
    from framework.inference import load_for_inference
    from framework.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("window")
    out = {"dir": d}
    for seed, kind in enumerate(KINDS):
        hf_dir = d / kind / "hf"
        vocab = make_tokenizer(str(hf_dir), "llama3" if kind == "mistral_w" else "qwen2")
        torch.manual_seed(40 + seed)
        model = AutoModelForCausalLM.from_config(hf_config(kind, vocab)).eval()
        perturb_(model, seed=40 + seed)
        assert_perturbed(model)
        model.save_pretrained(hf_dir)
        cli("hf-to-megatron", "--load", hf_dir, "--save", d / kind / "tp1")
        model_cfg, _meta = checkpoint_model_cfg(d / kind / "tp1")
        ours = load_for_inference(str(d / kind / "tp1"), model_cfg, ParallelConfig(),
                                  padded_vocab=_padded(vocab, 1), device=CPU, bf16=False)
        tok = build_tokenizer(TokenizerConfig(path=str(d / kind / "tp1" / "iter_0000000" /
                                                        "tokenizer")))
        out[kind] = dict(hf=model, vocab=vocab, tok=tok, ours=ours, cfg=model_cfg,
                         ids=[tok.encode(p) for p in PROMPTS])
    return out


def test_import_records_the_window(work):
    for kind in KINDS:
        cfg = work[kind]["cfg"]
        window, layers = WINDOWS[kind]
        assert (cfg.sliding_window, cfg.sliding_window_layers) == (window, layers), kind
        assert cfg.seq_length == 128, kind  # no longer capped at the window
        windows = [m.window for m in work[kind]["ours"][0].modules() if hasattr(m, "window")]
        assert windows == [cfg.windowed(i) for i in range(cfg.num_layers)], (kind, windows)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_and_differ_without_the_window(work, kind):
    w = work[kind]
    tokens = torch.randint(0, w["vocab"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = w["hf"](tokens).logits
    got = _tp1_logits(work["dir"] / kind / "tp1", tokens, w["vocab"])
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, diff
    # the same model with every window off (a checkpoint load with another window is refused)
    attn = [m for m in w["ours"][0].modules() if getattr(m, "window", None)]
    assert attn
    try:
        for m in attn:
            m.window = None
        full = gpt_logits(w["ours"][0], tokens, w["vocab"])
    finally:
        for m in attn:
            m.window = WINDOWS[kind][0]
    assert (full - ref).abs().max().item() > 1e-2
    assert (gpt_logits(w["ours"][0], tokens, w["vocab"]) - ref).abs().max().item() <= TOL
    # inside the window the window changes nothing: the first `window` positions agree
    window = WINDOWS[kind][0]
    assert (full[:, :window] - ref[:, :window]).abs().max().item() <= TOL


def _hf_forced_logits(hf, prompts, forced, pad):
    """HF's next-token logits [rows, steps, vocab] after each prefix prompt + forced[:, :t], from
    one forward over the whole left-padded sequence (HF masks pads and the window by cache
    index, as ours does)."""
    s = max(map(len, prompts))
    ids = torch.full((len(prompts), s), pad)
    mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    ids = torch.cat([ids, forced], 1)
    mask = torch.cat([mask, torch.ones_like(forced)], 1)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    return logits[:, s - 1:s - 1 + forced.shape[1]]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", KINDS)
def test_forced_decode_logits_match_hf_on_every_path(work, kind, path):
    from framework.generation import _Decoder, _prepare_batch, generation_mode

    w = work[kind]
    forced = torch.randint(0, w["vocab"], (len(w["ids"]), NEW),
                           generator=torch.Generator().manual_seed(5))
    ref = _hf_forced_logits(w["hf"], w["ids"], forced, w["tok"].pad)
    tokens, real = _prepare_batch(w["ids"], None, w["tok"].pad, CPU)
    assert tokens.shape[1] + NEW > 2 * WINDOWS[kind][0]  # decoding runs past the window
    out = []
    kw = dict(use_cache=PATHS[path].get("use_cache", True),
              lean=PATHS[path].get("lean_decode", True),
              static=PATHS[path].get("decode_cuda_graph", False))
    with generation_mode(w["ours"]):
        dec = _Decoder(w["ours"], tokens, real, max_len=tokens.shape[1] + NEW, **kw)
        assert (dec.static is not None) == (path == "static")
        for t in range(NEW):
            out.append(dec.logits()[:, :w["vocab"]])
            dec.advance(forced[:, t])
    got = torch.stack(out, 1)
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, (path, diff)


@pytest.mark.parametrize("case", ["greedy", "beam4"])
@pytest.mark.parametrize("kind", ["mistral_w", "qwen2_w"])
def test_generate_equals_hf(work, kind, case):
    from framework.generation import generate

    w = work[kind]
    opts = dict(num_beams=4, length_penalty=1.3, early_stopping=True) if case == "beam4" else {}
    ref = _hf_generate(w["hf"], w["tok"], PROMPTS, **opts)
    tok = w["tok"]
    out = generate(w["ours"], w["ids"], eos_id=tok.eod, pad_id=tok.pad, vocab_size=w["vocab"],
                   max_new_tokens=8, **opts)
    s = max(map(len, w["ids"]))
    rows = [r[:r.index(tok.eod) + 1] if tok.eod in r else r for r in out[:, s:].tolist()]
    assert rows == ref


@pytest.mark.parametrize("kind", ["mistral_w", "qwen2_w"])
def test_export_writes_the_window_back(work, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    w = work[kind]
    cli("megatron-to-hf", "--load", work["dir"] / kind / "tp1", "--save", tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    window, layers = WINDOWS[kind]
    assert hf_cfg["sliding_window"] == window
    if kind == "qwen2_w":
        assert hf_cfg["use_sliding_window"] is True and hf_cfg["max_window_layers"] == 1
        assert hf_cfg["layer_types"] == ["full_attention", "sliding_attention",
                                         "sliding_attention"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, w["vocab"], (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, w["hf"](tokens).logits)


def test_export_refuses_what_the_family_cannot_express(work, tmp_path):
    from framework import interop
    from framework.errors import InteropError

    r = cli_rc("megatron-to-hf", "--load", work["dir"] / "qwen3_types" / "tp1",
               "--save", tmp_path / "hf")
    assert r != 0
    assert not (tmp_path / "hf" / "config.json").exists()
    llama = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=2,
                        normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                        position_embedding_type="rope", sliding_window=8)
    # a windowed Llama shape exports as Mistral by shape; as llama it is refused
    assert interop.family_for_model(llama).HF_MODEL_TYPE == "mistral"
    with pytest.raises(InteropError, match="model.sliding_window=8 .Llama has no sliding window"):
        interop.model_config_to_hf_config(llama, vocab_size=64, hf_model_type="llama")
    some = ModelConfig(**{**llama.__dict__, "sliding_window_layers": [1]})
    with pytest.raises(InteropError, match="Mistral windows every layer"):
        interop.model_config_to_hf_config(some, vocab_size=64)
    with pytest.raises(InteropError, match="GPT-2 has no sliding window"):
        interop.model_config_to_hf_config(ModelConfig(sliding_window=8), vocab_size=64)


def test_export_without_a_recorded_source(tmp_path):
    """Models trained from a config (no HF source): the exported config.json loads into HF's
    windowing; a Llama import exported as Mistral stays unwindowed (MistralConfig's default
    window would otherwise apply)."""
    from transformers import AutoConfig

    from framework import interop

    base = dict(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=2,
                normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                position_embedding_type="rope")
    cases = [
        (dict(sliding_window=6), "mistral", 6, ["sliding_attention"] * 3),
        (dict(add_qkv_bias=True, sliding_window=5, sliding_window_layers=[1, 2]), "qwen2", 5,
         ["full_attention", "sliding_attention", "sliding_attention"]),
        (dict(qk_layernorm=True, kv_channels=16, sliding_window=7), "qwen3", 7,
         ["sliding_attention"] * 3),
        (dict(add_qkv_bias=True), "qwen2", None, ["full_attention"] * 3),
    ]
    for extra, hf_type, window, types in cases:
        cfg = ModelConfig(**{**base, **extra})
        assert interop.family_for_model(cfg).HF_MODEL_TYPE == hf_type
        hf = AutoConfig.for_model(**interop.model_config_to_hf_config(cfg, vocab_size=64))
        assert hf.sliding_window == window, (hf_type, extra)
        if hf_type != "mistral":
            assert hf.layer_types == types, (hf_type, hf.layer_types)
        back = interop.hf_config_to_model_config(hf.to_dict())
        assert (back.sliding_window, back.sliding_window_layers) == (
            cfg.sliding_window, cfg.sliding_window_layers), hf_type
    llama = ModelConfig(**base)
    llama_src = interop.model_config_to_hf_config(llama, vocab_size=64)
    as_mistral = interop.model_config_to_hf_config(llama, vocab_size=64, base=llama_src,
                                                   hf_model_type="mistral")
    assert AutoConfig.for_model(**as_mistral).sliding_window is None


def test_import_reads_windows_as_hf_does():
    from framework import interop
    from framework.errors import InteropError

    common = dict(vocab_size=64, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=72, num_hidden_layers=3, max_position_embeddings=128,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    # Mistral without the key: MistralConfig's 4096
    cfg = interop.hf_config_to_model_config(dict(common, model_type="mistral"))
    assert (cfg.sliding_window, cfg.sliding_window_layers) == (4096, None)
    cfg = interop.hf_config_to_model_config(dict(common, model_type="mistral",
                                                 sliding_window=None))
    assert cfg.sliding_window is None
    # Qwen2: the window only with use_sliding_window; max_window_layers defaults to 28
    qwen = dict(common, model_type="qwen2", sliding_window=8)
    assert interop.hf_config_to_model_config(qwen).sliding_window is None
    cfg = interop.hf_config_to_model_config(dict(qwen, use_sliding_window=True,
                                                 max_window_layers=2))
    assert (cfg.sliding_window, cfg.sliding_window_layers) == (8, [2])
    assert interop.hf_config_to_model_config(dict(qwen, use_sliding_window=True)
                                             ).sliding_window is None
    with pytest.raises(InteropError, match="layer_types marks sliding_attention layers but "
                                           "use_sliding_window is false"):
        interop.hf_config_to_model_config(dict(qwen, layer_types=["sliding_attention"] * 3))
    with pytest.raises(InteropError, match="sliding_window=0 must be positive"):
        interop.hf_config_to_model_config(dict(common, model_type="mistral", sliding_window=0))
    # every layer listed is the same model as null (one spelling: no false refusals)
    assert ModelConfig(sliding_window=4, sliding_window_layers=[1, 0]).sliding_window_layers \
        is None


def _pp_worker(rank, port, out):
    from framework.models.build import build_model
    from helpers import gloo_rank

    with gloo_rank(rank, port):
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(pipeline_model_parallel_size=2,
                                     virtual_pipeline_model_parallel_size=2)
        cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                          sliding_window=4, sliding_window_layers=[1, 2],
                          share_embeddings_and_output_weights=False)  # tied: mcore .cuda()
        par = ParallelConfig(pipeline_model_parallel_size=2,
                             virtual_pipeline_model_parallel_size=2)
        chunks = build_model(cfg, par, vocab_size=64, bf16=False, fp16=False, device=CPU,
                             wrap_ddp=False)
        windows = [[m.window for m in c.modules() if hasattr(m, "window")] for c in chunks]
        torch.save(windows, f"{out}/rank{rank}.pt")
        ps.destroy_model_parallel()


def test_window_layers_are_global_under_virtual_pipeline(tmp_path):
    """PP2 x VPP2 over 4 layers: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3; the
    window lands on the global layers 1 and 2."""
    from helpers import free_port, spawn

    spawn(_pp_worker, (free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "rank0.pt") == [[None], [4]]
    assert torch.load(tmp_path / "rank1.pt") == [[4], [None]]


def cli_rc(*argv):
    from data_tools import convert

    return convert.main([str(a) for a in argv])


def test_a_different_window_is_refused_in_one_line(work):
    from dataclasses import replace

    from framework import interop
    from framework.checkpoint import read_meta
    from framework.checkpoint.state import check_compatible
    from framework.errors import ConfigError, InteropError

    cfg = work["mistral_w"]["cfg"]
    meta = read_meta(str(work["dir"] / "mistral_w" / "tp1"), 0)
    check_compatible(meta, cfg, "ckpt")
    with pytest.raises(ConfigError, match=r"model.sliding_window: checkpoint=4 config=None"):
        check_compatible(meta, replace(cfg, sliding_window=None), "ckpt")
    with pytest.raises(ConfigError, match=r"model.sliding_window: checkpoint=4 config=8"):
        check_compatible(meta, replace(cfg, sliding_window=8), "ckpt")
    qcfg = work["qwen2_w"]["cfg"]
    with pytest.raises(InteropError, match=r"model.sliding_window_layers: hf=\[1, 2\] "
                                           r"config=\[2\]"):
        interop.check_hf_source(str(work["dir"] / "qwen2_w" / "hf"),
                                replace(qcfg, sliding_window_layers=[2]))
    # a checkpoint written before the fields existed: without a recorded HF source it had no
    # window; an import (which capped seq_length at the window) gets it from its source
    from framework.checkpoint import stored_model_config

    old = json.loads(json.dumps(meta))
    for f in ("sliding_window", "sliding_window_layers"):
        old["config"]["model"].pop(f)
    assert stored_model_config(old).sliding_window == 4
    check_compatible(old, cfg, "old import")
    with pytest.raises(ConfigError, match=r"model.sliding_window: checkpoint=4 config=None"):
        check_compatible(old, replace(cfg, sliding_window=None), "old import")
    old.pop("hf_source")
    assert stored_model_config(old).sliding_window is None
    check_compatible(old, replace(cfg, sliding_window=None), "old ckpt")


@pytest.mark.parametrize("overrides,message", [
    (dict(sliding_window=0), "model.sliding_window=0 must be a positive number of tokens"),
    (dict(sliding_window=True), "model.sliding_window=True must be a positive number"),
    (dict(sliding_window_layers=[0]), r"model.sliding_window_layers=\[0\] needs "
                                      r"model.sliding_window"),
    (dict(sliding_window=4, sliding_window_layers=[0, 2]),
     r"model.sliding_window_layers: \[2\] are not layer indices in \[0, 2\)"),
    (dict(sliding_window=4, sliding_window_layers=[1, 1]), "repeats a layer"),
    (dict(sliding_window=4, attention_backend="local"),
     "model.sliding_window=4 needs model.attention_backend=sdpa"),
    (dict(sliding_window=4, position_embedding_type="alibi"),
     "cannot run with model.position_embedding_type=alibi"),
    (dict(sliding_window=4, type="bert"), r"model.sliding_window=4 is a GPT option"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_cudnn_attention_with_every_layer_windowed_is_refused():
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="model.cudnn_attention=true has no effect with "
                                          "model.sliding_window=4 on every layer"):
        ModelConfig(sliding_window=4, cudnn_attention=True).check_settings_used()
    ModelConfig(sliding_window=4, sliding_window_layers=[1],
                cudnn_attention=True).check_settings_used()


def test_windowed_training_tp2_matches_tp1(tmp_path):
    """gpt_tiny (seq 64) with an 8-token window, from one perturbed seed checkpoint, at TP1 and
    TP2 over gloo. The same weights without the window (a seed saved without it: the window
    adds no parameters, so both seeds hold the same tensors) give other losses; the windowed
    seed loaded without the window is refused in one line."""
    from perturb import perturb_checkpoint

    seeds = {}
    # a larger init than gpt_tiny's 0.02: attention far from uniform, so the window shows
    for name, extra in (("seed", ["model.sliding_window=8"]), ("seed_full", [])):
        run_train(*extra, "model.init_method_std=0.3", "train.max_steps=0",
                  f"checkpoint.dir={tmp_path}/{name}", cwd=tmp_path, name=name)
        perturb_checkpoint(str(tmp_path / name))
        seeds[name] = f"checkpoint.load={tmp_path}/{name}"
    window = ["model.sliding_window=8", "train.eval_interval=0", "checkpoint.save=false",
              "train.max_steps=4", seeds["seed"]]
    a = run_train(*window, cwd=tmp_path, name="tp1").losses
    b = run_train(*window, "parallel=tp2", cwd=tmp_path, name="tp2").losses
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])
    full = run_train("train.eval_interval=0", "checkpoint.save=false", "train.max_steps=1",
                     seeds["seed_full"], cwd=tmp_path, name="full").losses
    print(f"\nstep-1 loss: window 8 {a[1]:.6f}, full attention {full[1]:.6f}")
    assert abs(full[1] - a[1]) > 1e-3, (full[1], a[1])
    r = run_train("train.max_steps=1", seeds["seed"], cwd=tmp_path, name="nowindow",
                  expect=None)
    assert r.returncode != 0
    assert "model.sliding_window: checkpoint=8 config=None" in r.stderr


# --------------------------------------------------------------------------------------------
# the core attention's cases against a float64 reference (also run on CUDA by
# tests/test_gpu_attention.py)
# --------------------------------------------------------------------------------------------
def windowed_reference(q, k, v, window, pad=None):
    """float64 attention [sq, b, n*d] of q [sq, b, n, d] over k/v [sk, b, g, d]: queries are the
    last sq keys, each sees keys i - window < j <= i that are not pads (pad [b, sk], True = pad).
    """
    sq, b, n, d = q.shape
    sk, g = k.shape[0], k.shape[2]
    qq, kk, vv = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    kk, vv = (t.repeat_interleave(n // g, dim=1) for t in (kk, vv))
    scores = qq @ kk.transpose(-1, -2) / d ** 0.5
    i = torch.arange(sk - sq, sk, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    keep = ((j <= i) & (j > i - window))[None, None]
    if pad is not None:
        keep = keep & ~pad[:, None, None, :]
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vv
    return out.permute(2, 0, 1, 3).reshape(sq, b, n * d)


def windowed_attention(window, heads, groups, window_layers=None):
    from megatron.core.transformer.enums import AttnMaskType

    from framework.models.layers import SDPAttention
    from framework.models.transformer import transformer_config

    cfg = ModelConfig(num_layers=2, hidden_size=heads * 16, num_attention_heads=heads,
                      num_query_groups=groups, hidden_dropout=0.0, attention_dropout=0.0,
                      sliding_window=window, sliding_window_layers=window_layers)
    tcfg = transformer_config(cfg, ParallelConfig(), bf16=False, fp16=False, on_gpu=False)
    return SDPAttention(tcfg, 1, AttnMaskType.causal, "self", window_of=cfg.windowed)


def test_core_attention_cases_match_the_reference(mp1):
    """Training (sq = sk), a multi-token chunk over a KV cache (sq < sk), one decode query with a
    padding mask and no mask type (the lean step), the static step's own mask
    (window_in_mask), and a window wider than the keys (the plain causal kernel); GQA."""
    from megatron.core.transformer.enums import AttnMaskType

    g = torch.Generator().manual_seed(0)
    att = windowed_attention(5, 4, 2)
    q = torch.randn(40, 2, 4, 16, generator=g)
    k, v = (torch.randn(40, 2, 2, 16, generator=g) for _ in range(2))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, :3] = True  # row 1 is left-padded

    def check(out, ref):
        assert (out.double() - ref).abs().max().item() < 1e-5

    check(att(q, k, v, None), windowed_reference(q, k, v, 5))
    check(att(q[-7:], k, v, None), windowed_reference(q[-7:], k, v, 5))
    mask = pad[:, None, None, :]
    check(att(q[-1:], k, v, mask, attn_mask_type=AttnMaskType.no_mask),
          windowed_reference(q[-1:], k, v, 5, pad))
    # the static step: its query written at 30 of a 40-key buffer, keys after it unwritten
    gone = (torch.arange(40) <= 30 - 5) | (torch.arange(40) > 30)
    out = att(q[30:31], k, v, mask | gone, attn_mask_type=AttnMaskType.no_mask,
              window_in_mask=True)
    check(out, windowed_reference(q[30:31], k[:31], v[:31], 5, pad[:, :31]))
    wide = windowed_attention(64, 4, 2)
    check(wide(q, k, v, None), windowed_reference(q, k, v, 64))
    # another layer than the windowed ones attends in full
    assert windowed_attention(5, 4, 2, window_layers=[1]).window is None
    assert windowed_attention(5, 4, 2, window_layers=[0]).window == 5
