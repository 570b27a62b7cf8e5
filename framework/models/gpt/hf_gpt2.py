"""GPT-2 (HF `model_type: gpt2`, `GPT2LMHeadModel`) <-> our `gpt` model (megatron-core GPTModel).

What differs between the two layouts:
* HF GPT-2 uses `Conv1D`, whose weight is stored [in, out]: every linear weight is transposed.
* HF `c_attn` is [q; k; v] stacked; megatron-core's `linear_qkv` interleaves them per query group:
  for each group, its query heads, then its key head, then its value head
  (megatron/core/transformer/attention.py, SelfAttention.get_query_key_value_tensors).
* HF's GeLU is `gelu_new`, the tanh approximation: it maps to our `activation: gelu_tanh`.
* Names: wte/wpe -> embedding, h.N.ln_1/ln_2 -> input_layernorm/pre_mlp_layernorm, ln_f ->
  decoder.final_layernorm; the LM head is tied to wte (a copy on the last pipeline stage).
HF files saved from the base `GPT2Model` have no `transformer.` prefix; both are read. The causal
mask buffers (`attn.bias`, `attn.masked_bias`) of older files are ignored.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from framework.models.hf_rules import (family_checks, hf_float, hf_ints, kept_hf_config, mha_checks,
                                       output_layer_rule, qkv_rows_to_hf, qkv_rows_to_ours, refuse,
                                       require, Rule, transpose)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "gpt2"
MODEL_TYPE = "gpt"  # our ModelConfig.type
HF_ARCHITECTURE = "GPT2LMHeadModel"
HF_BASE_PREFIX = "transformer."  # HF names below carry it; files of the base model lack it
HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers of old files

# HF activation_function -> ModelConfig.activation. gelu_new, gelu_pytorch_tanh and gelu_fast are
# all the tanh approximation.
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "gelu": "gelu", "relu": "relu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# Our conf/model names for the published sizes (only a label; the dimensions decide).
_NAMES = {(12, 768): "gpt2_small", (24, 1024): "gpt2_medium", (36, 1280): "gpt2_large",
          (48, 1600): "gpt2_xl"}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """HF GPT2Config (as a dict) -> our ModelConfig fields."""
    bad = []
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        bad.append(f"activation_function={act!r} (supported: {sorted(_ACT_IN)})")
    if not hf.get("scale_attn_weights", True):
        bad.append("scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        bad.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        bad.append("add_cross_attention=true")
    refuse(bad, "this gpt2 config cannot be expressed as our GPT model")
    n_layer, n_embd, n_head, n_pos, vocab = hf_ints(
        hf, ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"), "gpt2")
    return dict(
        name=_NAMES.get((n_layer, n_embd), "gpt2_hf"),
        type=MODEL_TYPE,
        num_layers=n_layer,
        hidden_size=n_embd,
        num_attention_heads=n_head,
        ffn_hidden_size=hf.get("n_inner"),
        seq_length=n_pos,
        max_position_embeddings=n_pos,
        vocab_size=vocab,
        hidden_dropout=hf_float(hf, "resid_pdrop", 0.1, "gpt2"),
        attention_dropout=hf_float(hf, "attn_pdrop", 0.1, "gpt2"),
        normalization="LayerNorm",
        layernorm_epsilon=hf_float(hf, "layer_norm_epsilon", 1e-5, "gpt2"),
        activation=_ACT_IN[act],
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
        init_method_std=hf_float(hf, "initializer_range", 0.02, "gpt2"),
    )


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """ModelConfig -> HF GPT2Config fields (a dict for config.json).

    `base`: the HF config this model was imported from; its non-architecture fields (token ids,
    embd_pdrop, task fields, the spelling of the tanh GeLU) are kept.
    """
    require([
        *family_checks(cfg, MODEL_TYPE, "LayerNorm", "learned_absolute"),
        (cfg.activation in _ACT_OUT, f"model.activation={cfg.activation!r}"),
        (cfg.add_bias_linear, "model.add_bias_linear=false"),
        *mha_checks(cfg),
        (not cfg.apply_residual_connection_post_layernorm,
         "model.apply_residual_connection_post_layernorm=true"),
        (cfg.sliding_window is None,
         f"model.sliding_window={cfg.sliding_window} (GPT-2 has no sliding window)"),
    ], "this model cannot be expressed as HF gpt2")
    out = kept_hf_config(base, HF_MODEL_TYPE)
    act = out.get("activation_function")
    if _ACT_IN.get(act) != cfg.activation:
        act = _ACT_OUT[cfg.activation]
    out.update(
        model_type=HF_MODEL_TYPE,
        architectures=[HF_ARCHITECTURE],
        vocab_size=vocab_size,
        n_positions=cfg.max_positions,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_hidden_size,
        activation_function=act,
        resid_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        add_cross_attention=False,
    )
    out.setdefault("embd_pdrop", cfg.hidden_dropout)
    if not base:  # GPT2Config's default token ids (50256) only exist in the real GPT-2 vocab
        for key in ("bos_token_id", "eos_token_id"):
            out[key] = 50256 if vocab_size > 50256 else None
    return out


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def _qkv_w_to_ours(t, cfg):
    return qkv_rows_to_ours(t.t(), cfg)


def _qkv_w_to_hf(t, cfg):
    return qkv_rows_to_hf(t, cfg).t()


def rules(cfg: ModelConfig) -> List[Rule]:
    p, L, H = HF_BASE_PREFIX, "decoder.layers.{i}.", HF_BASE_PREFIX + "h.{i}."
    out = [
        Rule("embedding.word_embeddings.weight", p + "wte.weight", vocab=True),
        Rule("embedding.position_embeddings.weight", p + "wpe.weight"),
        Rule(L + "input_layernorm.weight", H + "ln_1.weight"),
        Rule(L + "input_layernorm.bias", H + "ln_1.bias"),
        Rule(L + "self_attention.linear_qkv.weight", H + "attn.c_attn.weight",
             _qkv_w_to_ours, _qkv_w_to_hf),
        Rule(L + "self_attention.linear_qkv.bias", H + "attn.c_attn.bias",
             qkv_rows_to_ours, qkv_rows_to_hf),
        Rule(L + "self_attention.linear_proj.weight", H + "attn.c_proj.weight",
             transpose, transpose),
        Rule(L + "self_attention.linear_proj.bias", H + "attn.c_proj.bias"),
        Rule(L + "pre_mlp_layernorm.weight", H + "ln_2.weight"),
        Rule(L + "pre_mlp_layernorm.bias", H + "ln_2.bias"),
        Rule(L + "mlp.linear_fc1.weight", H + "mlp.c_fc.weight", transpose, transpose),
        Rule(L + "mlp.linear_fc1.bias", H + "mlp.c_fc.bias"),
        Rule(L + "mlp.linear_fc2.weight", H + "mlp.c_proj.weight", transpose, transpose),
        Rule(L + "mlp.linear_fc2.bias", H + "mlp.c_proj.bias"),
        Rule("decoder.final_layernorm.weight", p + "ln_f.weight"),
        Rule("decoder.final_layernorm.bias", p + "ln_f.bias"),
    ]
    out.append(output_layer_rule(p + "wte.weight", cfg.share_embeddings_and_output_weights))
    return out


def accepts(cfg: ModelConfig) -> bool:
    """Whether our model has GPT-2's shape (export without a recorded HF source)."""
    return (cfg.type == MODEL_TYPE and cfg.normalization == "LayerNorm"
            and cfg.position_embedding_type == "learned_absolute")


def optional_hf_tensors(cfg: ModelConfig) -> List[str]:
    """HF tensors that may be present and are not needed (the tied LM head of older files)."""
    return ["lm_head.weight"] if cfg.share_embeddings_and_output_weights else []
