"""T5: megatron-core's `T5Model` with our layer specs (SDPA attention, SP-capable norm).

* Encoder layer: bidirectional self-attention (`AttnMaskType.padding`, a [b, 1, 1, s] mask over
  padded encoder positions).
* Decoder layer: causal self-attention (padding needs no mask: pads come last), then
  cross-attention over the encoder output (padding mask over the encoder positions), then MLP.
* Position information: mcore's relative position bias (`position_embedding_type=relative`,
  T5's bucketed bias, one table for the encoder and one for the decoder), added to the scores
  by `SDPAttention` as `attention_bias`.

`CrossAttention` replaces mcore's, which raises for grouped-query attention ("Group query
attention is not currently supported in cross attention"): here the key/value projection has
`num_query_groups` heads, laid out per group ([k v] of group 0, of group 1, ...; for MHA the same
layout as mcore's). With fewer groups than TP ranks the key/value projection output is gathered
over the TP group and each rank takes the group of its query heads (the backward all-reduces, so
a group's gradient sums over every rank that uses it), as mcore does for self-attention.

`T5` runs mcore's T5Model on CPU under TP too: its forward scatters the relative position bias
over the TP ranks' heads with mcore's `scatter_to_tensor_model_parallel_region`, whose backward
all-gathers into a buffer on `torch.cuda.current_device()`. Off the GPU, `T5.forward` has
that one name resolve to `_scatter_any_device` for the duration of the call: mcore's function
for CUDA tensors, else `_ScatterLastDim` (same forward split; backward all-gathers with
torch.distributed).

Pipeline parallelism is refused by the config: megatron-core 0.16 has no encoder-decoder
pipeline schedule.
"""
from __future__ import annotations

from functools import partial

import copy
from typing import TYPE_CHECKING, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.T5 import T5Model
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.attention import CrossAttention as _McoreCrossAttention
from megatron.core.transformer.enums import AttnMaskType

from framework.models.layers import GatherLastDim, SDPAttention, keep_rotary_on_device, norm_class
from framework.models.transformer import layer_spec, lm_kwargs
from framework.patching import patched

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig


class CrossAttention(_McoreCrossAttention):
    """mcore CrossAttention with grouped-query (and multi-query) key/value heads."""

    def __init__(self, config, submodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.padding, cp_comm_type=None,
                 pg_collection=None):
        # skip mcore CrossAttention.__init__ (it raises for GQA); build its two projections here
        Attention.__init__(self, config=config, submodules=submodules, layer_number=layer_number,
                           attn_mask_type=attn_mask_type, attention_type="cross",
                           cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        common = dict(config=self.config, init_method=self.config.init_method,
                      gather_output=False, bias=self.config.add_bias_linear, skip_bias_add=False,
                      is_expert=False)
        self.linear_q = submodules.linear_q(self.config.hidden_size, self.query_projection_size,
                                            **common)
        self.linear_kv = submodules.linear_kv(self.config.hidden_size,
                                              2 * self.kv_projection_size, **common)
        self.replicated_kv = self.config.num_query_groups < self.world_size

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False,
                                    split_qkv=True):
        assert split_qkv and not output_gate, "cross-attention: split_qkv only, no output gate"
        assert key_value_states is not None, "cross-attention needs key_value_states"
        hn = self.hidden_size_per_attention_head
        mixed_kv, _ = self.linear_kv(key_value_states)
        if self.replicated_kv:
            # [sk, b, 2*g*hn / tp] -> all groups [sk, b, 2*g*hn] -> this rank's group
            full = GatherLastDim.apply(mixed_kv, self.tp_group)
            tp, groups = self.world_size, self.config.num_query_groups
            g = self.tp_group.rank() // (tp // groups)
            mixed_kv = full[..., g * 2 * hn:(g + 1) * 2 * hn]
        mixed_kv = mixed_kv.reshape(*mixed_kv.shape[:-1], self.num_query_groups_per_partition,
                                    2 * hn)
        key, value = tensor_parallel.split_tensor_along_last_dim(mixed_kv, 2)
        query, _ = self.linear_q(hidden_states)
        query = query.reshape(*query.shape[:-1], -1, hn)
        return query, key.contiguous(), value.contiguous()


class _ScatterLastDim(torch.autograd.Function):
    """This TP rank's slice of the last dim; backward all-gathers the slices (list all_gather,
    which gloo has)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(group.size(), dim=-1)[group.rank()].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.group.size())]
        torch.distributed.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None


def _scatter_any_device(x, group=None):
    if x.is_cuda:
        return tensor_parallel.scatter_to_tensor_model_parallel_region(x, group)
    from megatron.core import parallel_state

    group = group or parallel_state.get_tensor_model_parallel_group()
    return x if group.size() == 1 else _ScatterLastDim.apply(x, group)


class T5(T5Model):
    """mcore T5Model whose forward also runs on CPU under TP (see the module docstring)."""

    def forward(self, *args, **kwargs):
        from megatron.core.models.T5 import t5_model

        with patched(t5_model, scatter_to_tensor_model_parallel_region=_scatter_any_device):
            return super().forward(*args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # the LM head's linear is registered twice (lm_head.output_layer, output_layer); mcore
        # lets only the `output_layer.*` keys follow the vocabulary padding of the layout
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for key in (f"{prefix}lm_head.output_layer.weight", f"{prefix}lm_head.output_layer.bias"):
            if key in sd and hasattr(sd[key], "allow_shape_mismatch"):
                sd[key].allow_shape_mismatch = True
        return sd


def _core_attention(model: "ModelConfig"):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return (partial(SDPAttention, cudnn=model.cudnn_attention)
            if model.attention_backend == "sdpa" else DotProductAttention)


def t5_encoder_layer_spec(model: "ModelConfig"):
    return layer_spec(model, mask="padding")


def t5_decoder_layer_spec(model: "ModelConfig"):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import CrossAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = layer_spec(model)  # causal self-attention, MLP, norms
    spec.submodules.pre_cross_attn_layernorm = norm_class(model)
    spec.submodules.cross_attention = ModuleSpec(
        module=CrossAttention,
        params={"attn_mask_type": AttnMaskType.padding},
        submodules=CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_kv=ColumnParallelLinear,
            core_attention=_core_attention(model),
            linear_proj=RowParallelLinear,
        ),
    )
    spec.submodules.cross_attn_bda = get_bias_dropout_add
    return spec


def build_t5(model: "ModelConfig", tcfg, *, vocab_size: int, pre_process: bool,
             post_process: bool, vp_stage: Optional[int]):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    assert vp_stage is None, "T5 has no (virtual) pipeline stages"
    enc_cfg = copy.deepcopy(tcfg)
    enc_cfg.num_layers = model.enc_layers
    t5 = T5(
        config=tcfg,
        encoder_config=enc_cfg,
        transformer_encoder_layer_spec=TransformerBlockSubmodules(
            layer_specs=[t5_encoder_layer_spec(model)] * model.enc_layers,
            layer_norm=norm_class(model)),
        transformer_decoder_layer_spec=TransformerBlockSubmodules(
            layer_specs=[t5_decoder_layer_spec(model)] * model.num_layers,
            layer_norm=norm_class(model)),
        **lm_kwargs(model, vocab_size=vocab_size, pre_process=pre_process,
                    post_process=post_process),
        position_embedding_type=model.position_embedding_type,
        relative_attention_num_buckets=model.relative_attention_num_buckets,
        relative_attention_max_distance=model.relative_attention_max_distance,
    )
    keep_rotary_on_device(t5)
    if post_process and not model.lm_head_bias:
        # mcore's T5LMHead gives a tied output layer a vocabulary bias; HF T5 has none
        t5.lm_head.output_layer.register_parameter("bias", None)
    if post_process and model.scale_decoder_output:
        scale = model.hidden_size ** -0.5  # HF T5 v1.0: sequence_output * d_model**-0.5

        def _scale_lm_input(_module, args, kwargs):
            return (args[0] * scale,) + tuple(args[1:]), kwargs

        t5.lm_head.register_forward_pre_hook(_scale_lm_input, with_kwargs=True)
    return t5
