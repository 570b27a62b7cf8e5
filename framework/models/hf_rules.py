"""The generic half of a conversion: name rules, vocabulary padding, TP slicing, layer numbering.

A model family's HF mapping (e.g. `framework.models.gpt.hf_gpt2`) lists `Rule`s, one per tensor, each pairing a
megatron-core parameter name with a Hugging Face tensor name and a pair of pure functions that
turn one layout into the other on *full* (unsharded, TP=1) tensors. Everything that does not
depend on the family lives here:

* `{i}` in a name is a transformer layer number (global, 0-based). Our model chunks name their
  layers locally (`decoder.layers.0` on pipeline stage 1 is global layer L/PP); the global number
  comes from the layer module's `layer_number` (1-based, set by megatron-core), so pipeline and
  virtual-pipeline chunks need nothing special.
* Vocabulary rows (`Rule.vocab`) are padded on import to the model's padded vocabulary and
  stripped on export. Pad rows are zero; they are never a real token.
* Tensor parallelism: a full tensor is cut the way megatron-core cuts it, along the parameter's
  `partition_dim` into TP equal parts (parameters carry `tensor_model_parallel`/`partition_dim`).
* The layouts several families share (fused QKV, GLU halves, the tied or untied output layer) and
  the config mapping's common steps (refusals in one message, the export checks shared by
  families, keeping the imported HF config's other fields).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Tuple)

import torch

from framework.errors import InteropError

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

Transform = Callable[[torch.Tensor, "ModelConfig"], torch.Tensor]


def same(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return t


def transpose(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return t.t()


# megatron-core's fused QKV layout: HF's stacked [q; k; v] rows <-> interleaved per query group
def _heads(cfg: "ModelConfig"):
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    dim = cfg.kv_channels or cfg.hidden_size // heads
    return heads, groups, dim


def qkv_parts_to_ours(parts: Tuple[torch.Tensor, ...], cfg: "ModelConfig") -> torch.Tensor:
    """Separate (q, k, v) rows (weights [rows, in] or biases [rows]) -> per group [q heads of the
    group, k, v] rows."""
    heads, groups, dim = _heads(cfg)
    q, k, v = parts
    rest = tuple(q.shape[1:])
    per = heads // groups
    q = q.reshape((groups, per * dim) + rest)
    k = k.reshape((groups, dim) + rest)
    v = v.reshape((groups, dim) + rest)
    return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)


def qkv_parts_to_hf(t: torch.Tensor, cfg: "ModelConfig") -> Tuple[torch.Tensor, ...]:
    """Per group [q heads of the group, k, v] rows -> separate (q, k, v) rows (the inverse)."""
    heads, groups, dim = _heads(cfg)
    rest = tuple(t.shape[1:])
    per = heads // groups
    q, k, v = t.reshape((groups, (per + 2) * dim) + rest).split([per * dim, dim, dim], dim=1)
    return tuple(x.reshape((-1,) + rest) for x in (q, k, v))


def qkv_rows_to_ours(t: torch.Tensor, cfg: "ModelConfig") -> torch.Tensor:
    """[q; k; v] rows -> per group [q heads of the group, k, v] rows (weights or biases)."""
    heads, groups, dim = _heads(cfg)
    return qkv_parts_to_ours(t.split([heads * dim, groups * dim, groups * dim], dim=0), cfg)


def qkv_rows_to_hf(t: torch.Tensor, cfg: "ModelConfig") -> torch.Tensor:
    """Per group [q heads of the group, k, v] rows -> [q; k; v] rows (the inverse)."""
    return torch.cat(qkv_parts_to_hf(t, cfg), dim=0)


# a gated (GLU) linear_fc1 is [gate; up] rows; HF keeps the two halves as separate tensors
def glu_to_ours(parts: Tuple[torch.Tensor, ...], cfg: "ModelConfig") -> torch.Tensor:
    return torch.cat(list(parts), dim=0)


def glu_to_hf(t: torch.Tensor, cfg: "ModelConfig") -> Tuple[torch.Tensor, ...]:
    return tuple(t.chunk(2, dim=0))


@dataclass(frozen=True)
class Rule:
    """One tensor: `ours` (megatron-core name) <-> `hf` (Hugging Face name).

    `to_ours`/`to_hf` convert full tensors and must be exact inverses (a permutation, transpose
    or reshape), so that HF -> ours -> HF is bit-identical. `vocab`: dim 0 is the vocabulary.
    `export=False`: import only (e.g. the tied output layer of the last pipeline stage, which is
    a copy of the word embeddings and has no tensor of its own in a tied HF checkpoint).
    `hf` may be a tuple of names (several HF tensors make one of ours, e.g. separate q/k/v
    into `linear_qkv`): `to_ours` then takes a tuple of tensors and `to_hf` returns one.
    """

    ours: str
    hf: "str | Tuple[str, ...]"
    to_ours: Transform = same
    to_hf: Transform = same
    vocab: bool = False
    export: bool = True
    # dim 0 is [gate; up] of a gated (GLU) linear_fc1: each TP rank holds [gate_r; up_r]
    glu: bool = False

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours


def output_layer_rule(hf_embedding: str, tied: bool) -> Rule:
    """Our `output_layer.weight`. Tied: the last pipeline stage's copy of the word embeddings
    (`hf_embedding`), which has no tensor of its own in HF (import only); untied: HF's
    `lm_head.weight`."""
    if tied:
        return Rule("output_layer.weight", hf_embedding, vocab=True, export=False)
    return Rule("output_layer.weight", "lm_head.weight", vocab=True)


# --------------------------------------------------------------------------------------------
# config mapping: what every family's `hf_config_to_fields` / `model_config_to_hf_config` does
# --------------------------------------------------------------------------------------------
Check = Tuple[bool, str]  # (holds, what to report when it does not)


def _hf_number(hf: Dict[str, Any], key: str, what: str, integer: bool):
    """`hf[key]` as a finite number (an integer with `integer`): JSON null, text, a boolean, inf
    or NaN, or a fraction for an integer field, is an InteropError naming the key and what it
    holds."""
    value = hf.get(key)
    if value is not None and not isinstance(value, (bool, str)):
        try:
            number = float(value)
            if math.isfinite(number) and (not integer or number == int(number)):
                return int(number) if integer else number
        except (TypeError, ValueError, OverflowError):
            pass
    held = "missing" if key not in hf else json_value(value)
    raise InteropError(f"{what} config: {key} is {held}, not "
                       f"{'an integer' if integer else 'a number'}")


def hf_ints(hf: Dict[str, Any], keys: Iterable[str], what: str) -> List[int]:
    """The integer fields `keys` of an HF config dict, in order; a missing, null or non-integer
    one is an InteropError naming the key and what it holds (e.g. "gpt2 config: n_layer is
    null, not an integer")."""
    return [_hf_number(hf, key, what, integer=True) for key in keys]


REQUIRED = object()


def hf_float(hf: Dict[str, Any], key: str, default: Any, what: str) -> float:
    """The number field `key` of an HF config dict (`default` when missing; required when
    `default` is `REQUIRED`); null, text, a boolean, inf or NaN is an InteropError naming the
    key and what it holds (e.g. "gpt2 config: layer_norm_epsilon is "abc", not a number")."""
    if key not in hf and default is not REQUIRED:
        return float(default)
    return _hf_number(hf, key, what, integer=False)


def json_value(value: Any) -> str:
    """How config.json spells a value (null, true, "text", 1.5)."""
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def refuse(problems: List[str], what: str) -> None:
    """One InteropError `what: problem; problem` naming every problem at once; nothing when
    there are none."""
    if problems:
        raise InteropError(f"{what}: " + "; ".join(problems))


def require(checks: Iterable[Check], what: str) -> None:
    """`refuse` with the messages of the checks that fail."""
    refuse([msg for ok, msg in checks if not ok], what)


def family_checks(cfg: "ModelConfig", model_type: str, normalization: str,
                  position_embedding_type: str) -> List[Check]:
    """Our model has the family's type, norm and position embedding (export checks)."""
    return [
        (cfg.type == model_type, f"model.type={cfg.type!r} (needs {model_type!r})"),
        (cfg.normalization == normalization, f"model.normalization={cfg.normalization!r}"),
        (cfg.position_embedding_type == position_embedding_type,
         f"model.position_embedding_type={cfg.position_embedding_type!r}"),
    ]


def mha_checks(cfg: "ModelConfig") -> List[Check]:
    """Plain multi-head attention with head dim hidden_size / heads (an HF config without
    num_key_value_heads or head_dim)."""
    heads = cfg.num_attention_heads
    return [
        (cfg.num_query_groups in (None, heads), f"model.num_query_groups={cfg.num_query_groups}"),
        (cfg.kv_channels in (None, cfg.hidden_size // heads)
         and cfg.hidden_size % heads == 0, f"model.kv_channels={cfg.kv_channels}"),
    ]


def kept_hf_config(base: Optional[Dict[str, Any]], model_type: str) -> Dict[str, Any]:
    """A copy of `base`, the HF config a model was imported from, when it is of `model_type`
    (its non-architecture fields, e.g. token ids and task fields, are kept on export); else
    an empty one."""
    return dict(base or {}) if (base or {}).get("model_type") == model_type else {}


def expand(rules: Iterable[Rule], num_layers: int) -> List[Tuple[str, str, Rule]]:
    """Concrete (ours, hf, rule) triples for every layer."""
    out = []
    for r in rules:
        for i in (range(num_layers) if r.per_layer else [None]):
            ours = r.ours.format(i=i) if i is not None else r.ours
            if isinstance(r.hf, tuple):
                hf = tuple(h.format(i=i) if i is not None else h for h in r.hf)
            else:
                hf = r.hf.format(i=i) if i is not None else r.hf
            out.append((ours, hf, r))
    return out


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def global_name(chunk: torch.nn.Module, local: str) -> str:
    """`decoder.layers.<local>.x` of a (pipeline) chunk -> `decoder.layers.<global>.x`."""
    m = _LAYER.search(local)
    if m is None:
        return local
    block = local[: m.start(2)] + m.group(2)  # e.g. "decoder.layers.3"
    layer = chunk.get_submodule(block)
    number = getattr(layer, "layer_number", None)
    if number is None:
        raise InteropError(f"{block} has no layer_number; cannot place it in the full model")
    return local[: m.start(2)] + str(number - 1) + local[m.end(2):]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise InteropError(f"vocabulary of {t.shape[0]} rows does not fit the model's padded "
                           f"vocabulary of {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def tp_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of `full`, cut as megatron-core cuts `param`."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if full.shape[dim] % tp_size:
        raise InteropError(f"dimension {dim} of size {full.shape[dim]} does not split into "
                           f"{tp_size} tensor-parallel parts")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def import_into_chunks(
    chunks: List[torch.nn.Module],
    rules: List[Rule],
    model_cfg: ModelConfig,
    get_hf: Callable[[str], torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
) -> int:
    """Copy HF tensors (`get_hf(name)` -> full tensor) into this rank's model chunks.

    `chunks` are unwrapped megatron-core modules. Returns the number of tensors copied. Raises
    InteropError when a parameter has no rule or a shape does not match.
    """
    table = {ours: (hf, rule) for ours, hf, rule in expand(rules, model_cfg.num_layers)}
    copied = 0
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            if name not in table:
                raise InteropError(f"parameter {name} of the model has no Hugging Face "
                                   f"counterpart in the conversion rules")
            hf_name, rule = table[name]
            src = tuple(get_hf(h) for h in hf_name) if isinstance(hf_name, tuple) \
                else get_hf(hf_name)
            full = rule.to_ours(src, model_cfg)
            if rule.vocab:
                rows = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel",
                                                            False) else 1)
                full = pad_rows(full, rows)
            if rule.glu and tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                part = torch.cat([tp_slice(h, param, tp_rank, tp_size) for h in full.chunk(2)])
            else:
                part = tp_slice(full, param, tp_rank, tp_size)
            if tuple(part.shape) != tuple(param.shape):
                raise InteropError(f"{hf_name} gives {name} the shape {tuple(part.shape)}; the "
                                   f"model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(part)
            copied += 1
    return copied


def export_from_state(
    state: Dict[str, torch.Tensor],
    rules: List[Rule],
    model_cfg: ModelConfig,
    vocab_size: int,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Full (TP=1, PP=1) megatron-core state dict -> HF tensors, vocabulary padding stripped."""
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for ours, hf, rule in expand(rules, model_cfg.num_layers):
        if not rule.export:
            used.add(ours)
            continue
        if ours not in state:
            raise InteropError(f"the checkpoint has no tensor {ours}")
        t = state[ours]
        used.add(ours)
        if rule.vocab:
            if t.shape[0] < vocab_size:
                raise InteropError(f"{ours} has {t.shape[0]} rows, fewer than the vocabulary "
                                   f"size {vocab_size}")
            t = t[:vocab_size]
        t = rule.to_hf(t, model_cfg)
        for name, x in (zip(hf, t) if isinstance(hf, tuple) else [(hf, t)]):
            if dtype is not None:
                x = x.to(dtype)
            out[name] = x.contiguous()
    extra = sorted(k for k in state if k not in used and not k.endswith("_extra_state"))
    if extra:
        raise InteropError(f"the checkpoint has tensors the conversion rules do not know: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return out


def iter_hf_names(rules: List[Rule], num_layers: int) -> Iterator[str]:
    for _ours, hf, _rule in expand(rules, num_layers):
        yield from (hf if isinstance(hf, tuple) else [hf])
