"""Checkpoint conversion: HF T5 (v1.0) and mT5 <-> our megatron-core T5 checkpoints (CPU, gloo).

Tiny T5ForConditionalGeneration (ReLU FFN, tied embeddings, decoder output scaled by
d_model**-0.5) and MT5ForConditionalGeneration (gated-GeLU FFN, untied LM head, no scaling)
models built by transformers itself (2 encoder + 3 decoder layers, d_model 32, 4 heads of 8,
d_ff 48, 8 relative buckets up to distance 20, vocab 101 -- padded) are the references.
For each, acceptance:
* HF -> ours at TP1 and TP2: decoder logits (given encoder input with padding + decoder input)
  equal HF's in fp32 to max abs diff <= 1e-4;
* HF -> ours -> HF: every tensor bit-identical, and transformers loads the export;
* reshape TP2 -> TP1 keeps the logits;
* refusals: --target-pp > 1, gated FFN / untied configs.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from data_tools import convert
from helpers import (assert_same_hf, build_cpu, checkpoint_model_cfg, free_port, gather_vocab,
                     gloo_rank, load_weights, spawn, tp1_output)
from tests.test_convert import cli
from perturb import perturb_

V, D, HEADS, DKV, FFN, ENC, DEC = 101, 32, 4, 8, 48, 2, 3
DIV, P1, P2 = 5, 105, 110
TOL = 1e-4


KINDS = ("t5", "mt5")


def _hf_t5(path, kind="t5", seed=0):
    import transformers

    torch.manual_seed(seed)
    arch = {"t5": "T5", "mt5": "MT5"}[kind]
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=V, d_model=D, d_kv=DKV, d_ff=FFN, num_layers=ENC, num_decoder_layers=DEC,
        num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, decoder_start_token_id=0,
        feed_forward_proj="relu" if kind == "t5" else "gated-gelu")
    model = getattr(transformers, f"{arch}ForConditionalGeneration")(cfg).eval()
    perturb_(model, seed=seed)  # non-trivial norms (T5 has no biases), so a swapped tensor shows
    with torch.no_grad():
        if kind == "mt5":  # an LM head of its own, as google's mT5 checkpoints
            model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D))
    model.save_pretrained(path)
    if kind == "mt5":  # google's mT5 configs say so (transformers 5 writes true regardless)
        c = json.load(open(path / "config.json"))
        c["tie_word_embeddings"] = False
        json.dump(c, open(path / "config.json", "w"), indent=2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(2, V, (2, 12), generator=g)
    dec = torch.randint(2, V, (2, 7), generator=g)
    keep = torch.ones(2, 12, dtype=torch.long)
    keep[1, 9:] = 0  # the second encoder row is padded
    enc[1, 9:] = 0
    return enc, dec, keep


def _make(d, kind):
    hf = d / "hf"
    model = _hf_t5(hf, kind)
    enc, dec, keep = _inputs()
    with torch.no_grad():
        logits = model(input_ids=enc, attention_mask=keep, decoder_input_ids=dec).logits
    torch.save({"enc": enc, "dec": dec, "keep": keep, "logits": logits}, d / "ref.pt")
    common = ["--load", hf, "--make-vocab-size-divisible-by", DIV]
    cli("hf-to-megatron", *common, "--save", d / "tp1")
    cli("hf-to-megatron", *common, "--save", d / "tp2", "--target-tp", 2)
    cli("reshape", "--load", d / "tp2", "--save", d / "tp2_tp1", "--target-tp", 1,
        "--target-pp", 1)
    return {"dir": d, "hf": hf, "logits": logits, "enc": enc, "dec": dec, "keep": keep,
            "kind": kind}


@pytest.fixture(scope="module")
def works(tmp_path_factory):
    return {k: _make(tmp_path_factory.mktemp(f"convert_{k}"), k) for k in KINDS}


@pytest.fixture(params=KINDS)
def work(works, request):
    return works[request.param]


def _t5_logits(chunk, enc, dec, keep):
    """Decoder logits [b, s_dec, V]: TP vocab shards gathered, padding stripped."""
    pad = keep[:, None, None, :] == 0  # [b,1,1,s_enc], True = masked
    with torch.no_grad():
        out = chunk(enc, dec, pad, None, pad)
    return gather_vocab(out, V)


def _tp1_logits(ckpt_dir, work, padded):
    return tp1_output(ckpt_dir, padded,
                      lambda chunk: _t5_logits(chunk, work["enc"], work["dec"], work["keep"]))


HF_CONFIG_KEYS = ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                  "num_heads", "vocab_size", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj",
                  "decoder_start_token_id", "pad_token_id", "eos_token_id")


def test_hf_to_megatron_tp1_logits_match_hf(work):
    got = _tp1_logits(work["dir"] / "tp1", work, P1)
    assert (got - work["logits"]).abs().max().item() <= TOL
    model_cfg, meta = checkpoint_model_cfg(work["dir"] / "tp1")
    assert model_cfg.type == "t5" and model_cfg.softmax_scale == 1.0
    assert not model_cfg.lm_head_bias
    assert (model_cfg.num_layers, model_cfg.encoder_num_layers) == (DEC, ENC)
    v10 = work["kind"] == "t5"
    assert model_cfg.scale_decoder_output == v10
    assert model_cfg.share_embeddings_and_output_weights == v10
    assert model_cfg.activation == ("relu" if v10 else "geglu_tanh")
    assert meta["hf_source"]["model_type"] == work["kind"]


def test_roundtrip_is_bit_identical_and_loads_in_transformers(work):
    import transformers

    for name in ("tp1", "tp2"):
        out = work["dir"] / f"back_{name}"
        cli("megatron-to-hf", "--load", work["dir"] / name, "--save", out)
        b, cb = assert_same_hf(work["hf"], out, HF_CONFIG_KEYS)
        # transformers 5 writes tie_word_embeddings=true for every (m)T5 config; the files say
        # whether the head is tied (lm_head.weight), T5's scale_decoder_outputs the scaling
        assert ("lm_head.weight" in b) == (work["kind"] == "mt5")
        if work["kind"] == "t5":
            assert cb["scale_decoder_outputs"] is True
    arch = {"t5": "T5", "mt5": "MT5"}[work["kind"]]
    model = getattr(transformers, f"{arch}ForConditionalGeneration").from_pretrained(
        str(work["dir"] / "back_tp1")).eval()
    with torch.no_grad():
        got = model(input_ids=work["enc"], attention_mask=work["keep"],
                    decoder_input_ids=work["dec"]).logits
    assert torch.equal(got, work["logits"])


def test_reshape_tp2_to_tp1_keeps_logits(work):
    a = _tp1_logits(work["dir"] / "tp1", work, P1)
    b = _tp1_logits(work["dir"] / "tp2_tp1", work, P1)
    assert torch.equal(a, b)
    c = _tp1_logits(work["dir"] / "tp2", work, P2)  # TP2-padded rows, loaded at TP1
    assert (c - work["logits"]).abs().max().item() <= TOL


def test_pipeline_parallel_and_unsupported_configs_are_refused(works, tmp_path, capsys):
    from framework.interop import InteropError, hf_config_to_model_config

    work = works["t5"]
    rc = convert.main(["hf-to-megatron", "--load", str(work["hf"]), "--save",
                       str(tmp_path / "pp2"), "--target-pp", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pipeline_model_parallel_size" in err
    assert not (tmp_path / "pp2").exists()
    base = json.load(open(work["hf"] / "config.json"))
    with pytest.raises(InteropError, match="feed_forward_proj"):
        hf_config_to_model_config({**base, "feed_forward_proj": "gated-swish"})

def test_untied_head_is_read_from_the_files(works, tmp_path):
    """transformers 5 writes tie_word_embeddings=true for mT5 / T5 v1.1 whether or not the head
    is untied: the lm_head.weight tensor decides (it is used, not replaced by the embedding)."""
    src = works["mt5"]
    hf = tmp_path / "mt5_v5_config"
    shutil.copytree(src["hf"], hf)
    c = json.load(open(hf / "config.json"))
    json.dump({**c, "tie_word_embeddings": True}, open(hf / "config.json", "w"))
    cli("hf-to-megatron", "--load", hf, "--save", tmp_path / "ours",
        "--make-vocab-size-divisible-by", DIV)
    model_cfg, _meta = checkpoint_model_cfg(tmp_path / "ours")
    assert not model_cfg.share_embeddings_and_output_weights
    got = _tp1_logits(tmp_path / "ours", src, P1)
    assert (got - src["logits"]).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------------
# two processes: TP2 (gloo)
# --------------------------------------------------------------------------------------------
def _dist_worker(rank, port, dirs):
    from megatron.core import parallel_state as ps

    with gloo_rank(rank, port):
        ps.initialize_model_parallel(2, 1)
        for d in dirs:
            _dist_check(d)


def _dist_check(d):
    from framework import interop

    ref = torch.load(os.path.join(d, "ref.pt"))
    model_cfg, _meta = checkpoint_model_cfg(os.path.join(d, "tp1"))
    args = (ref["enc"], ref["dec"], ref["keep"])
    got = {}
    for name in ("tp2", "tp1"):  # tp1: TP1-padded (105 rows) loaded into 110
        chunks = build_cpu(model_cfg, P2, tp=2)
        load_weights(os.path.join(d, name), chunks, model_cfg)
        got[name] = _t5_logits(chunks[0], *args)
    chunks = build_cpu(model_cfg, P2, tp=2)  # HF weights straight into TP2 (GLU halves sliced)
    info = interop.load_hf_into_model(os.path.join(d, "hf"), chunks, model_cfg)
    assert info["tensors"] > 0
    got["hf"] = _t5_logits(chunks[0], *args)
    for name, logits in got.items():
        assert (logits - ref["logits"]).abs().max().item() <= TOL, (d, name)
    assert torch.equal(got["tp2"], got["hf"])


def test_tp2_logits_match_hf(works):
    dirs = [str(works[k]["dir"]) for k in KINDS]
    spawn(_dist_worker, (free_port(), dirs))
