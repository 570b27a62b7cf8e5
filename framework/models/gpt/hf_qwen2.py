"""HF `model_type: qwen2` (`Qwen2ForCausalLM`) <-> our `gpt` model: the Llama mapping of
framework/models/gpt/hf_llama.py bound to this model type (its docstring says what differs)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from framework.models.gpt import hf_llama as _llama
from framework.models.gpt.hf_llama import (HF_BASE_PREFIX, HF_IGNORED,  # noqa: F401
                                           MODEL_TYPE, optional_hf_tensors, rules)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig

HF_MODEL_TYPE = "qwen2"
HF_ARCHITECTURE = "Qwen2ForCausalLM"


def hf_config_to_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    return _llama._hf_config_to_fields(hf, HF_MODEL_TYPE)


def model_config_to_hf_config(cfg: ModelConfig, *, vocab_size: int,
                              base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return _llama._model_config_to_hf_config(cfg, HF_MODEL_TYPE, vocab_size=vocab_size,
                                             base=base)


def accepts(cfg: ModelConfig) -> bool:
    return _llama.accepts(cfg, HF_MODEL_TYPE)
