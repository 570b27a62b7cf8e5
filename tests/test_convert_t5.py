"""Checkpoint conversion: HF T5 (v1.0) <-> our megatron-core T5 checkpoints (CPU, gloo).

A tiny T5ForConditionalGeneration built by transformers itself (2 encoder + 3 decoder layers,
d_model 32, 4 heads of 8, d_ff 48, 8 relative buckets up to distance 20, vocab 101 -- padded)
is the reference. Acceptance:
* HF -> ours at TP1 and TP2: decoder logits (given encoder input with padding + decoder input)
  equal HF's in fp32 to max abs diff <= 1e-4;
* HF -> ours -> HF: every tensor bit-identical, and transformers loads the export;
* reshape TP2 -> TP1 keeps the logits;
* refusals: --target-pp > 1, gated FFN / untied configs.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_tools import convert
from tests.test_convert import _free_port, _safetensors, cli

V, D, HEADS, DKV, FFN, ENC, DEC = 101, 32, 4, 8, 48, 2, 3
DIV, P1, P2 = 5, 105, 110
TOL = 1e-4


def _hf_t5(path, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=V, d_model=D, d_kv=DKV, d_ff=FFN, num_layers=ENC,
                   num_decoder_layers=DEC, num_heads=HEADS, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, dropout_rate=0.0,
                   decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(2, V, (2, 12), generator=g)
    dec = torch.randint(2, V, (2, 7), generator=g)
    keep = torch.ones(2, 12, dtype=torch.long)
    keep[1, 9:] = 0  # the second encoder row is padded
    enc[1, 9:] = 0
    return enc, dec, keep


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert_t5")
    hf = d / "hf"
    model = _hf_t5(hf)
    enc, dec, keep = _inputs()
    with torch.no_grad():
        logits = model(input_ids=enc, attention_mask=keep, decoder_input_ids=dec).logits
    torch.save({"enc": enc, "dec": dec, "keep": keep, "logits": logits}, d / "ref.pt")
    common = ["--load", hf, "--make-vocab-size-divisible-by", DIV]
    cli("hf-to-megatron", *common, "--save", d / "tp1")
    cli("hf-to-megatron", *common, "--save", d / "tp2", "--target-tp", 2)
    cli("reshape", "--load", d / "tp2", "--save", d / "tp2_tp1", "--target-tp", 1,
        "--target-pp", 1)
    return {"dir": d, "hf": hf, "logits": logits, "enc": enc, "dec": dec, "keep": keep}


def _meta_model_cfg(ckpt_dir):
    from framework.interop.megatron_files import model_config_from_meta, resolve_checkpoint

    _root, _it, path, meta = resolve_checkpoint(str(ckpt_dir))
    return model_config_from_meta(meta, path), meta


def _build(model_cfg, padded, tp=1):
    from framework.config import ParallelConfig
    from framework.models import build_model

    chunks = build_model(model_cfg, ParallelConfig(tensor_model_parallel_size=tp),
                         vocab_size=padded, bf16=False, fp16=False, device=torch.device("cpu"),
                         wrap_ddp=False)
    for c in chunks:
        c.eval()
    return chunks


def _full_logits(chunk, enc, dec, keep):
    """Decoder logits [b, s_dec, V]: TP vocab shards gathered, padding stripped."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pad = keep[:, None, None, :] == 0  # [b,1,1,s_enc], True = masked
    with torch.no_grad():
        out = chunk(enc, dec, pad, None, pad)
    group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, out.contiguous(), group=group)
        out = torch.cat(parts, dim=-1)
    return out[..., :V]


def _tp1_logits(ckpt_dir, work, padded):
    from framework.training.checkpoint import load_checkpoint

    model_cfg, _meta = _meta_model_cfg(ckpt_dir)
    with convert.single_process_world():
        chunks = _build(model_cfg, padded)
        load_checkpoint(str(ckpt_dir), chunks, None, None, model_cfg=model_cfg,
                        with_optimizer=False)
        return _full_logits(chunks[0], work["enc"], work["dec"], work["keep"])


def test_hf_to_megatron_tp1_logits_match_hf(work):
    got = _tp1_logits(work["dir"] / "tp1", work, P1)
    assert (got - work["logits"]).abs().max().item() <= TOL
    model_cfg, meta = _meta_model_cfg(work["dir"] / "tp1")
    assert model_cfg.type == "t5" and model_cfg.softmax_scale == 1.0
    assert model_cfg.scale_decoder_output and not model_cfg.lm_head_bias
    assert (model_cfg.num_layers, model_cfg.encoder_num_layers) == (DEC, ENC)


def test_roundtrip_is_bit_identical_and_loads_in_transformers(work):
    from transformers import T5ForConditionalGeneration

    for name in ("tp1", "tp2"):
        out = work["dir"] / f"back_{name}"
        cli("megatron-to-hf", "--load", work["dir"] / name, "--save", out)
        a, b = _safetensors(work["hf"]), _safetensors(out)
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        ca, cb = (json.load(open(os.path.join(p, "config.json"))) for p in (work["hf"], out))
        for k in ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                  "num_heads", "vocab_size", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj",
                  "tie_word_embeddings", "decoder_start_token_id", "pad_token_id",
                  "eos_token_id"):
            assert ca.get(k) == cb.get(k), k
    model = T5ForConditionalGeneration.from_pretrained(str(work["dir"] / "back_tp1")).eval()
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


def test_pipeline_parallel_and_unsupported_configs_are_refused(work, tmp_path, capsys):
    from framework.interop import InteropError, hf_config_to_model_config

    rc = convert.main(["hf-to-megatron", "--load", str(work["hf"]), "--save",
                       str(tmp_path / "pp2"), "--target-pp", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pipeline_model_parallel_size" in err
    assert not (tmp_path / "pp2").exists()
    base = json.load(open(work["hf"] / "config.json"))
    for change, word in (({"feed_forward_proj": "gated-gelu"}, "feed_forward_proj"),
                         ({"tie_word_embeddings": False, "scale_decoder_outputs": False},
                          "tie_word_embeddings")):
        with pytest.raises(InteropError, match=word):
            hf_config_to_model_config({**base, **change})


# --------------------------------------------------------------------------------------------
# two processes: TP2 (gloo)
# --------------------------------------------------------------------------------------------
def _dist_worker(rank, port, d):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from framework import interop
    from framework.training.checkpoint import load_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    ref = torch.load(os.path.join(d, "ref.pt"))
    model_cfg, _meta = _meta_model_cfg(os.path.join(d, "tp1"))
    args = (ref["enc"], ref["dec"], ref["keep"])
    try:
        ps.initialize_model_parallel(2, 1)
        got = {}
        for name in ("tp2", "tp1"):  # tp1: TP1-padded (105 rows) loaded into 110
            chunks = _build(model_cfg, P2, tp=2)
            load_checkpoint(os.path.join(d, name), chunks, None, None, model_cfg=model_cfg,
                            with_optimizer=False)
            got[name] = _full_logits(chunks[0], *args)
        chunks = _build(model_cfg, P2, tp=2)
        info = interop.load_hf_into_model(os.path.join(d, "hf"), chunks, model_cfg)
        assert info["tensors"] > 0
        got["hf"] = _full_logits(chunks[0], *args)
        for name, logits in got.items():
            assert (logits - ref["logits"]).abs().max().item() <= TOL, name
        assert torch.equal(got["tp2"], got["hf"])
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_tp2_logits_match_hf(work):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(_free_port(), str(work["dir"])), nprocs=2, join=True)
