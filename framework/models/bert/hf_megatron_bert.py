"""Megatron-BERT (HF `model_type: megatron-bert`, `MegatronBertForPreTraining`) <-> our `bert`
model (megatron-core BertModel, framework/models/bert/model.py).

The two are the same network (Shoeybi et al.'s pre-LN BERT), so the mapping is names and layouts:
* No embedding LayerNorm on either side: word + position + token-type embeddings, then the layers.
* Pre-LN layers: HF `attention.ln` / `ln` -> `input_layernorm` / `pre_mlp_layernorm`; HF's final
  `encoder.ln` -> `encoder.final_layernorm`.
* HF has separate `query`/`key`/`value` Linears (rows = outputs); megatron-core's `linear_qkv`
  interleaves them per query group (for each group: its query heads, its key, its value; see
  framework.models.hf_rules.qkv_parts_to_ours). One rule maps the three HF tensors to one of ours.
* LM head: HF `cls.predictions.transform.{dense,LayerNorm}` -> `lm_head.{dense,layer_norm}`; the
  decoder is tied to the word embeddings (our last pipeline stage holds a copy, `output_layer.
  weight`), its bias `cls.predictions.bias` -> `output_layer.bias` (vocabulary rows, padded).
* Binary head: HF `bert.pooler.dense` (tanh) -> `pooler.dense`, `cls.seq_relationship` ->
  `binary_head`; both exist when model.add_binary_head is on (which also gives the 2 token
  types). HF megatron-bert always has token-type embeddings, so the HF side maps to
  add_binary_head=true (a model with it off is refused on import and export: its token types
  would be lost or invented).

Semantic differences, resolved in the config mapping:
* megatron-core's BertLMHead applies the exact (erf) GeLU regardless of the config, HF the
  config's `hidden_act` in the layers *and* in the head transform: only `hidden_act: gelu` (exact)
  gives the same logits, mapped to our `activation: gelu`; other activations are refused.
* `layer_norm_eps` (HF default 1e-12) -> `layernorm_epsilon` (every norm, the LM head's too).
HF files saved from the base `MegatronBertModel` have no `bert.` prefix; both are read.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from framework.models.hf_rules import (family_checks, hf_float, hf_ints, kept_hf_config, mha_checks,
                                       output_layer_rule, qkv_parts_to_hf, qkv_parts_to_ours,
                                       refuse, require, Rule)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "megatron-bert"
MODEL_TYPE = "bert"  # our ModelConfig.type
HF_ARCHITECTURE = "MegatronBertForPreTraining"
HF_BASE_PREFIX = "bert."  # HF names below carry it (except cls.*); base-model files lack it
HF_IGNORED = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")  # buffers

_ACT_IN = {"gelu": "gelu"}  # the only HF activation that matches mcore's BertLMHead (erf GeLU)
_NAMES = {(12, 768): "bert_base", (24, 1024): "bert_large"}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """HF MegatronBertConfig (as a dict) -> our ModelConfig fields."""
    bad = []
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_IN:
        bad.append(f"hidden_act={act!r} (supported: {sorted(_ACT_IN)}: megatron-core's BERT LM "
                   f"head always uses the exact GeLU)")
    pos = hf.get("position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        bad.append(f"position_embedding_type={pos!r}")
    if int(hf.get("type_vocab_size", 2)) != 2:
        bad.append(f"type_vocab_size={hf.get('type_vocab_size')} (our BERT has 2 token types)")
    if hf.get("is_decoder", False):
        bad.append("is_decoder=true")
    if hf.get("add_cross_attention", False):
        bad.append("add_cross_attention=true")
    if not hf.get("tie_word_embeddings", True):
        bad.append("tie_word_embeddings=false")
    refuse(bad, "this megatron-bert config cannot be expressed as our BERT model")
    layers, hidden, heads, n_pos, vocab = hf_ints(
        hf, ("num_hidden_layers", "hidden_size", "num_attention_heads",
             "max_position_embeddings", "vocab_size"), "megatron-bert")
    inner = hf.get("intermediate_size")
    return dict(
        name=_NAMES.get((layers, hidden), "megatron_bert_hf"),
        type=MODEL_TYPE,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=int(inner) if inner is not None else None,
        seq_length=n_pos,
        max_position_embeddings=n_pos,
        vocab_size=vocab,
        hidden_dropout=hf_float(hf, "hidden_dropout_prob", 0.1, "megatron-bert"),
        attention_dropout=hf_float(hf, "attention_probs_dropout_prob", 0.1, "megatron-bert"),
        normalization="LayerNorm",
        layernorm_epsilon=hf_float(hf, "layer_norm_eps", 1e-12, "megatron-bert"),
        activation=_ACT_IN[act],
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
        init_method_std=hf_float(hf, "initializer_range", 0.02, "megatron-bert"),
        add_binary_head=True,
    )


def _check_expressible(cfg: ModelConfig) -> None:
    require([
        *family_checks(cfg, MODEL_TYPE, "LayerNorm", "learned_absolute"),
        (cfg.activation in _ACT_IN.values(), f"model.activation={cfg.activation!r}"),
        (cfg.add_bias_linear, "model.add_bias_linear=false"),
        *mha_checks(cfg),
        (not cfg.apply_residual_connection_post_layernorm,
         "model.apply_residual_connection_post_layernorm=true"),
        (cfg.share_embeddings_and_output_weights,
         "model.share_embeddings_and_output_weights=false"),
        (cfg.add_binary_head, "model.add_binary_head=false (HF megatron-bert always has token "
                              "types and a pooler)"),
    ], "this model cannot be expressed as HF megatron-bert")


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """ModelConfig -> HF MegatronBertConfig fields (a dict for config.json).

    `base`: the HF config this model was imported from; its non-architecture fields (token ids,
    task fields) are kept.
    """
    _check_expressible(cfg)
    out = kept_hf_config(base, HF_MODEL_TYPE)
    out.update(
        model_type=HF_MODEL_TYPE,
        architectures=[HF_ARCHITECTURE],
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=2,
        initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=True,
        is_decoder=False,
        add_cross_attention=False,
    )
    out.pop("position_embedding_type", None)
    if not base:
        out["pad_token_id"] = 0 if vocab_size > 0 else None  # MegatronBertConfig's default
    return out


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def rules(cfg: ModelConfig) -> List[Rule]:
    p, L, H = HF_BASE_PREFIX, "encoder.layers.{i}.", HF_BASE_PREFIX + "encoder.layer.{i}."

    def wb(ours: str, hf: str, **kw) -> List[Rule]:
        return [Rule(ours + ".weight", hf + ".weight", **kw), Rule(ours + ".bias", hf + ".bias",
                                                                   **kw)]

    qkv = H + "attention.self."
    out = [
        Rule("embedding.word_embeddings.weight", p + "embeddings.word_embeddings.weight",
             vocab=True),
        Rule("embedding.position_embeddings.weight", p + "embeddings.position_embeddings.weight"),
        *wb(L + "input_layernorm", H + "attention.ln"),
        Rule(L + "self_attention.linear_qkv.weight",
             tuple(qkv + x + ".weight" for x in ("query", "key", "value")), qkv_parts_to_ours,
             qkv_parts_to_hf),
        Rule(L + "self_attention.linear_qkv.bias",
             tuple(qkv + x + ".bias" for x in ("query", "key", "value")), qkv_parts_to_ours,
             qkv_parts_to_hf),
        *wb(L + "self_attention.linear_proj", H + "attention.output.dense"),
        *wb(L + "pre_mlp_layernorm", H + "ln"),
        *wb(L + "mlp.linear_fc1", H + "intermediate.dense"),
        *wb(L + "mlp.linear_fc2", H + "output.dense"),
        *wb("encoder.final_layernorm", p + "encoder.ln"),
        *wb("lm_head.dense", "cls.predictions.transform.dense"),
        *wb("lm_head.layer_norm", "cls.predictions.transform.LayerNorm"),
        Rule("output_layer.bias", "cls.predictions.bias", vocab=True),
        output_layer_rule(p + "embeddings.word_embeddings.weight", tied=True),
    ]
    if cfg.add_binary_head:
        out += [
            Rule("embedding.tokentype_embeddings.weight",
                 p + "embeddings.token_type_embeddings.weight"),
            *wb("pooler.dense", p + "pooler.dense"),
            *wb("binary_head", "cls.seq_relationship"),
        ]
    return out


def optional_hf_tensors(cfg: ModelConfig) -> List[str]:
    """HF tensors that may be present and are not needed: the tied decoder (older files store
    it), and the heads a model without the binary head lacks."""
    out = ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"]
    if not cfg.add_binary_head:
        out += [HF_BASE_PREFIX + "pooler.dense.weight", HF_BASE_PREFIX + "pooler.dense.bias",
                "cls.seq_relationship.weight", "cls.seq_relationship.bias"]
    return out
