"""T5 v1.0 (HF `model_type: t5`, `T5ForConditionalGeneration`) <-> our `t5` model (mcore T5Model).

What differs between the two and how it is closed (ModelConfig options, defaults off):
* HF T5 attention has no 1/sqrt(d) softmax scaling -> `softmax_scale: 1.0`.
* T5LayerNorm is RMSNorm without bias, eps 1e-6 -> `normalization: RMSNorm`; no linear biases ->
  `add_bias_linear: false`.
* Relative position bias: mcore's `RelativePositionEmbedding` uses HF's bucket formula
  (bidirectional for the encoder, causal for the decoder), computed once per stack and added to
  the self-attention of every layer, none in cross-attention -- as HF, whose table lives in
  block 0's self-attention.
* Tied embeddings, decoder output scaled by d_model**-0.5 before the LM head ->
  `scale_decoder_output: true`; mcore's tied T5 LM head has a vocabulary bias HF lacks ->
  `lm_head_bias: false`.
* q/k/v are separate HF tensors; ours are mcore's per-head interleaved `linear_qkv` (self) and
  per-head [k v] `linear_kv` (cross).
* T5 v1.1 (and mT5, framework.models.t5.hf_mt5): gated FFN (`feed_forward_proj: gated-gelu` ->
  `activation: geglu_tanh`, `gated-silu` -> `swiglu`; wi_0 is the activated half, [wi_0; wi_1]
  is mcore's GLU `linear_fc1`, sliced per half for TP), no output scaling, and an untied LM head
  when the files carry `lm_head.weight` (`resolve_with_tensors`: transformers 5 writes
  tie_word_embeddings=true for every T5 config and unties when the file has its own head).
Other `feed_forward_proj` values are refused with one line. No pipeline parallelism (the config
refuses it for model.type=t5).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from framework.models.hf_rules import (family_checks, glu_to_hf, glu_to_ours, hf_float, hf_ints,
                                       kept_hf_config, refuse, require, Rule)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "t5"
MODEL_TYPE = "t5"
HF_ARCHITECTURE = "T5ForConditionalGeneration"
HF_BASE_PREFIX = ""  # T5Model (base) files have the same names, without lm_head
# the cross-attention relative bias some old files carry (HF ignores it on load too)
HF_IGNORED = re.compile(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias"
                        r"\.weight$")
# HF feed_forward_proj -> ModelConfig.activation ("gated-gelu" is gelu_new, the tanh GeLU)
_ACT_IN = {"relu": "relu", "gated-gelu": "geglu_tanh", "gated-gelu_new": "geglu_tanh",
           "gated-silu": "swiglu"}
_ACT_OUT = {"relu": "relu", "geglu_tanh": "gated-gelu", "swiglu": "gated-silu"}
_GATED = ("geglu_tanh", "swiglu")


def _scale_decoder_outputs(hf: Dict[str, Any]) -> bool:
    """HF T5 scales the decoder output by d_model**-0.5 unless the config says otherwise
    (transformers 5 writes `scale_decoder_outputs`; older configs: tie_word_embeddings=false
    (T5 v1.1) means no scaling). mT5 never scales."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def _tied(hf: Dict[str, Any]) -> bool:
    """The LM head is `shared.weight` unless the config says tie_word_embeddings=false (google's
    T5 v1.1 / mT5 configs, whose files have their own lm_head.weight)."""
    return hf.get("tie_word_embeddings", True) is not False


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """HF T5Config (as a dict) -> our ModelConfig fields."""
    bad = []
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACT_IN:
        bad.append(f"feed_forward_proj={proj!r} (supported: {sorted(_ACT_IN)})")
    if hf.get("is_decoder", False):
        bad.append("is_decoder=true")
    refuse(bad, "this t5 config cannot be expressed as our T5 model")
    d_model, heads, d_kv, d_ff, enc, vocab = hf_ints(
        hf, ("d_model", "num_heads", "d_kv", "d_ff", "num_layers", "vocab_size"), "t5")
    dec = hf_ints(hf, ("num_decoder_layers",), "t5")[0] if hf.get("num_decoder_layers") \
        is not None else enc
    seq = hf_ints(hf, ("n_positions",), "t5")[0] if hf.get("n_positions") else 512
    dropout = hf_float(hf, "dropout_rate", 0.1, "t5")
    return dict(
        name="t5_hf",
        type=MODEL_TYPE,
        num_layers=dec,
        encoder_num_layers=enc,
        hidden_size=d_model,
        num_attention_heads=heads,
        kv_channels=d_kv,
        ffn_hidden_size=d_ff,
        seq_length=seq,
        decoder_seq_length=seq,
        vocab_size=vocab,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        normalization="RMSNorm",
        layernorm_epsilon=hf_float(hf, "layer_norm_epsilon", 1e-6, "t5"),
        activation=_ACT_IN[proj],
        add_bias_linear=False,
        position_embedding_type="relative",
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        share_embeddings_and_output_weights=_tied(hf),
        softmax_scale=1.0,
        scale_decoder_output=_scale_decoder_outputs(hf),
        lm_head_bias=False,
    )


def resolve_with_tensors(cfg: "ModelConfig", names) -> "ModelConfig":
    """T5 v1.1 / mT5 (no output scaling): the LM head is untied iff the files have an
    lm_head.weight (transformers 5 unties it then, whatever tie_word_embeddings says). T5 v1.0
    (scaled) is always tied; an lm_head.weight there is a copy of shared.weight."""
    if cfg.scale_decoder_output:
        return cfg
    return replace(cfg, share_embeddings_and_output_weights="lm_head.weight" not in names)


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    heads = cfg.num_attention_heads
    require([
        *family_checks(cfg, MODEL_TYPE, "RMSNorm", "relative"),
        (cfg.activation in _ACT_OUT, f"model.activation={cfg.activation!r}"),
        (not cfg.add_bias_linear, "model.add_bias_linear=true"),
        (not cfg.add_qkv_bias, "model.add_qkv_bias=true"),
        (cfg.num_query_groups in (None, heads), f"model.num_query_groups={cfg.num_query_groups}"),
        (cfg.softmax_scale == 1.0, f"model.softmax_scale={cfg.softmax_scale} (HF T5: 1.0)"),
        (cfg.share_embeddings_and_output_weights or not cfg.scale_decoder_output,
         "model.share_embeddings_and_output_weights=false with "
         "model.scale_decoder_output=true"),
        (not cfg.lm_head_bias, "model.lm_head_bias=true"),
        (not cfg.apply_residual_connection_post_layernorm,
         "model.apply_residual_connection_post_layernorm=true"),
    ], "this model cannot be expressed as HF t5")
    out = kept_hf_config(base, HF_MODEL_TYPE)
    out.update(
        model_type=HF_MODEL_TYPE,
        architectures=[HF_ARCHITECTURE],
        vocab_size=vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.kv_channels or cfg.hidden_size // heads,
        d_ff=cfg.ffn,
        num_layers=cfg.enc_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.hidden_dropout,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        feed_forward_proj=_ACT_OUT[cfg.activation],
        dense_act_fn={"relu": "relu", "geglu_tanh": "gelu_new", "swiglu": "silu"}[
            cfg.activation],
        is_gated_act=cfg.activation in _GATED,
        is_encoder_decoder=True,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        scale_decoder_outputs=cfg.scale_decoder_output,
    )
    if not base:
        out.setdefault("decoder_start_token_id", 0)
        out.setdefault("pad_token_id", 0)
        out.setdefault("eos_token_id", 1)
    return out


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def _dims(cfg: ModelConfig):
    heads = cfg.num_attention_heads
    return heads, cfg.kv_channels or cfg.hidden_size // heads


def _interleave_to_ours(ts, cfg: ModelConfig) -> torch.Tensor:
    """(q, k, v) or (k, v) weights [n*d, h] -> per head [q_h; k_h; v_h] (mcore's layout)."""
    heads, dim = _dims(cfg)
    parts = [t.reshape(heads, dim, -1) for t in ts]
    return torch.cat(parts, dim=1).reshape(heads * dim * len(ts), -1)


def _split_to_hf(t: torch.Tensor, cfg: ModelConfig, n: int):
    heads, dim = _dims(cfg)
    parts = t.reshape(heads, n * dim, -1).split(dim, dim=1)
    return tuple(p.reshape(heads * dim, -1) for p in parts)


def _qkv_to_hf(t, cfg):
    return _split_to_hf(t, cfg, 3)


def _kv_to_hf(t, cfg):
    return _split_to_hf(t, cfg, 2)


def _attn(ours: str, hf: str, names=("q", "k", "v")) -> Rule:
    return Rule(ours, tuple(f"{hf}.{x}.weight" for x in names), _interleave_to_ours,
                _qkv_to_hf if len(names) == 3 else _kv_to_hf)


def _mlp(L: str, H: str, cfg: ModelConfig) -> List[Rule]:
    """relu: wi -> linear_fc1; gated: [wi_0 (activated gate); wi_1] -> linear_fc1 (mcore's GLU
    computes act(first half) * second half)."""
    if cfg.activation in _GATED:
        fc1 = Rule(L + "mlp.linear_fc1.weight", (H + "DenseReluDense.wi_0.weight",
                                                 H + "DenseReluDense.wi_1.weight"),
                   glu_to_ours, glu_to_hf, glu=True)
    else:
        fc1 = Rule(L + "mlp.linear_fc1.weight", H + "DenseReluDense.wi.weight")
    return [fc1, Rule(L + "mlp.linear_fc2.weight", H + "DenseReluDense.wo.weight")]


def _encoder_layer(i: int, cfg: ModelConfig) -> List[Rule]:
    L, H = f"encoder.layers.{i}.", f"encoder.block.{i}.layer."
    return [
        Rule(L + "input_layernorm.weight", H + "0.layer_norm.weight"),
        _attn(L + "self_attention.linear_qkv.weight", H + "0.SelfAttention"),
        Rule(L + "self_attention.linear_proj.weight", H + "0.SelfAttention.o.weight"),
        Rule(L + "pre_mlp_layernorm.weight", H + "1.layer_norm.weight"),
    ] + _mlp(L, H + "1.", cfg)


def rules(cfg: ModelConfig) -> List[Rule]:
    # `{i}` runs over num_layers (the decoder's); the encoder's layers are listed one by one
    L, H = "decoder.layers.{i}.", "decoder.block.{i}.layer."
    out = [
        Rule("embedding.word_embeddings.weight", "shared.weight", vocab=True),
        Rule("encoder_relative_pos_emb.relative_attention_bias.weight",
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        Rule("decoder_relative_pos_emb.relative_attention_bias.weight",
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ]
    for i in range(cfg.enc_layers):
        out += _encoder_layer(i, cfg)
    out += [
        Rule("encoder.final_layernorm.weight", "encoder.final_layer_norm.weight"),
        Rule(L + "input_layernorm.weight", H + "0.layer_norm.weight"),
        _attn(L + "self_attention.linear_qkv.weight", H + "0.SelfAttention"),
        Rule(L + "self_attention.linear_proj.weight", H + "0.SelfAttention.o.weight"),
        Rule(L + "pre_cross_attn_layernorm.weight", H + "1.layer_norm.weight"),
        Rule(L + "cross_attention.linear_q.weight", H + "1.EncDecAttention.q.weight"),
        _attn(L + "cross_attention.linear_kv.weight", H + "1.EncDecAttention", ("k", "v")),
        Rule(L + "cross_attention.linear_proj.weight", H + "1.EncDecAttention.o.weight"),
        Rule(L + "pre_mlp_layernorm.weight", H + "2.layer_norm.weight"),
    ] + _mlp(L, H + "2.", cfg) + [
        Rule("decoder.final_layernorm.weight", "decoder.final_layer_norm.weight"),
    ]
    if not cfg.share_embeddings_and_output_weights:
        # mcore's T5Model registers the LM head's linear twice (lm_head.output_layer and
        # output_layer): one parameter, two state-dict keys
        out += [Rule("lm_head.output_layer.weight", "lm_head.weight", vocab=True),
                Rule("output_layer.weight", "lm_head.weight", vocab=True, export=False)]
    return out


def optional_hf_tensors(cfg: ModelConfig) -> List[str]:
    """Tied copies of `shared.weight` that some files carry."""
    out = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    if cfg.share_embeddings_and_output_weights and cfg.scale_decoder_output:
        out.append("lm_head.weight")  # T5 v1.0: always tied
    return out
