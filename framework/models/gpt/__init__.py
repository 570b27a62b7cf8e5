"""GPT: a causal language model, megatron-core's `GPTModel` with our layer spec.

* `model.py`: the builder (`framework.models.transformer.layer_spec` with causal self-attention;
  the fused output layer + cross-entropy with `model.fused_cross_entropy`);
* `step.py`: `GPTTrainStep`, next-token cross-entropy over `loss_mask`;
* `data.py`: megatron-core's GPT datasets; any tokenizer (the character tokenizer on
  `data=embedded`);
* `hf_gpt2.py`: Hugging Face GPT-2 weights and config;
* `hf_llama.py` (its `variant` for qwen2, qwen3 and mistral): Hugging Face Llama, Qwen2, Qwen3
  and Mistral, Llama-style decoders that are this family in megatron-core terms (RMSNorm,
  SwiGLU, RoPE, GQA; Qwen3's per-head q/k norms are `model.qk_layernorm`);
  `rope_scaling.py`: Llama-3 RoPE frequency scaling (`model.rope_scaling*`);
* config: no checks beyond the shared ones; FLOPs: Megatron's dense count.

`SPEC` registers all of it (framework/models/registry.py).
"""
from framework.models.spec import ModelParts, ModelSpec


def _load() -> ModelParts:
    from framework.models.gpt import data, hf_gpt2, hf_llama, model, step
    from framework.tokenizer import embedded_tokenizer

    return ModelParts(build=model.build_gpt, train_step=step.GPTTrainStep, datasets=data.datasets,
                      embedded_tokenizer=embedded_tokenizer,
                      hf={"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama.variant("qwen2"),
                          "qwen3": hf_llama.variant("qwen3"),
                          "mistral": hf_llama.variant("mistral")})


SPEC = ModelSpec(
    name="gpt",
    cpu_model="gpt_tiny",
    title="GPT",
    load=_load,
    position_embeddings=("learned_absolute", "rope", "alibi", "none"),
    options=("fused_cross_entropy", "qk_layernorm", "sliding_window", "sliding_window_layers"),
    fp8=True,
    generation=True,
    hf_types=("gpt2", "llama", "qwen2", "qwen3", "mistral"),
)
