"""`ModelSpec`: everything the framework needs to know about one model family (`model.type`),
registered once in framework/models/registry.py.

A family lives in one folder, `framework/models/<family>/`, whose `__init__.py` defines `SPEC`.
The spec holds two halves:

* what the config layer needs when a `ModelConfig` or `Config` is built (so it imports neither
  torch nor megatron-core): the position embeddings and family-only options the family accepts,
  its capabilities, its config checks and its FLOP formula;
* `load`, a function that imports the rest and returns `ModelParts`: the builder of one model
  chunk (layer spec included), the default train step (batch, forward, loss), the datasets it
  trains on, its tokenizer needs and its Hugging Face weight mappings. `ModelSpec.parts()` calls
  it once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Tuple


def _no_check(_cfg: Any) -> None:
    return None


def _no_tokenizer_check(_tokenizer: Any, _cfg: Any) -> None:
    return None


def flops_per_token(num_layers: int, hidden: int, seq: int, vocab: int) -> float:
    """Megatron's model FLOPs per token of a dense layer stack (Narayanan et al., 2021),
    forward and backward, no recompute: 72 l h^2 (1 + s / (6 h) + V / (12 l h))."""
    l, h, s, v = num_layers, hidden, seq, vocab
    return 72.0 * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h))


def dense_flops_per_token(model_cfg: Any, vocab: int) -> float:
    """Model FLOPs per token of a dense decoder or encoder stack (GPT, Llama-style, BERT),
    forward and backward, no recompute: 6 x the weights each token multiplies (every layer's
    QKV with its query groups, the attention projection, the MLP with 2 or 3 matrices for plain
    or gated activations, and the output layer) + 12 x layers x attention width x sequence (the
    scores and the weighted values over the full square, as Megatron and PaLM count them).

    For a GPT-2 shape (MHA, FFN 4h, ungated) this is `flops_per_token`, Megatron's formula;
    for Llama shapes it counts SwiGLU's third matrix and GQA's narrower K/V, which that formula
    does not. benchmarks/shapes.py's `Shape.flops_per_token` is the same count."""
    m = model_cfg
    h, heads = m.hidden_size, m.num_attention_heads
    hd = m.kv_channels or h // heads
    groups = m.num_query_groups or heads
    ffn = m.ffn_hidden_size or 4 * h
    q = heads * hd
    attn = h * q + 2 * h * groups * hd + q * h
    mlp = (3 if m.activation in ("swiglu", "geglu_tanh") else 2) * h * ffn
    matmul = m.num_layers * (attn + mlp) + vocab * h
    return 6.0 * matmul + 12.0 * m.num_layers * q * m.seq_length


@dataclass(frozen=True)
class ModelParts:
    """The half of a family that imports torch and megatron-core (see the module docstring)."""

    # one chunk: build(model_cfg, transformer_config, *, vocab_size, pre_process, post_process,
    # vp_stage) -> torch.nn.Module (an mcore language model with our layer spec)
    build: Callable[..., Any]
    # the default train step class (`train.step._target_` replaces it): get_batch, forward_step,
    # loss_func (framework.training.step.TrainStep)
    train_step: type
    # datasets(data_cfg, tokenizer, model_cfg, *, seed, num_samples, cache_dir)
    #   -> (train, valid, test), each a dataset or None
    datasets: Callable[..., Tuple[Any, Any, Any]]
    # the tokenizer of `data=embedded` (a character tokenizer of the arithmetic corpus)
    embedded_tokenizer: Callable[[], Any]
    # check_tokenizer(tokenizer, cfg): a ConfigError (one line) when the tokenizer lacks what the
    # family needs (special tokens)
    check_tokenizer: Callable[[Any, Any], None] = _no_tokenizer_check
    # Hugging Face model_type -> the module that maps its weights (framework.interop)
    hf: Mapping[str, ModuleType] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model family. See the module docstring; framework/models/gpt/ is the example."""

    name: str  # the model.type value
    load: Callable[[], ModelParts]
    title: str = ""  # in messages ("GPT"); default: the name
    # accepted model.position_embedding_type values
    position_embeddings: Tuple[str, ...] = ("learned_absolute", "rope", "none")
    # the family-only ModelConfig fields (config.FAMILY_OPTIONS) this family accepts
    options: Tuple[str, ...] = ()
    # accepted data.type values
    data_types: Tuple[str, ...] = ("embedded", "indexed", "mock", "random")
    # check_model(model_cfg): rules on ModelConfig fields, run when a ModelConfig is built
    check_model: Callable[[Any], None] = _no_check
    # check_run(cfg): rules across config groups, run when a Config is built
    check_run: Callable[[Any], None] = _no_check
    # model FLOPs per input token, forward and backward (the log line's TFLOP/s and MFU)
    flops_per_token: Callable[[Any, int], float] = dense_flops_per_token
    encoder_decoder: bool = False  # an encoder stack of model.encoder_num_layers as well
    fp8: bool = False  # train.fp8 supported
    generation: bool = False  # generate.py / framework.generation supported (causal LM)
    hf_types: Tuple[str, ...] = ()  # the Hugging Face model_types of `parts().hf`
    # a conf/model/ config of this family that trains in minutes on a CPU (named in CPU
    # remedies), or "" if none
    cpu_model: str = ""

    @property
    def label(self) -> str:
        return self.title or self.name

    def parts(self) -> ModelParts:
        """The family's heavy half, imported on first use."""
        return _load(self)


@functools.lru_cache(maxsize=None)
def _load(spec: ModelSpec) -> ModelParts:
    parts = spec.load()
    if sorted(parts.hf) != sorted(spec.hf_types):
        raise ValueError(f"model family {spec.name}: hf_types {sorted(spec.hf_types)} do not "
                         f"match its Hugging Face mappings {sorted(parts.hf)}")
    return parts

