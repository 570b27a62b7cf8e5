"""BERT: megatron-core's `BertModel` with our layer spec (SDPA attention, SP-capable norm).

The layer is the shared one (`framework.models.transformer.layer_spec`) with bidirectional
self-attention (`AttnMaskType.padding`):
the mask is [b, 1, 1, s] over padded keys, built by `BertModel` from the batch's padding mask.

Two things in mcore 0.16's `BertModel` need Transformer Engine or apex, so `Bert` works around
them without changing mcore:

* `_sanity_check_attention_and_get_attn_mask_dimension` calls `is_te_min_version`, which raises
  a TypeError without TE (`get_te_version()` is None) for any core attention other than mcore's
  `DotProductAttention`. Ours uses the [b, 1, 1, s] key-padding mask ("b11s"; cheaper than b1ss
  and no padded query row is ever fully masked).
* `BertLMHead` builds its LayerNorm with apex's `FusedLayerNorm` or mcore's `WrappedTorchNorm`,
  which refuses `sequence_parallel=True`; it is built with our `Norm` instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron.core.models.bert import bert_lm_head
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from framework.models.layers import Norm, keep_rotary_on_device, norm_class
from framework.models.transformer import block_spec, lm_kwargs
from framework.patching import patched

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig


class Bert(BertModel):
    """mcore BertModel that runs without TE/apex (see the module docstring)."""

    def __init__(self, *args, norm: type = Norm, **kwargs):
        # BertLMHead builds its norm from the module global `LNImpl` (WrappedTorchNorm without
        # apex/TE, which refuses sequence parallelism): build it with ours
        with patched(bert_lm_head, LNImpl=norm):
            super().__init__(*args, **kwargs)

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        spec = self.transformer_layer_spec
        layer = spec.layer_specs[0] if hasattr(spec, "layer_specs") else spec
        core = layer.submodules.self_attention.submodules.core_attention
        return "b1ss" if core is DotProductAttention else "b11s"


def build_bert(model: "ModelConfig", tcfg, *, vocab_size: int, pre_process: bool,
               post_process: bool, vp_stage: Optional[int]):
    bert = Bert(
        config=tcfg,
        norm=norm_class(model),
        num_tokentypes=2 if model.add_binary_head else 0,
        transformer_layer_spec=block_spec(model, tcfg, vp_stage, mask="padding"),
        **lm_kwargs(model, vocab_size=vocab_size, pre_process=pre_process,
                    post_process=post_process),
        position_embedding_type=model.position_embedding_type,
        add_binary_head=model.add_binary_head,
        vp_stage=vp_stage,
    )
    keep_rotary_on_device(bert)
    return bert
