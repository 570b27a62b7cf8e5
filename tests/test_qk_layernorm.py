"""`model.qk_layernorm` (Qwen3's per-head q/k RMSNorm, megatron-core's q_layernorm/k_layernorm)
in training, on CPU (gloo). HF parity, import/export, TP2/PP2 and generation of Qwen3 are in
tests/test_llama.py (kind "qwen3").

* TP2 trains like TP1 from one perturbed seed checkpoint: each TP rank holds the whole q/k norm
  weight but only its own heads, so its gradient is a partial sum that megatron-core must add
  over the TP group; without that sum the ranks' copies drift apart and the losses part from
  TP1's after the first update. (Sequence parallelism is GPU-only: gloo has no reduce-scatter.)
* The q/k norm weights are saved, perturbed, and train.
* Config: GPT only; not with the fused QKV RoPE.
"""
from __future__ import annotations

import pytest

from framework.cli import register_resolvers
from framework.config import register_configs
from helpers import config_error, load_config, run_train

register_configs()
register_resolvers()

MODEL = ("model=llama_tiny", "model.qk_layernorm=true")


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory):
    """A llama_tiny + q/k norm seed checkpoint with every tensor perturbed (norm weights away
    from one, so a dropped or swapped q/k norm weight shows)."""
    from perturb import perturb_checkpoint

    d = tmp_path_factory.mktemp("qkln")
    run_train(*MODEL, "train.max_steps=0", f"checkpoint.dir={d}/seed", cwd=str(d), name="seed")
    perturb_checkpoint(f"{d}/seed")
    return d


def _losses(d, name, *extra):
    common = (*MODEL, "train.max_steps=5", "train.eval_interval=0", "checkpoint.save=false",
              "optimizer.lr=0.01", f"checkpoint.load={d}/seed")
    return run_train(*common, *extra, cwd=str(d), name=name).losses


def test_tp2_trains_like_tp1(seed_ckpt):
    a = _losses(seed_ckpt, "tp1")
    b = _losses(seed_ckpt, "tp2", "parallel=tp2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])


def test_qk_norm_weights_are_saved_and_train(seed_ckpt):
    import torch

    from helpers import checkpoint_model_cfg

    d = seed_ckpt
    model_cfg, _ = checkpoint_model_cfg(d / "seed")
    assert model_cfg.qk_layernorm
    before = _qk_tensors(d / "seed")
    # q and k, each stacked over the 4 layers; RMSNorm: weights only
    assert sorted(before) == ["decoder.layers.self_attention.k_layernorm.weight",
                              "decoder.layers.self_attention.q_layernorm.weight"], sorted(before)
    run_train(*MODEL, "train.max_steps=3", "train.eval_interval=0", "optimizer.lr=0.01",
              f"checkpoint.load={d}/seed", f"checkpoint.dir={d}/trained", cwd=str(d),
              name="trained")
    after = _qk_tensors(d / "trained")
    for n, t in before.items():
        assert tuple(t.shape) == (4, 32), (n, t.shape)  # layers x head dim (128 / 4 heads)
        for layer in range(4):
            assert (t[layer] - 1).abs().min() > 0, f"{n}[{layer}] was not perturbed"
            assert not torch.equal(t[layer], after[n][layer]), f"{n}[{layer}] did not train"


def _qk_tensors(ckpt_dir):
    """The q/k norm tensors of the latest checkpoint in `ckpt_dir`, by checkpoint key."""
    from data_tools.convert import single_process_world
    from framework import checkpoint as ckpt
    from framework.interop import megatron_files as mf

    it = ckpt.latest_iteration(str(ckpt_dir))
    with single_process_world():
        _, tensors, _ = mf.load_full(ckpt.iter_dir(str(ckpt_dir), it))
    return {k: t.float().clone() for k, t in tensors.items()
            if not k.startswith("optimizer") and ("q_layernorm" in k or "k_layernorm" in k)}


def test_config_rules():
    assert load_config(*MODEL).model.qk_layernorm
    assert not load_config("model=llama_tiny").model.qk_layernorm
    msg = config_error("model=bert_tiny", "model.qk_layernorm=true")
    assert "model.qk_layernorm=true" in msg and "GPT" in msg
    msg = config_error(*MODEL, "model.qkv_rope_fusion=true")
    assert "model.qkv_rope_fusion=true" in msg and "model.qk_layernorm=true" in msg
    for name in ("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b"):
        m = load_config(f"model={name}").model
        assert m.qk_layernorm and m.head_dim == 128 and not m.add_qkv_bias, name


def test_a_checkpoint_with_qk_norms_needs_them(seed_ckpt):
    """The loader skips a checkpoint's extra tensors, so resuming (or loading) a q/k norm
    checkpoint without model.qk_layernorm would drop the trained norms silently: refused."""
    r = run_train("model=llama_tiny", "train.max_steps=1", "checkpoint.save=false",
                  f"checkpoint.load={seed_ckpt}/seed", cwd=str(seed_ckpt), name="no_qk", expect=2)
    assert "model.qk_layernorm: checkpoint=True config=False" in r.stderr + r.stdout


def test_architecture_check_compares_resolved_values():
    """HF imports store a head dim / query groups equal to the derived ones as null; the
    presets may spell them out (qwen3_8b: kv_channels 128 = 4096 / 32)."""
    from framework.checkpoint import check_compatible

    m = load_config("model=qwen3_8b").model
    stored = {k: getattr(m, k) for k in ("type", "num_layers", "hidden_size",
                                         "num_attention_heads", "qk_layernorm")}
    check_compatible({"config": {"model": dict(stored, kv_channels=None)}}, m, "ckpt")
    with pytest.raises(Exception, match="model.kv_channels: checkpoint=64 config=128"):
        check_compatible({"config": {"model": dict(stored, kv_channels=64)}}, m, "ckpt")
    # written before qk_layernorm existed: no q/k norms
    old = {k: v for k, v in stored.items() if k != "qk_layernorm"}
    with pytest.raises(Exception, match="model.qk_layernorm: checkpoint=False config=True"):
        check_compatible({"config": {"model": old}}, m, "ckpt")


def test_qwen3_config_without_head_dim_uses_hfs_default():
    """Qwen3Config's head_dim defaults to 128 (not hidden / heads, as Llama's and Qwen2's do)."""
    from transformers import Qwen3Config

    from framework.models.gpt.hf_llama import variant

    dims = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=100, intermediate_size=64,
                max_position_embeddings=128)
    assert Qwen3Config(**dims).head_dim == 128
    assert variant("qwen3").hf_config_to_fields(dict(dims, model_type="qwen3"))["kv_channels"] == 128
    assert variant("qwen2").hf_config_to_fields(dict(dims, model_type="qwen2"))["kv_channels"] is None
