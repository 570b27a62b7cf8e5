"""Llama-style decoders (HF `model_type` llama, qwen2, qwen3, mistral) <-> our `gpt` model (mcore
GPTModel).

All three are one architecture in megatron-core terms: pre-norm RMSNorm, SwiGLU MLP, RoPE, GQA, no
linear biases, tied or untied embeddings. What tells them apart is config, not structure:
* Qwen2: biases on q/k/v only (HF hard-codes them) -> `add_qkv_bias: true` with
  `add_bias_linear: false`. Optional sliding-window layers (`use_sliding_window`, the layers
  from `max_window_layers` on, or those `layer_types` marks "sliding_attention").
* Qwen3: no q/k/v biases; an RMSNorm over each query and key head after the projection and
  before RoPE (`q_norm` / `k_norm`, head_dim wide) -> `model.qk_layernorm: true`, mcore's
  `q_layernorm` / `k_layernorm`; head_dim is given (128, wider than hidden / heads at 0.6B).
  `attention_bias: true` (biases on q/k/v and o_proj) is refused. Sliding window as Qwen2.
* Mistral: `sliding_window` (4096 in v0.1, null from v0.3).
* Llama: `attention_bias` / `mlp_bias` (both false in every published Llama; refused when true),
  Llama-3 RoPE scaling (`rope_type: llama3` -> model.rope_scaling*, framework/models/gpt/rope_scaling.py).

Sliding windows -> `model.sliding_window` (W) and `model.sliding_window_layers` (null = every
layer, Mistral; Qwen's windowed layers otherwise), applied by our core attention
(framework/models/layers.py SDPAttention; megatron-core 0.16 takes `window_size` only through
Transformer Engine). Exports write them back: Mistral windows every layer, Qwen2/Qwen3 the layers
from `max_window_layers` on (other sets are refused), Llama has no window (refused).

Layouts (HF nn.Linear weights are [out, in], as mcore's):
* q_proj/k_proj/v_proj -> `linear_qkv`, interleaved per query group as mcore splits it (for each
  group: its query heads, then its key head, then its value head), weights and Qwen2's biases.
* gate_proj/up_proj -> `linear_fc1` = [gate; up] (mcore's SwiGLU: silu(first half) * second half),
  cut per half for TP (`Rule.glu`).
* o_proj -> linear_proj, down_proj -> linear_fc2, input_layernorm / post_attention_layernorm ->
  input_layernorm / pre_mlp_layernorm, model.norm -> decoder.final_layernorm, lm_head ->
  output_layer (tied: a copy of embed_tokens on the last pipeline stage).
HF's rotate-half RoPE is mcore's non-interleaved RoPE, so q/k rows need no permutation (unlike
Meta's original checkpoints, which HF's own conversion script permutes).

This module serves llama; `variant("qwen2")`, `variant("qwen3")` and `variant("mistral")` bind
the same functions to those model types (module objects of the same interface, framework/models/gpt/__init__.py).
"""
from __future__ import annotations

import re
import types
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from framework.errors import InteropError
from framework.models.hf_rules import (REQUIRED, glu_to_hf, glu_to_ours, hf_float, hf_ints,
                                       kept_hf_config, output_layer_rule, qkv_parts_to_hf,
                                       qkv_parts_to_ours, refuse, require, Rule)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "llama"
MODEL_TYPE = "gpt"
HF_ARCHITECTURE = "LlamaForCausalLM"
HF_BASE_PREFIX = "model."
# rotary caches some old files carry (HF recomputes them)
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
_QKV_BIAS = {"llama": False, "qwen2": True, "qwen3": False, "mistral": False}
# head_dim where config.json leaves it out: Qwen3Config's default (the others derive it)
_DEFAULT_HEAD_DIM = {"qwen3": 128}
# per-head q/k RMSNorm (model.qk_layernorm)
_QK_NORM = {"llama": False, "qwen2": False, "qwen3": True, "mistral": False}
# HF rope_type values: "default" (plain RoPE) and "llama3" are expressible
_ROPE_TYPES = (None, "default", "llama3")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def _rope(hf: Dict[str, Any]) -> Dict[str, Any]:
    """theta and scaling from either spelling: transformers 5 `rope_parameters` (theta inside)
    or the older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and not params.get("rope_type"):
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    if "type" in params and "rope_type" not in params:  # very old spelling
        params["rope_type"] = params["type"]
    return params


def _sliding_window(hf: Dict[str, Any], model_type: str, layers: int) -> Dict[str, Any]:
    """The model.sliding_window / sliding_window_layers fields of an HF config, read as HF's
    modelling code does: Mistral windows every layer when `sliding_window` is set; Qwen2/Qwen3
    only with `use_sliding_window`, on the layers `layer_types` marks "sliding_attention" (HF 5
    writes it), else on those from `max_window_layers` (default 28) on; Llama has none."""
    none = dict(sliding_window=None, sliding_window_layers=None)
    types = hf.get("layer_types")
    if model_type == "llama":
        return none
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        if types and "sliding_attention" in types:  # HF fails at its first forward
            raise InteropError(f"{model_type} config: layer_types marks sliding_attention "
                               f"layers but use_sliding_window is false (no window to use)")
        return none
    # MistralConfig's default is 4096 where config.json leaves the key out
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None)
    if window is None:
        return none
    window = hf_ints({"sliding_window": window}, ("sliding_window",), model_type)[0]
    if window <= 0:
        raise InteropError(f"{model_type} config: sliding_window={window} must be positive")
    if model_type in ("qwen2", "qwen3"):
        if types:
            windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
        else:
            start = hf_ints({"max_window_layers": hf.get("max_window_layers", 28)},
                            ("max_window_layers",), model_type)[0]
            windowed = list(range(start, layers))
        if not windowed:
            return none
        if windowed != list(range(layers)):
            return dict(sliding_window=window, sliding_window_layers=windowed)
    return dict(sliding_window=window, sliding_window_layers=None)


def sliding_window_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """model.sliding_window / sliding_window_layers of an HF config of this family ({} for
    another model_type, or a config without a layer count)."""
    model_type = hf.get("model_type")
    layers = hf.get("num_hidden_layers")
    if model_type not in _QKV_BIAS or not isinstance(layers, int):
        return {}
    return _sliding_window(hf, model_type, layers)


def _hf_config_to_fields(hf: Dict[str, Any], model_type: str) -> Dict[str, Any]:
    """HF config (as a dict) of `model_type` -> our ModelConfig fields."""
    bad = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        bad.append(f"hidden_act={act!r} (SwiGLU needs silu)")
    if model_type in ("llama", "qwen3"):
        if hf.get("attention_bias", False):
            bad.append("attention_bias=true (o_proj bias)")
        if hf.get("mlp_bias", False):
            bad.append("mlp_bias=true")
    rope = _rope(hf)
    rope_type = rope.get("rope_type")
    if rope_type not in _ROPE_TYPES:
        bad.append(f"rope_type={rope_type!r} (supported: default, llama3)")
    theta = hf_float(rope, "rope_theta", REQUIRED, model_type)
    if theta != int(theta):
        bad.append(f"rope_theta={theta} (model.rotary_base is an integer)")
    refuse(bad, f"this {model_type} config cannot be expressed as our GPT model")
    layers, hidden, heads, vocab, ffn, n_pos = hf_ints(
        hf, ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
             "intermediate_size", "max_position_embeddings"), model_type)
    groups = hf_ints(hf, ("num_key_value_heads",), model_type)[0] \
        if hf.get("num_key_value_heads") else heads
    head_dim = hf_ints(hf, ("head_dim",), model_type)[0] if hf.get("head_dim") else \
        _DEFAULT_HEAD_DIM.get(model_type)
    kv_channels = head_dim if head_dim and head_dim * heads != hidden else None
    if kv_channels is None and hidden % heads:
        raise InteropError(f"{model_type} config: hidden_size={hidden} is not a multiple of "
                           f"num_attention_heads={heads} and head_dim is not given")
    window = _sliding_window(hf, model_type, layers)
    scaling = rope_type == "llama3"
    extra: Dict[str, Any] = {}
    if scaling:
        try:
            extra = dict(
                rope_scaling_factor=float(rope["factor"]),
                rope_scaling_low_freq_factor=float(rope["low_freq_factor"]),
                rope_scaling_high_freq_factor=float(rope["high_freq_factor"]),
                rope_scaling_original_max_position_embeddings=int(
                    rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InteropError(f"{model_type} config: rope_type llama3 lacks a valid {e}") from None
    return dict(
        name=f"{model_type}_hf",
        type=MODEL_TYPE,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None,
        ffn_hidden_size=ffn,
        kv_channels=kv_channels,
        seq_length=n_pos,
        **window,
        max_position_embeddings=n_pos,
        vocab_size=vocab,
        hidden_dropout=0.0,
        attention_dropout=hf_float(hf, "attention_dropout", 0.0, model_type),
        normalization="RMSNorm",
        layernorm_epsilon=hf_float(hf, "rms_norm_eps", 1e-6, model_type),
        activation="swiglu",
        add_bias_linear=False,
        add_qkv_bias=_QKV_BIAS[model_type],
        qk_layernorm=_QK_NORM[model_type],
        position_embedding_type="rope",
        rotary_percent=hf_float(rope, "partial_rotary_factor", 1.0, model_type),
        rotary_base=int(theta),
        rope_scaling=scaling,
        **extra,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf_float(hf, "initializer_range", 0.02, model_type),
    )


def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    return _hf_config_to_fields(hf, HF_MODEL_TYPE)


def accepts(cfg: ModelConfig, model_type: str = HF_MODEL_TYPE) -> bool:
    """Whether our model has this family's shape (export without a recorded HF source). A
    sliding window on every layer is a Mistral (chosen by shape only then); Llama has none."""
    shape = (cfg.type == MODEL_TYPE and cfg.normalization == "RMSNorm"
             and cfg.activation == "swiglu" and cfg.position_embedding_type == "rope"
             and not cfg.add_bias_linear and cfg.add_qkv_bias == _QKV_BIAS[model_type]
             and cfg.qk_layernorm == _QK_NORM[model_type])
    if model_type == "mistral":  # otherwise a Llama shape is a Llama
        return shape and cfg.sliding_window is not None
    return shape and _window_problem(cfg, model_type) is None


def _window_problem(cfg: ModelConfig, model_type: str) -> Optional[str]:
    """Why HF `model_type` cannot express the model's sliding window, or None."""
    w, layers = cfg.sliding_window, cfg.sliding_window_layers
    if model_type == "mistral":
        return None if layers is None else (
            f"model.sliding_window_layers={list(layers)} (Mistral windows every layer)")
    if w is None:
        return None
    if model_type == "llama":
        return f"model.sliding_window={w} (Llama has no sliding window)"
    n = cfg.num_layers
    if layers is not None and sorted(layers) != list(range(min(layers), n)):
        return (f"model.sliding_window_layers={list(layers)} ({model_type} windows the layers "
                f"from max_window_layers to the last)")
    return None


def _window_fields(cfg: ModelConfig, model_type: str) -> Dict[str, Any]:
    """The HF config fields of the model's sliding window (none for Llama)."""
    w, layers, n = cfg.sliding_window, cfg.sliding_window_layers, cfg.num_layers
    if model_type in ("llama", "mistral"):
        return dict(sliding_window=w)
    if w is None:
        return dict(use_sliding_window=False, sliding_window=None)
    start = 0 if layers is None else min(layers)
    return dict(use_sliding_window=True, sliding_window=w, max_window_layers=start,
                layer_types=["sliding_attention" if i >= start else "full_attention"
                             for i in range(n)])


def _model_config_to_hf_config(cfg: ModelConfig, model_type: str, *, vocab_size: int,
                               base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    heads = cfg.num_attention_heads
    # spelled out, not hf_rules.family_checks: here the activation is reported before the
    # position embedding
    require([
        (cfg.type == MODEL_TYPE, f"model.type={cfg.type!r} (needs {MODEL_TYPE!r})"),
        (cfg.normalization == "RMSNorm", f"model.normalization={cfg.normalization!r}"),
        (cfg.activation == "swiglu", f"model.activation={cfg.activation!r}"),
        (cfg.position_embedding_type == "rope",
         f"model.position_embedding_type={cfg.position_embedding_type!r}"),
        (not cfg.add_bias_linear, "model.add_bias_linear=true"),
        (cfg.add_qkv_bias == _QKV_BIAS[model_type],
         f"model.add_qkv_bias={cfg.add_qkv_bias} ({model_type} has "
         f"{'' if _QKV_BIAS[model_type] else 'no '}q/k/v biases)"),
        (cfg.qk_layernorm == _QK_NORM[model_type],
         f"model.qk_layernorm={str(cfg.qk_layernorm).lower()} ({model_type} has "
         f"{'' if _QK_NORM[model_type] else 'no '}q/k norms)"),
        (not cfg.apply_residual_connection_post_layernorm,
         "model.apply_residual_connection_post_layernorm=true"),
        (cfg.softmax_scale is None, f"model.softmax_scale={cfg.softmax_scale}"),
        (_window_problem(cfg, model_type) is None, _window_problem(cfg, model_type)),
    ], f"this model cannot be expressed as HF {model_type}")
    out = kept_hf_config(base, model_type)
    kept = bool(out)  # a recorded source of this model type
    for key in ("rope_theta", "rope_scaling", "rope_parameters", "architectures"):
        out.pop(key, None)
    rope: Dict[str, Any] = {"rope_type": "llama3" if cfg.rope_scaling else "default",
                            "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_scaling:
        rope.update(factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_scaling_low_freq_factor,
                    high_freq_factor=cfg.rope_scaling_high_freq_factor,
                    original_max_position_embeddings=
                    cfg.rope_scaling_original_max_position_embeddings)
    if cfg.rotary_percent != 1.0:
        rope["partial_rotary_factor"] = cfg.rotary_percent
    out.update(
        model_type=model_type,
        architectures=[ARCHITECTURES[model_type]],
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std,
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        rope_parameters=rope,
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "qwen3":
        out.update(attention_bias=False)
    if model_type == "qwen2" and cfg.kv_channels in (None, cfg.hidden_size // heads) \
            and "head_dim" not in (base or {}):
        del out["head_dim"]  # Qwen2Config has no head_dim field (HF derives it)
    # The window: ours, unless there is none and a source of this type is recorded: a checkpoint
    # imported before model.sliding_window existed capped its sequence at the window instead of
    # recording it (framework/checkpoint/reader.py reads the window back from that source).
    if cfg.sliding_window is not None or not kept:
        out.update(_window_fields(cfg, model_type))
    if not kept:
        for key in ("bos_token_id", "eos_token_id"):
            out.setdefault(key, None)
    return out


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return _model_config_to_hf_config(cfg, HF_MODEL_TYPE, vocab_size=vocab_size, base=base)


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def _rules(cfg: ModelConfig, qkv_bias: bool) -> List[Rule]:
    """The tensors of the family; Qwen2's q/k/v biases with `qkv_bias`, Qwen3's per-head q/k
    norm weights with `model.qk_layernorm` (head_dim wide, the same on every TP rank)."""
    p, L, H = HF_BASE_PREFIX, "decoder.layers.{i}.", HF_BASE_PREFIX + "layers.{i}."
    att = H + "self_attn."
    out = [
        Rule("embedding.word_embeddings.weight", p + "embed_tokens.weight", vocab=True),
        Rule(L + "input_layernorm.weight", H + "input_layernorm.weight"),
        Rule(L + "self_attention.linear_qkv.weight",
             tuple(att + x + ".weight" for x in ("q_proj", "k_proj", "v_proj")),
             qkv_parts_to_ours, qkv_parts_to_hf),
        Rule(L + "self_attention.linear_proj.weight", att + "o_proj.weight"),
        Rule(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        Rule(L + "mlp.linear_fc1.weight",
             (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), glu_to_ours, glu_to_hf,
             glu=True),
        Rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
        Rule("decoder.final_layernorm.weight", p + "norm.weight"),
    ]
    if qkv_bias:
        out.append(Rule(L + "self_attention.linear_qkv.bias",
                        tuple(att + x + ".bias" for x in ("q_proj", "k_proj", "v_proj")),
                        qkv_parts_to_ours, qkv_parts_to_hf))
    if cfg.qk_layernorm:
        out += [Rule(L + "self_attention.q_layernorm.weight", att + "q_norm.weight"),
                Rule(L + "self_attention.k_layernorm.weight", att + "k_norm.weight")]
    out.append(output_layer_rule(p + "embed_tokens.weight",
                                 cfg.share_embeddings_and_output_weights))
    return out


def rules(cfg: ModelConfig) -> List[Rule]:
    return _rules(cfg, cfg.add_qkv_bias)


def optional_hf_tensors(cfg: ModelConfig) -> List[str]:
    """A tied model's file may still carry lm_head.weight (a copy of embed_tokens)."""
    return ["lm_head.weight"] if cfg.share_embeddings_and_output_weights else []


def variant(model_type: str) -> types.ModuleType:
    """This module's interface bound to another HF `model_type` of the family (qwen2, qwen3,
    mistral): a module object with the same names, so the interop layer treats it like
    `hf_llama`.

    A Mistral is chosen by shape only for a sliding window on every layer: otherwise it is a
    Llama shape, exported as llama unless the checkpoint records a mistral source (or
    megatron-to-hf --hf-model-type mistral)."""
    mod = types.ModuleType(f"{__name__}[{model_type}]", f"HF model_type {model_type!r} "
                           f"({ARCHITECTURES[model_type]}) <-> gpt: the mapping of {__name__}")
    mod.__dict__.update(
        HF_MODEL_TYPE=model_type, HF_ARCHITECTURE=ARCHITECTURES[model_type],
        MODEL_TYPE=MODEL_TYPE, HF_BASE_PREFIX=HF_BASE_PREFIX, HF_IGNORED=HF_IGNORED,
        rules=rules, optional_hf_tensors=optional_hf_tensors,
        hf_config_to_fields=lambda hf: _hf_config_to_fields(hf, model_type),
        model_config_to_hf_config=lambda cfg, *, vocab_size, base=None:
            _model_config_to_hf_config(cfg, model_type, vocab_size=vocab_size, base=base),
        accepts=lambda cfg: accepts(cfg, model_type))
    return mod
