"""GPT: megatron-core's `GPTModel` with our causal layer spec (SDPA attention, SP-capable norm).

With `model.fused_cross_entropy` (null = on for GPT) the output layer and the vocab-parallel
cross-entropy are fused and chunked over tokens (framework/fast/fused_ce.py). With
`model.rope_scaling` the rotary frequencies are Llama-3's, from HF's four parameters
(rope_scaling.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from framework.models.gpt.rope_scaling import apply_rope_scaling
from framework.models.layers import keep_rotary_on_device
from framework.models.transformer import block_spec, lm_kwargs

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig


def build_gpt(model: "ModelConfig", tcfg, *, vocab_size: int, pre_process: bool,
              post_process: bool, vp_stage: Optional[int]):
    from megatron.core.models.gpt import GPTModel

    if model.fused_cross_entropy:
        from framework.fast.fused_ce import FusedCEGPTModel as GPTModel  # noqa: F811

    gpt = GPTModel(
        config=tcfg,
        transformer_layer_spec=block_spec(model, tcfg, vp_stage),
        **lm_kwargs(model, vocab_size=vocab_size, pre_process=pre_process,
                    post_process=post_process),
        # ALiBi has no position table: the bias is applied in SDPAttention
        position_embedding_type=("none" if model.position_embedding_type == "alibi"
                                 else model.position_embedding_type),
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    keep_rotary_on_device(gpt)
    if model.fused_cross_entropy:
        # null = fused_ce.keep_logits_auto (keep where the logits take <= 8% of the GPU)
        gpt.fused_ce_keep_logits = model.fused_ce_keep_logits
        gpt.fused_ce_chunk_tokens = model.fused_ce_chunk_tokens  # None: fused_ce's default
    if model.rope_scaling:  # Llama-3 scaling with HF's four parameters (mcore fixes three)
        apply_rope_scaling(gpt, model)
    return gpt
