"""Hugging Face <-> megatron-core weight interoperability.

Each model family maps its Hugging Face model types in its own folder
(framework/models/<family>/hf_*.py, listed in its `ModelSpec`): one small module with a config
mapping and a name mapping:

    HF_MODEL_TYPE, MODEL_TYPE, HF_ARCHITECTURE, HF_BASE_PREFIX, HF_IGNORED
    hf_config_to_fields(hf: dict) -> dict                                 (ModelConfig fields)
    model_config_to_hf_config(cfg, *, vocab_size, base=None) -> dict      (config.json)
    rules(cfg) -> List[Rule]                                   (see framework.models.hf_rules)
    optional_hf_tensors(cfg) -> List[str]
    resolve_with_tensors(cfg, names) -> ModelConfig                       (optional)
    accepts(cfg) -> bool     (optional: exported by shape when several types share a family)

`family(hf_model_type)` finds the module through the registry (framework/models/registry.py).

Public API used by train.py and data_tools/convert.py:
    load_hf_into_model(hf_dir, model_chunks, model_cfg, *, allow_pickle=False)
    hf_config_to_model_config(hf_config, **overrides) -> ModelConfig
    model_config_to_hf_config(model_cfg, *, vocab_size, base=None) -> dict
    hf_state_dict_from_megatron(state, model_cfg, *, vocab_size, dtype=None) -> {name: tensor}
    save_hf_checkpoint(save_dir, tensors, hf_config, *, max_shard_size)
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, List, Optional

from framework.config import ModelConfig
from framework.errors import ConfigError, InteropError
from framework.models import registry
from framework.models.hf_rules import (expand, export_from_state, import_into_chunks,
                                        iter_hf_names)
from framework.models.wrappers import unwrap

PLANNED: tuple = ()  # model types we intend to add; listed in the unsupported-type error

__all__ = ["InteropError", "check_supported", "family", "family_for_model", "supported",
           "check_hf_shapes",
           "hf_config_to_model_config", "model_config_to_hf_config", "load_hf_into_model",
           "hf_state_dict_from_megatron", "save_hf_checkpoint", "vocab_tensor_names"]


def supported() -> List[str]:
    return registry.hf_types()


def _as_dict(hf_config: Any) -> Dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    raise InteropError(f"expected an HF config (dict or PretrainedConfig), got "
                       f"{type(hf_config).__name__}")


def check_supported(hf_model_type: Optional[str]) -> None:
    """A one-line error listing the supported types unless a family maps `hf_model_type`
    (reads the registry only: imports nothing heavy)."""
    if registry.hf_owner(hf_model_type) is None:
        what = "has no model_type" if hf_model_type is None else \
            f"model_type {hf_model_type!r} is not supported"
        raise InteropError(f"the Hugging Face config {what}; supported: "
                           f"{', '.join(supported())} (planned: "
                           f"{', '.join(t for t in PLANNED if t not in supported()) or 'none'})")


def family(hf_model_type: Optional[str]) -> ModuleType:
    """The mapping module for an HF `model_type`; a one-line error listing the supported ones."""
    check_supported(hf_model_type)
    spec, hf_type = registry.hf_owner(hf_model_type)
    return spec.parts().hf[hf_type]


def family_for_model(model_cfg: ModelConfig, hf_model_type: Optional[str] = None) -> ModuleType:
    """The family to export our model with: `hf_model_type` if given (e.g. the type it was
    imported from), else the only family whose MODEL_TYPE is `model_cfg.type`."""
    if hf_model_type is not None:
        fam = family(hf_model_type)
        if fam.MODEL_TYPE != model_cfg.type:
            raise InteropError(f"HF {hf_model_type} models are our model.type="
                               f"{fam.MODEL_TYPE!r}, not {model_cfg.type!r}")
        return fam
    matches = list(registry.family(model_cfg.type).hf_types)
    if model_cfg.type in matches:  # several (t5, mt5): the one named as our model type
        matches = [model_cfg.type]
    if len(matches) > 1:  # several (gpt2, llama, qwen2, qwen3, mistral): those that accept the shape
        # (none: the first, gpt2, whose export then names what it cannot express)
        matches = [t for t in matches
                   if getattr(family(t), "accepts", lambda cfg: True)(model_cfg)] or matches[:1]
    if len(matches) != 1:
        raise InteropError(f"no single Hugging Face family for model.type={model_cfg.type!r} "
                           f"(candidates: {matches or 'none'}; supported: "
                           f"{', '.join(supported())})")
    return family(matches[0])


def hf_config_to_model_config(hf_config: Any, **overrides: Any) -> ModelConfig:
    """HF config (dict or PretrainedConfig) -> our ModelConfig; `overrides` replace fields
    (e.g. make_vocab_size_divisible_by=128, seq_length=512)."""
    d = _as_dict(hf_config)
    return ModelConfig(**{**family(d.get("model_type")).hf_config_to_fields(d), **overrides})


def model_config_to_hf_config(model_cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None,
                              hf_model_type: Optional[str] = None) -> Dict[str, Any]:
    """Our ModelConfig -> HF config.json fields. `base`: the HF config it was imported from."""
    if hf_model_type is None and base:
        hf_model_type = base.get("model_type")
    fam = family_for_model(model_cfg, hf_model_type)
    return fam.model_config_to_hf_config(model_cfg, vocab_size=vocab_size, base=base)


# Architecture fields that must agree between an HF model and the model it is loaded into,
# compared through their resolved values (None -> derived default).
def _arch(cfg: ModelConfig) -> Dict[str, Any]:
    heads = cfg.num_attention_heads
    return {
        "type": cfg.type, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": heads, "num_query_groups": cfg.num_query_groups or heads,
        "ffn_hidden_size": cfg.ffn, "kv_channels": cfg.kv_channels or cfg.hidden_size // heads,
        "max_position_embeddings": cfg.max_positions
        if cfg.position_embedding_type == "learned_absolute" else None,
        "normalization": cfg.normalization, "layernorm_epsilon": cfg.layernorm_epsilon,
        "activation": cfg.activation, "add_bias_linear": cfg.add_bias_linear,
        "qk_layernorm": cfg.qk_layernorm,
        "position_embedding_type": cfg.position_embedding_type,
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
        "apply_residual_connection_post_layernorm": cfg.apply_residual_connection_post_layernorm,
        "add_binary_head": cfg.add_binary_head,
        "encoder_num_layers": cfg.enc_layers if registry.family(cfg.type).encoder_decoder
        else None,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets
        if cfg.position_embedding_type == "relative" else None,
        "relative_attention_max_distance": cfg.relative_attention_max_distance
        if cfg.position_embedding_type == "relative" else None,
        "softmax_scale": cfg.softmax_scale, "scale_decoder_output": cfg.scale_decoder_output,
        "lm_head_bias": cfg.lm_head_bias,
        "add_qkv_bias": cfg.add_qkv_bias,
        "sliding_window": cfg.sliding_window,
        "sliding_window_layers": cfg.sliding_window_layers,
        **({"rotary_base": cfg.rotary_base, "rotary_percent": cfg.rotary_percent,
            "rope_scaling": cfg.rope_scaling}
           if cfg.position_embedding_type == "rope" else {}),
        **({"rope_scaling_factor": cfg.rope_scaling_factor,
            "rope_scaling_low_freq_factor": cfg.rope_scaling_low_freq_factor,
            "rope_scaling_high_freq_factor": cfg.rope_scaling_high_freq_factor,
            "rope_scaling_original_max_position_embeddings":
                cfg.rope_scaling_original_max_position_embeddings}
           if cfg.position_embedding_type == "rope" and cfg.rope_scaling else {}),
    }


def with_hf_tensors(fam: ModuleType, cfg: ModelConfig, weights) -> ModelConfig:
    """`cfg` completed from the tensor names of the HF files, for families whose config.json
    does not tell everything (optional `resolve_with_tensors(cfg, names)`; e.g. T5 v1.1 / mT5:
    transformers 5 writes tie_word_embeddings=true whether or not the file has an lm_head)."""
    resolve = getattr(fam, "resolve_with_tensors", None)
    return resolve(cfg, set(weights.keys())) if resolve is not None else cfg


def check_same_architecture(hf_cfg: ModelConfig, model_cfg: ModelConfig, where: str) -> None:
    a, b = _arch(hf_cfg), _arch(model_cfg)
    diffs = [f"model.{k}: hf={a[k]!r} config={b[k]!r}" for k in a if a[k] != b[k]]
    if model_cfg.vocab_size is not None and model_cfg.vocab_size != hf_cfg.vocab_size:
        diffs.append(f"model.vocab_size: hf={hf_cfg.vocab_size} config={model_cfg.vocab_size}")
    if diffs:
        raise InteropError(f"{where} does not match the model config: " + "; ".join(diffs))


def _resolver(weights, fam, model_cfg: ModelConfig):
    """Check the HF tensor names against the family's rules; return name -> file name."""
    prefix = fam.HF_BASE_PREFIX
    expected = set(iter_hf_names(fam.rules(model_cfg), model_cfg.num_layers))
    optional = set(fam.optional_hf_tensors(model_cfg))
    present = set(weights.keys())
    where = {}
    unexpected = []
    for key in present:
        if fam.HF_IGNORED.search(key):
            continue
        name = key if (key in expected or key in optional) else prefix + key
        if name in expected:
            where[name] = key
        elif name not in optional:
            unexpected.append(key)
    missing = sorted(expected - set(where))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            unexpected.sort()
            parts.append(f"unexpected {', '.join(unexpected[:4])}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
        raise InteropError(f"{weights.dir}: tensors do not match a {fam.HF_MODEL_TYPE} model "
                           f"with this config ({'; '.join(parts)})")
    return where


def _check_vocab_rows(weights, fam, model_cfg: ModelConfig, where: Dict[str, str]) -> None:
    """The HF tensors whose dim 0 is the vocabulary have config.json's vocab_size rows (the
    import pads them to the model's padded vocabulary, so a config/weights mismatch would
    otherwise load: zero rows taken for real tokens, or real tokens taken for padding)."""
    for _ours, hf, rule in expand(fam.rules(model_cfg), model_cfg.num_layers):
        if not rule.vocab or not isinstance(hf, str) or hf not in where:
            continue
        rows = weights.shape(where[hf])[0]
        if rows != model_cfg.vocab_size:
            raise InteropError(f"{weights.dir}: {where[hf]} has {rows} vocabulary rows but "
                               f"config.json says vocab_size={model_cfg.vocab_size}")


def _import(chunks, fam, model_cfg: ModelConfig, where: Dict[str, str], get, *, tp_rank: int,
            tp_size: int, hf_dir: str) -> int:
    """`import_into_chunks`; a tensor whose shape the family's reshapes cannot take (e.g. k/v
    rows for another num_key_value_heads than config.json's) is an InteropError naming it."""
    asked: List[str] = []

    def fetch(name: str):
        asked.append(name)
        return get(where[name])

    try:
        return import_into_chunks(chunks, fam.rules(model_cfg), model_cfg, fetch,
                                  tp_rank=tp_rank, tp_size=tp_size)
    except ConfigError:  # InteropError and the like: one line already
        raise
    except (RuntimeError, ValueError) as e:
        if not asked:
            raise
        group = [asked[-1]]
        for _ours, hf, _rule in expand(fam.rules(model_cfg), model_cfg.num_layers):
            if isinstance(hf, tuple) and asked[-1] in hf:
                group = list(hf)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InteropError(f"{hf_dir}: " + ", ".join(
            f"{where[n]} {list(_shape_of(get, where[n]))}" for n in group)
            + f" do not fit the model that config.json describes ({why})") from None


def _shape_of(get, name: str) -> tuple:
    return tuple(get(name).shape)


def check_hf_shapes(weights, fam: ModuleType, model_cfg: ModelConfig, padded_vocab: int) -> None:
    """Before the model is built for real: every tensor of the HF files (`weights`, an
    HFWeights) has the shape that config.json (`model_cfg`) gives it. The model is built on the
    meta device (no memory, no init) and the import run on meta tensors of the files' shapes
    (their headers only), so a mismatch is the one-line InteropError of the real import,
    without the cost of building a full-size model first. Needs a one-process megatron parallel
    state (TP1, PP1)."""
    import torch

    from framework.interop.megatron_files import build_on_meta

    where = _resolver(weights, fam, model_cfg)
    _check_vocab_rows(weights, fam, model_cfg, where)
    try:
        chunks = build_on_meta(model_cfg, padded_vocab)
    except NotImplementedError:  # an operation without a meta kernel: the real import checks
        return                   # the same shapes, after the build

    def meta(name: str):
        return torch.empty(weights.shape(name), dtype=torch.float32, device="meta")

    _import([unwrap(m) for m in chunks], fam, model_cfg, where, meta, tp_rank=0, tp_size=1,
            hf_dir=weights.dir)


def load_hf_into_model(hf_dir: str, model_chunks, model_cfg: ModelConfig, *,
                       allow_pickle: bool = False) -> Dict[str, Any]:
    """Copy the weights of the HF model in `hf_dir` into this rank's already-built model chunks.

    Works at any TP/PP/VPP layout: each rank reads only the tensors of its own chunks (lazily,
    from safetensors) and keeps its tensor-parallel part; vocabulary rows are zero-padded to the
    model's padded vocabulary; the last pipeline stage's copy of tied embeddings is filled too.
    The HF architecture must match `model_cfg` (InteropError lists the differing fields).
    Call it before building a mixed-precision optimizer, or call `optimizer.reload_model_params()`
    afterwards: megatron-core's fp32 main params are copied from the model when it is built.
    Returns {"model_type", "format", "tensors" (number copied on this rank), "vocab_size"}.
    """
    from megatron.core import parallel_state as ps

    fam, weights, hf_model_cfg, where = _open_hf_source(hf_dir, model_cfg, allow_pickle)
    chunks = [unwrap(m) for m in model_chunks]
    n = _import(chunks, fam, model_cfg, where, weights.get,
                tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=ps.get_tensor_model_parallel_world_size(), hf_dir=hf_dir)
    return {"model_type": fam.HF_MODEL_TYPE, "format": weights.format, "tensors": n,
            "vocab_size": hf_model_cfg.vocab_size}


def check_hf_source(hf_dir: str, model_cfg: ModelConfig, *, allow_pickle: bool = False) -> None:
    """Every check `load_hf_into_model` makes before it copies a tensor (the directory, its
    config.json, the weight files and their index, the architecture against `model_cfg`, the
    vocabulary rows), without building a model: `checkpoint.load_hf` is checked when the run
    is planned, before any worker starts (InteropError, one line)."""
    _open_hf_source(hf_dir, model_cfg, allow_pickle)


def _open_hf_source(hf_dir: str, model_cfg: ModelConfig, allow_pickle: bool):
    """(family module, HFWeights, the HF model's ModelConfig, tensor resolver) of `hf_dir`,
    checked against `model_cfg`."""
    from framework.interop.hf_files import HFWeights, read_hf_config

    hf = read_hf_config(hf_dir)
    fam = family(hf.get("model_type"))
    weights = HFWeights(hf_dir, allow_pickle=allow_pickle)
    hf_model_cfg = with_hf_tensors(fam, hf_config_to_model_config(hf), weights)
    check_same_architecture(hf_model_cfg, model_cfg, f"the Hugging Face model in {hf_dir}")
    where = _resolver(weights, fam, model_cfg)
    _check_vocab_rows(weights, fam, hf_model_cfg, where)
    return fam, weights, hf_model_cfg, where


def hf_state_dict_from_megatron(state: Dict[str, Any], model_cfg: ModelConfig, *,
                                vocab_size: int, dtype=None,
                                hf_model_type: Optional[str] = None) -> Dict[str, Any]:
    """A full (TP=1, PP=1) state dict of our model -> the HF tensors (padding stripped)."""
    import torch

    fam = family_for_model(model_cfg, hf_model_type)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return export_from_state(tensors, fam.rules(model_cfg), model_cfg, vocab_size, dtype)


def vocab_tensor_names(model_cfg: ModelConfig) -> List[str]:
    """Our parameter names whose dim 0 is the (padded) vocabulary."""
    fams = [family(t) for t in registry.family(model_cfg.type).hf_types] \
        or [family_for_model(model_cfg)]
    return sorted({r.ours for fam in fams for r in fam.rules(model_cfg)
                   if r.vocab and not r.per_layer})


def save_hf_checkpoint(save_dir: str, tensors: Dict[str, Any], hf_config: Dict[str, Any], *,
                       max_shard_size: int) -> List[str]:
    """config.json + safetensors weights (sharded with an index above max_shard_size)."""
    from framework.interop.hf_files import write_hf_config, write_hf_weights

    write_hf_config(save_dir, hf_config)
    return ["config.json"] + write_hf_weights(save_dir, tensors, max_shard_size=max_shard_size)
