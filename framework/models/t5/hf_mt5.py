"""mT5 (HF `model_type: mt5`, `MT5ForConditionalGeneration`) <-> our `t5` model.

The same tensors and rules as T5 (framework.models.t5.hf_t5) with T5 v1.1's choices: gated-GeLU FFN
(`activation: geglu_tanh`), no scaling of the decoder output before the LM head, and an LM head
of its own when the config says tie_word_embeddings=false (google's mT5 configs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from framework.errors import InteropError
from framework.models.hf_rules import Rule
from framework.models.t5 import hf_t5 as _t5

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "mt5"
MODEL_TYPE = "t5"
HF_ARCHITECTURE = "MT5ForConditionalGeneration"
HF_BASE_PREFIX = _t5.HF_BASE_PREFIX
HF_IGNORED = _t5.HF_IGNORED


def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    hf = {**hf, "feed_forward_proj": hf.get("feed_forward_proj", "gated-gelu"),
          "scale_decoder_outputs": False}  # MT5ForConditionalGeneration never scales
    return {**_t5.hf_config_to_fields(hf), "name": "mt5_hf"}


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    if cfg.scale_decoder_output:
        raise InteropError("this model cannot be expressed as HF mt5: "
                           "model.scale_decoder_output=true (mT5 does not scale)")
    t5_base = {**base, "model_type": _t5.HF_MODEL_TYPE} \
        if (base or {}).get("model_type") == HF_MODEL_TYPE else None
    out = _t5.model_config_to_hf_config(cfg, vocab_size=vocab_size, base=t5_base)
    out.pop("scale_decoder_outputs", None)
    out.update(model_type=HF_MODEL_TYPE, architectures=[HF_ARCHITECTURE])
    return out


def resolve_with_tensors(cfg: "ModelConfig", names) -> "ModelConfig":
    return _t5.resolve_with_tensors(cfg, names)


def rules(cfg: ModelConfig) -> List[Rule]:
    return _t5.rules(cfg)


def optional_hf_tensors(cfg: ModelConfig) -> List[str]:
    return _t5.optional_hf_tensors(cfg)
