"""Checkpoint conversion: HF Megatron-BERT <-> our megatron-core BERT checkpoints (CPU, gloo).

A tiny `MegatronBertForPreTraining` built by transformers itself (2 layers, hidden 48, 6 heads,
ffn 80, vocab 101 -- odd, so it is padded -- 40 positions, eps 3e-6, exact GeLU, random non-trivial
norms and biases) is the reference; inputs use both token types and a padded sample. Acceptance:
* HF -> ours at TP1, TP2 and PP2: MLM logits and binary-head (sentence-order / NSP) logits equal
  HF's (fp32, max abs diff <= 1e-4) once the vocab padding is stripped and TP shards gathered;
* HF -> ours -> HF: every tensor bit-identical (also from the TP2 checkpoint), and
  `AutoModelForPreTraining.from_pretrained` loads the export and reproduces HF's logits;
* reshape TP2 -> TP1: identical logits; --print-checkpoint-structure on BERT checkpoints;
* refusals: activations and models HF megatron-bert cannot express; unsupported model types list
  megatron-bert among the supported ones.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_tools import convert
from helpers import (assert_same_hf, build_cpu, checkpoint_model_cfg, free_port, gather_vocab,
                     gloo_rank, load_weights, pipeline2_forward, spawn, tp1_output)
from test_convert import cli
from perturb import perturb_

V, LAYERS, HIDDEN, HEADS, FFN, NPOS, EPS = 101, 2, 48, 6, 80, 40, 3e-6
DIV = 5
P1, P2 = 105, 110  # padded vocab at TP1 / TP2 for make_vocab_size_divisible_by=5
TOL = 1e-4
B, S = 2, 24


def _hf_bert(path, seed=0):
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(seed)
    cfg = MegatronBertConfig(vocab_size=V, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, intermediate_size=FFN,
                             max_position_embeddings=NPOS, layer_norm_eps=EPS)
    model = MegatronBertForPreTraining(cfg).eval()
    perturb_(model, seed=seed)  # non-trivial norms and biases, so a swapped tensor shows
    model.save_pretrained(path)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, S), generator=g)
    types = (torch.arange(S) >= 10).long().expand(B, S).contiguous()
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -5:] = 0  # a padded sample
    return tokens, types, mask


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert_bert")
    hf = d / "hf"
    model = _hf_bert(hf)
    tokens, types, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=tokens, token_type_ids=types, attention_mask=mask)
    ref = {"tokens": tokens, "types": types, "mask": mask, "logits": out.prediction_logits,
           "binary": out.seq_relationship_logits}
    torch.save(ref, d / "ref.pt")
    common = ["--load", hf, "--make-vocab-size-divisible-by", DIV]
    cli("hf-to-megatron", *common, "--save", d / "tp1")
    cli("hf-to-megatron", *common, "--save", d / "tp2", "--target-tp", 2)
    cli("reshape", "--load", d / "tp2", "--save", d / "tp2_tp1", "--target-tp", 1,
        "--target-pp", 1)
    return {"dir": d, "hf": hf, **ref}


def _bert_logits(chunk, ref):
    """(MLM logits [b, s, V] with TP vocab shards gathered and padding stripped, binary logits)."""
    with torch.no_grad():
        logits, binary = chunk(ref["tokens"], ref["mask"], tokentype_ids=ref["types"])
    return gather_vocab(logits, V), binary


def _tp1_logits(ckpt_dir, ref, padded=P1):
    return tp1_output(ckpt_dir, padded, lambda chunk: _bert_logits(chunk, ref))


def _close(got, ref, what):
    logits, binary = got
    assert (logits - ref["logits"]).abs().max().item() <= TOL, what
    assert binary is not None and (binary - ref["binary"]).abs().max().item() <= TOL, what


HF_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "vocab_size", "hidden_act",
                  "layer_norm_eps", "type_vocab_size", "tie_word_embeddings", "pad_token_id")


# --------------------------------------------------------------------------------------------
# single process
# --------------------------------------------------------------------------------------------
def test_hf_to_megatron_tp1_logits_match_hf(work):
    _close(_tp1_logits(work["dir"] / "tp1", work), work, "tp1")
    _model_cfg, meta = checkpoint_model_cfg(work["dir"] / "tp1")
    m = meta["config"]["model"]
    assert (m["type"], m["activation"], m["add_binary_head"]) == ("bert", "gelu", True)
    assert m["layernorm_epsilon"] == EPS and m["vocab_size"] == V
    assert meta["hf_source"]["model_type"] == "megatron-bert"


def test_roundtrip_is_bit_identical_and_loads_in_transformers(work, capsys):
    from transformers import AutoModelForPreTraining

    out = work["dir"] / "back"
    cli("megatron-to-hf", "--load", work["dir"] / "tp1", "--save", out,
        "--print-checkpoint-structure")
    printed = capsys.readouterr().out
    assert "model megatron_bert_hf/bert," in printed
    # dist_checkpointing stores the layers stacked: [layers, 3 * hidden, hidden]
    assert "encoder.layers.self_attention.linear_qkv.weight" in printed
    assert f"[{LAYERS}, {3 * HIDDEN}, {HIDDEN}]" in printed
    assert "output_layer.bias" in printed and f"[{P1}]" in printed
    assert "bert.encoder.layer.1.attention.self.query.weight" in printed
    assert "cls.predictions.bias" in printed and f"[{V}]" in printed
    assert_same_hf(work["hf"], out, HF_CONFIG_KEYS)
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == ["MegatronBertForPreTraining"]
    model = AutoModelForPreTraining.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "MegatronBertForPreTraining"
    with torch.no_grad():
        o = model(input_ids=work["tokens"], token_type_ids=work["types"],
                  attention_mask=work["mask"])
    assert torch.equal(o.prediction_logits, work["logits"])
    assert torch.equal(o.seq_relationship_logits, work["binary"])
    # from a TP2 conversion (P2 padding rows, TP-sharded QKV) as well
    out2 = work["dir"] / "back_tp2"
    cli("megatron-to-hf", "--load", work["dir"] / "tp2", "--save", out2)
    assert_same_hf(work["hf"], out2, HF_CONFIG_KEYS)


def test_reshape_tp2_to_tp1_keeps_logits(work, capsys):
    d = work["dir"]
    a = _tp1_logits(d / "tp1", work)
    b = _tp1_logits(d / "tp2_tp1", work)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rc = convert.main(["megatron-to-hf", "--load", str(d / "tp2"),
                       "--print-checkpoint-structure"])
    printed = capsys.readouterr().out
    assert rc == 0 and "embedding.tokentype_embeddings.weight" in printed
    assert "binary_head.weight" in printed and f"[{P2}, {HIDDEN}]" in printed


def test_hf_structure_print_and_base_model_layout(work, tmp_path, capsys):
    """Files whose base-model tensors lack the `bert.` prefix (as MegatronBertModel saves them)
    import too; --print-checkpoint-structure works on the HF input."""
    from safetensors.torch import load_file, save_file

    rc = convert.main(["hf-to-megatron", "--load", str(work["hf"]),
                       "--print-checkpoint-structure"])
    printed = capsys.readouterr().out
    assert rc == 0 and "model_type=megatron-bert" in printed
    assert "cls.seq_relationship.weight" in printed
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((work["hf"] / "config.json").read_text())
    sd = {k.removeprefix("bert."): v
          for k, v in load_file(work["hf"] / "model.safetensors").items()}
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    cli("hf-to-megatron", "--load", base, "--save", tmp_path / "ck",
        "--make-vocab-size-divisible-by", DIV)  # cls.* keep their names; the rest gain `bert.`
    _close(_tp1_logits(tmp_path / "ck", work), work, "base layout")


def test_refusals(work, tmp_path, capsys):
    from dataclasses import replace

    from framework import interop
    from framework.config import ConfigError

    hf_cfg = json.load(open(work["hf"] / "config.json"))
    with pytest.raises(ConfigError, match="hidden_act='gelu_new'"):
        interop.hf_config_to_model_config({**hf_cfg, "hidden_act": "gelu_new"})
    with pytest.raises(ConfigError, match="type_vocab_size"):
        interop.hf_config_to_model_config({**hf_cfg, "type_vocab_size": 3})
    model_cfg = interop.hf_config_to_model_config(hf_cfg)
    back = interop.model_config_to_hf_config(model_cfg, vocab_size=V, base=hf_cfg)
    assert interop._arch(interop.hf_config_to_model_config(back)) == interop._arch(model_cfg)
    with pytest.raises(ConfigError, match="add_binary_head=false"):
        interop.model_config_to_hf_config(replace(model_cfg, add_binary_head=False),
                                          vocab_size=V)
    with pytest.raises(ConfigError, match="model.activation='gelu_tanh'"):
        interop.model_config_to_hf_config(replace(model_cfg, activation="gelu_tanh"),
                                          vocab_size=V)
    # loading into a model without the binary head would drop the token types: refused
    with pytest.raises(ConfigError, match="add_binary_head: hf=True config=False"):
        interop.load_hf_into_model(str(work["hf"]), [], replace(model_cfg, add_binary_head=False))
    src = tmp_path / "falcon"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    rc = convert.main(["hf-to-megatron", "--load", str(src), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "'falcon' is not supported" in err
    supported = err.split("supported: ", 1)[1].split(" (planned", 1)[0]
    assert "gpt2" in supported and "megatron-bert" in supported
    assert "megatron-bert" not in err.split("(planned", 1)[1]


def test_train_config_accepts_load_hf_for_bert():
    from framework.config import CheckpointConfig, Config, DataConfig, ModelConfig

    Config(model=ModelConfig(type="bert", add_binary_head=True),
           data=DataConfig(type="indexed", path=["x"]),
           checkpoint=CheckpointConfig(load_hf="some_dir"))


# --------------------------------------------------------------------------------------------
# two processes: TP2, then PP2 (gloo)
# --------------------------------------------------------------------------------------------
def _dist_worker(rank, port, d):
    from megatron.core import parallel_state as ps

    from framework import interop

    with gloo_rank(rank, port):
        ref = torch.load(os.path.join(d, "ref.pt"))
        model_cfg, _meta = checkpoint_model_cfg(os.path.join(d, "tp1"))
        # ---- TP2: from the TP2 conversion, the TP1 one (105 rows into 110), and HF directly
        ps.initialize_model_parallel(2, 1)
        got = {}
        for name in ("tp2", "tp1", "hf"):
            chunks = build_cpu(model_cfg, P2, tp=2)
            if name == "hf":
                interop.load_hf_into_model(os.path.join(d, "hf"), chunks, model_cfg)
            else:
                load_weights(os.path.join(d, name), chunks, model_cfg)
            got[name] = _bert_logits(chunks[0], ref)
            _close(got[name], ref, f"TP2 {name}")
        assert torch.equal(got["tp2"][0], got["hf"][0])
        ps.destroy_model_parallel()
        # ---- PP2 (one layer per stage), HF weights loaded directly
        torch.Tensor.cuda = lambda self, *a, **k: self  # mcore's tied-embedding all-reduce
        ps.initialize_model_parallel(1, 2)
        chunk = build_cpu(model_cfg, P1, pp=2)[0]
        interop.load_hf_into_model(os.path.join(d, "hf"), [chunk], model_cfg)
        out = pipeline2_forward(chunk, rank == 0, 1 - rank, (S, B, HIDDEN), ref["tokens"],
                                ref["mask"], tokentype_ids=ref["types"])
        if rank == 1:
            logits, binary = out
            _close((logits[..., :V], binary), ref, "PP2 hf")


def test_tp2_and_pp2_logits_match_hf(work):
    spawn(_dist_worker, (free_port(), str(work["dir"])))
