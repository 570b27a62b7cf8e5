"""Llama-family decoders (HF llama, qwen2, qwen3, mistral) <-> our GPT model, on CPU (fp32, gloo).

Every HF reference is a random tiny model with ALL parameters perturbed (tests/perturb.py: q/k/v
biases N(0, 0.3), norm weights 1 + N(0, 0.1), 5% jitter on the rest), so a dropped bias or norm
weight, a swapped gate/up or a mis-ordered q/k/v shows:
* `hf-to-megatron` then our forward: logits equal HF's within fp32 rounding (TOL), for
  - llama_odd: 5 query heads in 1 KV group (MQA), head_dim 16 != hidden/heads, rope_theta 50000,
    Llama-3 RoPE scaling with non-default low/high/original factors, untied embeddings;
  - llama_tied: 6 heads in 2 groups, rope_theta 500000, Llama-3 scaling (factor 8), tied;
  - qwen2: 6 heads in 2 groups, q/k/v biases, rope_theta 1e6, tied;
  - qwen3: 6 heads in 2 groups of head_dim 16 != hidden/heads, per-head q/k RMSNorm
    (model.qk_layernorm; its weights perturbed like every norm), no biases, untied;
  - mistral: 4 heads in 2 groups, sliding_window 4096 (longer than any sequence here), untied.
  Without the RoPE scaling the llama logits differ (the check can fail).
* import -> export: every tensor bit-identical, sharded with model.safetensors.index.json, the
  tokenizer files (tokenizer.json, tokenizer_config.json with its chat template) byte-identical.
* TP2 and PP2 over gloo (two processes): logits equal HF's, and the checkpoints saved at TP2 and
  PP2 export bit-identical to the HF files. TP2 x PP2 together needs four processes and is not
  run here (2 CI cores); megatron-core's pipeline schedules are CUDA-only, so PP2 runs the two
  stages by hand with send/recv, as tests/test_convert.py does.
* `generate.py` greedy and 4-beam on the imported checkpoints equal HF `generate`.
* `train.py checkpoint.load_hf=<HF dir>` with model=llama_tiny: 50 steps on data preprocessed
  with a Llama-3-style tokenizer (saved offline as tokenizer.json); the loss falls.
The tokenizers are byte-level BPEs trained here with the `tokenizers` library (no hub).
"""
from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

from data_tools import convert
from helpers import (GENERATE, assert_same_hf, assert_same_tensors, build_cpu,
                     checkpoint_model_cfg, free_port, gather_vocab, gloo_rank, gpt_logits,
                     left_padded, losses, pipeline2_forward, run, run_train, spawn, tp1_output)
from perturb import assert_perturbed, perturb_

TOL = 1e-4
DIV = 5  # vocab padded to a multiple of lcm(5, TP): padding differs between TP1 and TP2
PROMPTS = ["the cat sat", "one two three four", "hello world, hello", "a"]
NEW = 8

# --------------------------------------------------------------------------------------------
# offline tokenizers: Llama-3 style (BOS <|begin_of_text|>, EOS <|end_of_text|>) and Qwen2 style
# (no BOS, EOS = PAD = <|endoftext|>); tiktoken-like regex pre-tokenizers, byte-level BPE
# --------------------------------------------------------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
               r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
QWEN2_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% endif %}")
WORDS = ("the cat sat on a mat one two three four five hello world dog ran far away big small "
         "red blue green tree house river stone light dark").split()


def corpus(n=400, seed=0):
    """Documents with structure a tiny model learns in 50 steps (counting, repetition)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        start = int(torch.randint(0, len(WORDS), (1,), generator=g))
        docs.append(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(k)) + ".")
    return docs


def make_tokenizer(path, style):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if style == "llama3":  # special tokens after the BPE vocabulary, as in the real ones
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]
        kw = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        chat = LLAMA3_CHAT
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        kw = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        chat = QWEN2_CHAT
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials, **kw)
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    # the hub layout: the chat template inside tokenizer_config.json
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = chat
    cfg["model_max_length"] = 131072
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(path, extra)):
            os.remove(os.path.join(path, extra))
    return len(hf)


# --------------------------------------------------------------------------------------------
# HF references
# --------------------------------------------------------------------------------------------
def hf_config(kind, vocab):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=128,
                  initializer_range=0.1)
    if kind == "llama_odd":
        return LlamaConfig(**common, hidden_size=60, num_attention_heads=5, num_key_value_heads=1,
                           head_dim=16, intermediate_size=88, rms_norm_eps=1e-5,
                           rope_theta=50000.0, tie_word_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 3.0,
                                         "original_max_position_embeddings": 16})
    if kind == "llama_tied":
        return LlamaConfig(**common, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=80, rms_norm_eps=1e-6, rope_theta=500000.0,
                           tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32})
    if kind == "qwen2":
        return Qwen2Config(**common, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=72, rms_norm_eps=1e-6, rope_theta=1000000.0,
                           tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**common, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                           head_dim=16, intermediate_size=72, rms_norm_eps=1e-6,
                           rope_theta=1000000.0, tie_word_embeddings=False)
    if kind == "mistral":
        return MistralConfig(**common, hidden_size=32, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=56,
                             rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=4096,
                             tie_word_embeddings=False)
    raise KeyError(kind)


KINDS = ["llama_odd", "llama_tied", "qwen2", "qwen3", "mistral"]
TOKENIZER = {"llama_odd": "llama3", "llama_tied": "llama3", "qwen2": "qwen2", "qwen3": "qwen2",
             "mistral": "llama3"}


def make_hf(path, kind, seed):
    from transformers import AutoModelForCausalLM

    vocab = make_tokenizer(path, TOKENIZER[kind])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, vocab)).eval()
    perturb_(model, seed=seed)
    assert_perturbed(model)
    model.save_pretrained(path)
    return model, vocab


def cli(*argv):
    rc = convert.main([str(a) for a in argv])
    assert rc == 0, f"convert {' '.join(map(str, argv))} exited {rc}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    out = {"dir": d, "models": {}, "vocab": {}, "tokens": {}, "logits": {}}
    for seed, kind in enumerate(KINDS):
        model, vocab = make_hf(str(d / kind / "hf"), kind, seed + 1)
        tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(tokens).logits
        torch.save({"tokens": tokens, "logits": logits}, d / kind / "ref.pt")
        cli("hf-to-megatron", "--load", d / kind / "hf", "--save", d / kind / "tp1",
            "--make-vocab-size-divisible-by", DIV)
        out["models"][kind], out["vocab"][kind] = model, vocab
        out["tokens"][kind], out["logits"][kind] = tokens, logits
    return out


# --------------------------------------------------------------------------------------------
# helpers: our model on CPU
# --------------------------------------------------------------------------------------------
def _padded(vocab, tp):
    from framework.models.build import padded_vocab_size

    return padded_vocab_size(vocab, DIV, tp)


def _tp1_logits(ckpt_dir, tokens, vocab, **cfg_changes):
    return tp1_output(ckpt_dir, _padded(vocab, 1),
                      lambda chunk: gpt_logits(chunk, tokens, vocab), **cfg_changes)


CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
               "rope_parameters", "sliding_window", "bos_token_id", "eos_token_id")


def _assert_same_hf(a, b):
    assert_same_hf(a, b, CONFIG_KEYS)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


# --------------------------------------------------------------------------------------------
# parity, TP1
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(work, kind):
    got = _tp1_logits(work["dir"] / kind / "tp1", work["tokens"][kind], work["vocab"][kind])
    diff = (got - work["logits"][kind]).abs().max().item()
    print(f"\n{kind}: max abs logit diff vs HF {diff:.3g}")
    assert diff <= TOL, diff
    model_cfg, meta = checkpoint_model_cfg(work["dir"] / kind / "tp1")
    assert meta["hf_source"]["model_type"] == kind.split("_")[0]
    assert model_cfg.normalization == "RMSNorm" and model_cfg.activation == "swiglu"
    assert model_cfg.add_qkv_bias == (kind == "qwen2")
    assert model_cfg.qk_layernorm == (kind == "qwen3")
    assert model_cfg.rope_scaling == kind.startswith("llama")


def test_rope_scaling_changes_the_logits(work):
    """Without the Llama-3 frequency scaling our logits are off: the parity above tests it."""
    kind = "llama_odd"
    got = _tp1_logits(work["dir"] / kind / "tp1", work["tokens"][kind], work["vocab"][kind],
                      rope_scaling=False)
    assert (got - work["logits"][kind]).abs().max().item() > 1e-2


@pytest.mark.parametrize("factor,low,high,orig,head_dim,theta", [
    (32.0, 1.0, 4.0, 8192, 64, 500000.0),   # Llama 3.2
    (8.0, 1.0, 4.0, 8192, 128, 500000.0),   # Llama 3.1
    (4.0, 2.0, 3.0, 1024, 32, 10000.0)])    # other parameters than mcore's fixed ones
def test_llama3_frequencies_equal_hf(factor, low, high, orig, head_dim, theta):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from framework.models.gpt.rope_scaling import base_inv_freq, llama3_inv_freq

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                      max_position_embeddings=2 * orig,
                      rope_scaling={"rope_type": "llama3", "factor": factor,
                                    "low_freq_factor": low, "high_freq_factor": high,
                                    "original_max_position_embeddings": orig})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    ours = llama3_inv_freq(base_inv_freq(head_dim, theta), factor=factor, low_freq_factor=low,
                           high_freq_factor=high, original_max_position_embeddings=orig)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base_inv_freq(head_dim, theta))


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_is_bit_identical_sharded_with_tokenizer(work, kind):
    d = work["dir"] / kind
    cli("megatron-to-hf", "--load", d / "tp1", "--save", d / "back", "--max-shard-size", "50KB")
    files = sorted(os.listdir(d / "back"))
    assert "model.safetensors.index.json" in files
    index = json.load(open(d / "back" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_hf(d / "hf", d / "back")
    cfg = json.load(open(d / "back" / "tokenizer_config.json"))
    assert "<|" in cfg["chat_template"]
    if kind == "llama_odd":  # the export loads in transformers and gives HF's logits
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(d / "back").eval()
        with torch.no_grad():
            logits = m(work["tokens"][kind]).logits
        assert torch.equal(logits, work["logits"][kind])


def test_preset_shapes_export_as_the_published_models():
    """Each preset -> HF config -> an HF model on the meta device: the published parameter
    count (the preset's dims, GQA, FFN, vocab and tying are those of the real checkpoint), and
    back to the same architecture."""
    from dataclasses import asdict

    from transformers import AutoConfig, AutoModelForCausalLM

    from framework import interop
    from helpers import load_config

    published = {"llama3_2_1b": ("llama", 1_235_814_400), "llama3_2_3b": ("llama", 3_212_749_824),
                 "llama3_1_8b": ("llama", 8_030_261_248), "qwen2_5_0_5b": ("qwen2", 494_032_768),
                 "qwen2_5_1_5b": ("qwen2", 1_543_714_304),
                 # the model cards' counts (0.6B, 1.7B, 4.0B, 8.2B): their safetensors also
                 # store the tied lm_head (+ vocab x hidden) where the embeddings are tied
                 "qwen3_0_6b": ("qwen3", 596_049_920), "qwen3_1_7b": ("qwen3", 1_720_574_976),
                 "qwen3_4b": ("qwen3", 4_022_468_096), "qwen3_8b": ("qwen3", 8_190_735_360),
                 "mistral_7b": ("mistral", 7_248_023_552)}
    from framework.cli import register_resolvers
    from framework.config import register_configs

    register_configs()
    register_resolvers()
    for name, (hf_type, params) in published.items():
        m = load_config(f"model={name}").model
        hf = interop.model_config_to_hf_config(m, vocab_size=m.vocab_size, hf_model_type=hf_type)
        cfg = AutoConfig.for_model(**hf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == params, (name, n, params)
        back = interop.hf_config_to_model_config(cfg.to_dict())
        assert interop._arch(back) == interop._arch(m), name
        assert asdict(back)["rotary_base"] == m.rotary_base


# --------------------------------------------------------------------------------------------
# TP2 and PP2 (two processes, gloo)
# --------------------------------------------------------------------------------------------
DIST_KINDS = ["llama_tied", "qwen2", "qwen3"]


def _dist_worker(rank, port, d, vocabs):
    from megatron.core import parallel_state as ps

    from framework import interop
    from framework.checkpoint import save_checkpoint

    with gloo_rank(rank, port):
        ps.initialize_model_parallel(2, 1)
        for kind in DIST_KINDS:
            ref = torch.load(os.path.join(d, kind, "ref.pt"))
            model_cfg, meta = checkpoint_model_cfg(os.path.join(d, kind, "tp1"))
            chunks = build_cpu(model_cfg, _padded(vocabs[kind], 2), tp=2)
            interop.load_hf_into_model(os.path.join(d, kind, "hf"), chunks, model_cfg)
            got = gpt_logits(chunks[0], ref["tokens"], vocabs[kind])
            diff = (got - ref["logits"]).abs().max().item()
            assert diff <= TOL, (kind, diff)
            save_checkpoint(os.path.join(d, kind, "true_tp2"), 0, chunks, None, None,
                            consumed_samples=0, config=meta["config"],
                            extra={"hf_source": meta["hf_source"]})
        ps.destroy_model_parallel()
        # PP2: the two stages by hand (mcore's schedules are CUDA-only); the tied embedding's
        # copy on the last stage is set up with an all-reduce of `.cuda()` tensors
        torch.Tensor.cuda = lambda self, *a, **k: self
        ps.initialize_model_parallel(1, 2)
        for kind in DIST_KINDS:
            ref = torch.load(os.path.join(d, kind, "ref.pt"))
            tokens = ref["tokens"]
            model_cfg, meta = checkpoint_model_cfg(os.path.join(d, kind, "tp1"))
            chunks = build_cpu(model_cfg, _padded(vocabs[kind], 1), pp=2)
            interop.load_hf_into_model(os.path.join(d, kind, "hf"), chunks, model_cfg)
            pos = torch.arange(tokens.shape[1]).expand_as(tokens)
            out = pipeline2_forward(chunks[0], rank == 0, 1 - rank,
                                    (tokens.shape[1], tokens.shape[0], model_cfg.hidden_size),
                                    tokens, pos, None)
            if rank == 1:
                diff = (out[..., :vocabs[kind]] - ref["logits"]).abs().max().item()
                assert diff <= TOL, (kind, diff)
            save_checkpoint(os.path.join(d, kind, "true_pp2"), 0, chunks, None, None,
                            consumed_samples=0, config=meta["config"],
                            extra={"hf_source": meta["hf_source"]})


def _tp2pp2_worker(rank, port, d, vocabs):
    """TP2 x PP2 over 4 gloo processes: ranks 0,1 hold stage 0's TP halves, 2,3 stage 1's."""
    from megatron.core import parallel_state as ps

    from framework import interop
    from framework.checkpoint import save_checkpoint

    with gloo_rank(rank, port, world_size=4):
        torch.Tensor.cuda = lambda self, *a, **k: self  # the tied-embedding all-reduce on CPU
        ps.initialize_model_parallel(2, 2)
        stage = ps.get_pipeline_model_parallel_rank()
        for kind in DIST_KINDS:
            ref = torch.load(os.path.join(d, kind, "ref.pt"))
            tokens = ref["tokens"]
            model_cfg, meta = checkpoint_model_cfg(os.path.join(d, kind, "tp1"))
            chunks = build_cpu(model_cfg, _padded(vocabs[kind], 2), tp=2, pp=2)
            interop.load_hf_into_model(os.path.join(d, kind, "hf"), chunks, model_cfg)
            pos = torch.arange(tokens.shape[1]).expand_as(tokens)
            # stage 0 sends the full hidden state (no sequence parallel) to its TP peer in stage 1
            out = pipeline2_forward(chunks[0], stage == 0, rank + 2 if stage == 0 else rank - 2,
                                    (tokens.shape[1], tokens.shape[0], model_cfg.hidden_size),
                                    tokens, pos, None)
            if stage == 1:
                assert ps.get_tensor_model_parallel_world_size() == 2
                got = gather_vocab(out, vocabs[kind])
                diff = (got - ref["logits"]).abs().max().item()
                assert diff <= TOL, (kind, diff)
            save_checkpoint(os.path.join(d, kind, "true_tp2pp2"), 0, chunks, None, None,
                            consumed_samples=0, config=meta["config"],
                            extra={"hf_source": meta["hf_source"]})


@pytest.mark.slow
def test_tp2_pp2_together_match_hf_and_export_bit_identical(work):
    """Four processes: HF weights loaded straight into a TP2 x PP2 model give HF's logits, and
    the checkpoint it saves exports bit-identical to the HF files."""
    spawn(_tp2pp2_worker, (free_port(), str(work["dir"]), dict(work["vocab"])), nprocs=4)
    for kind in DIST_KINDS:
        d = work["dir"] / kind
        meta = json.load(open(d / "true_tp2pp2" / "iter_0000000" / "framework.json"))
        assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
        cli("megatron-to-hf", "--load", d / "true_tp2pp2", "--save", d / "true_tp2pp2_hf")
        assert_same_tensors(d / "hf", d / "true_tp2pp2_hf", kind)


@pytest.fixture(scope="module")
def dist_run(work):
    spawn(_dist_worker, (free_port(), str(work["dir"]), dict(work["vocab"])))
    return work


@pytest.mark.parametrize("kind", DIST_KINDS)
def test_tp2_and_pp2_match_hf_and_export_bit_identical(dist_run, kind):
    d = dist_run["dir"] / kind
    for layout in ("true_tp2", "true_pp2"):
        meta = json.load(open(d / layout / "iter_0000000" / "framework.json"))
        assert meta["layout"]["tp" if layout == "true_tp2" else "pp"] == 2
        cli("megatron-to-hf", "--load", d / layout, "--save", d / f"{layout}_hf")
        # the checkpoint saved by training has no tokenizer: compare the weights and config
        assert_same_tensors(d / "hf", d / f"{layout}_hf", layout)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def _hf_generate(model, tok, prompts, **kw):
    ids, mask = left_padded([tok.encode(p) for p in prompts], tok.pad)
    s = ids.shape[1]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=tok.eod,
                         pad_token_id=tok.pad, do_sample=False, **kw)
    rows = []
    for row in out[:, s:].tolist():
        rows.append(row[:row.index(tok.eod) + 1] if tok.eod in row else row)
    return rows


@pytest.mark.parametrize("kind", ["llama_odd", "qwen2", "qwen3"])
@pytest.mark.parametrize("case,extra,theirs", [
    ("greedy", [], {}),
    ("beam4", ["num_beams=4", "length_penalty=1.3", "early_stopping=true"],
     dict(num_beams=4, length_penalty=1.3, early_stopping=True))])
def test_generate_py_matches_hf(work, kind, case, extra, theirs, tmp_path):
    from framework.config import TokenizerConfig
    from framework.tokenizer import build_tokenizer

    d = work["dir"] / kind
    tok = build_tokenizer(TokenizerConfig(path=str(d / "tp1" / "iter_0000000" / "tokenizer")))
    ref = _hf_generate(work["models"][kind], tok, PROMPTS, **theirs)
    out = tmp_path / "out.jsonl"
    r = run(GENERATE, f"load={d / 'tp1'}", f"prompts={json.dumps(PROMPTS)}",
            f"max_new_tokens={NEW}", f"output_file={out}", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert got == ref


# --------------------------------------------------------------------------------------------
# tokenizers and fine-tuning from an HF checkpoint
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_tokenizer_ids_in_preprocess(style, tmp_path):
    """EOD is the EOS token (<|end_of_text|> / <|endoftext|>); documents get no BOS; BOS falls
    back to EOD where the tokenizer has none (Qwen2); --append-eod ends every document."""
    import numpy

    from data_tools.preprocess import main as preprocess_main
    from framework.config import TokenizerConfig
    from framework.data.indexed import read_index
    from framework.tokenizer import build_tokenizer

    make_tokenizer(str(tmp_path / "tok"), style)
    tok = build_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")))
    hf = tok.hf
    if style == "llama3":
        assert hf.convert_ids_to_tokens(tok.eod) == "<|end_of_text|>"
        assert hf.convert_ids_to_tokens(tok.bos) == "<|begin_of_text|>"
    else:
        assert hf.convert_ids_to_tokens(tok.eod) == "<|endoftext|>"
        assert tok.bos == tok.eod and tok.pad == tok.eod
    docs = ["hello world", "the cat sat on a mat.", "one two  three\nfour"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert preprocess_main(["--input", str(src), "--tokenizer", str(tmp_path / "tok"),
                            "--append-eod", "--output-prefix", str(tmp_path / "out")]) == 0
    prefix = str(tmp_path / "out_text_document")
    info = read_index(prefix)
    data = numpy.fromfile(prefix + ".bin", dtype=info.dtype)
    want = []
    for t in docs:
        ids = hf.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
        want += ids + [tok.eod]
    assert data.tolist() == want


def test_finetune_from_hf_with_load_hf_loss_falls(tmp_path):
    """model=llama_tiny (GQA, RoPE scaling, untied) from an HF Llama of the same shape via
    checkpoint.load_hf, on text preprocessed with the Llama-3-style tokenizer: 50 steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_tools.preprocess import main as preprocess_main

    hf_dir = tmp_path / "hf"
    vocab = make_tokenizer(str(hf_dir), "llama3")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    perturb_(model, seed=5)
    model.save_pretrained(hf_dir)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(600, seed=1)))
    assert preprocess_main(["--input", str(src), "--tokenizer", str(hf_dir), "--append-eod",
                            "--output-prefix", str(tmp_path / "data")]) == 0
    r = run_train("model=llama_tiny", f"checkpoint.load_hf={hf_dir}", "data=indexed",
                  f"data.path=[{tmp_path / 'data_text_document'}]", f"tokenizer.path={hf_dir}",
                  "data.split='90,10,0'", "train.max_steps=50", "train.eval_interval=1000",
                  "optimizer.lr=3e-3", f"checkpoint.dir={tmp_path / 'ck'}",
                  "checkpoint.save_interval=50", cwd=tmp_path, timeout=600)
    assert "initialised weights from Hugging Face model" in r.stdout + r.stderr
    loss = losses(r.records)
    steps = sorted(loss)
    assert len(steps) == 50
    first = sum(loss[s] for s in steps[:5]) / 5
    last = sum(loss[s] for s in steps[-5:]) / 5
    print(f"\nfine-tune from HF: loss {first:.3f} (steps 1-5) -> {last:.3f} (steps 46-50)")
    assert last < 0.7 * first, (first, last)
    # the fine-tuned checkpoint exports back as a Llama
    cli("megatron-to-hf", "--load", tmp_path / "ck", "--save", tmp_path / "back",
        "--hf-model-type", "llama")
    back = json.load(open(tmp_path / "back" / "config.json"))
    assert back["model_type"] == "llama" and back["rope_parameters"]["rope_type"] == "llama3"
    assert back["vocab_size"] == vocab
