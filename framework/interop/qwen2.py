"""HF `model_type: qwen2` (`Qwen2ForCausalLM`) <-> our `gpt` model: the Llama mapping of
framework/interop/llama.py bound to this model type (its docstring says what differs)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from framework.config import ModelConfig
from framework.interop import llama as _llama
from framework.interop.llama import (HF_BASE_PREFIX, HF_IGNORED, MODEL_TYPE,  # noqa: F401
                                     optional_hf_tensors, rules)

HF_MODEL_TYPE = "qwen2"
HF_ARCHITECTURE = "Qwen2ForCausalLM"


def hf_config_to_model_config(hf: Dict[str, Any], **overrides: Any) -> ModelConfig:
    return _llama._hf_config_to_model_config(hf, HF_MODEL_TYPE, **overrides)


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return _llama._model_config_to_hf_config(cfg, HF_MODEL_TYPE, vocab_size=vocab_size,
                                             base=base)


def accepts(cfg: ModelConfig) -> bool:
    return _llama.accepts(cfg, HF_MODEL_TYPE)
