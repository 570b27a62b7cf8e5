"""What every model family builds from: megatron-core's `TransformerConfig` from our model and
parallel configs (`transformer_config`), the transformer layer built of our shared layers
(`layer_spec`, `block_spec`) and the language-model arguments mcore's models share (`lm_kwargs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from framework import mcore_patches
from framework.fast.swiglu import triton as swiglu_triton
from framework.models.layers import (ActRecomputeMLP, BiasAddLinear, Fp8BiasAddLinear,
                                     Fp8ColumnParallelLinear, Fp8RowParallelLinear, Norm,
                                     SDPAttention, SelfAttention, norm_class)

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig, ParallelConfig


@dataclass
class ExtendedTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus our recompute option mcore does not know."""

    # recompute the dense MLP's activation before fc2's backward instead of keeping it
    recompute_mlp_act: bool = False
    # FP8 GEMMs in the transformer layers' linears (`train.fp8`): None, "tensorwise" or
    # "rowwise" (framework/fast/fp8.py). Not mcore's `fp8`, which means Transformer Engine.
    fp8_gemm: Optional[str] = None
    # SwiGLU through framework/fast/swiglu.py's Triton kernels (`model.swiglu_kernel`)
    swiglu_kernel: bool = False
    # fc2's FP8 input cast computes the MLP activation (`model.fp8_fused_act`, recipe delayed)
    fp8_act_cast: bool = False
    # ... and its backward casts fc1's output gradient in the same pass
    # (`model.fp8_fused_act_backward`)
    fp8_act_bwd_cast: bool = False
    # the backward's FP8 GEMMs with fast accumulation (`model.fp8_backward_fast_accum`)
    fp8_bwd_fast_accum: bool = False
    # RoPE of q and k as they are split out of the fused QKV output (`model.qkv_rope_fusion`;
    # our `SelfAttention`, framework/fast/rope.py's `fused_qkv_rope`). Not mcore's
    # `fused_single_qkv_rope`, which means Transformer Engine's kernel and asserts in inference.
    qkv_rope_fusion: bool = False


def _has_fused_wgrad() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (apex)

        return True
    except ImportError:
        return False


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU, tanh approximation (GPT-2's `gelu_new`)."""
    return F.gelu(x, approximate="tanh")


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, bf16: bool, fp16: bool,
                       on_gpu: bool, fp8: Optional[str] = None):
    """Map our sub-configs onto megatron-core's TransformerConfig (same field names), plus our
    own recompute option (`ActRecomputeMLP` in framework/models/layers.py) and FP8 recipe (`fp8`,
    `train.fp8`). Every family builds its model from this config."""
    # mcore's fused activation kernels (torch.compile'd), GPU only. Its bias+GeLU kernel
    # (fusions/fused_bias_gelu.py) computes the tanh approximation although it is selected by
    # activation_func=F.gelu: it serves "gelu_tanh" with biases, and exact "gelu" runs unfused so
    # that it means the same thing on GPU as on CPU. SwiGLU (fusions/fused_bias_swiglu.py): one
    # kernel per direction that keeps only fc1's output for the backward, instead of chunk, SiLU
    # and product kernels that keep SiLU's input and output and the gate.
    fuse = on_gpu and model.bias_activation_fusion is not False
    fuse_gelu = fuse and model.add_bias_linear and model.activation == "gelu_tanh"
    fuse_swiglu = fuse and model.activation == "swiglu"
    # null: not under model.torch_compile, where the kernel would break each layer's graph and
    # mcore's SwiGLU compiles inline
    swiglu_kernel = (fuse_swiglu and not model.add_bias_linear and swiglu_triton is not None
                     and (model.swiglu_kernel or (model.swiglu_kernel is None
                                                  and not model.torch_compile)))
    activation = F.gelu if fuse_gelu else {"gelu": F.gelu, "gelu_tanh": gelu_tanh,
                                           "swiglu": F.silu, "geglu_tanh": gelu_tanh,
                                           "relu": F.relu}[model.activation]
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    recompute = parallel.recompute_granularity
    # "mlp_act" is ours (mcore rejects names it does not know): the flag goes to our MLP through
    # the config, the rest to mcore. It is part of "mlp" (the whole MLP is recomputed) and does
    # nothing then; on its own mcore gets no recompute at all.
    modules = list(parallel.recompute_modules) if recompute == "selective" else []
    mlp_act = "mlp_act" in modules and "mlp" not in modules
    modules = [m for m in modules if m != "mlp_act"]
    if recompute == "selective" and not modules:
        recompute = None
    # model.fp8_fused_act: the fused bias + tanh-GeLU above, with the delayed recipe (whose scale
    # is known before the activation exists), where the MLP is not recomputed (a recompute
    # would run the unfused forward first, without grad; "mlp_act" recomputes the activation
    # itself) and not compiled
    mlp_recomputed = recompute == "full" or (recompute == "selective" and "mlp" in modules)
    # (null = off: see the config field)
    fp8_act_cast = bool(fp8 == "delayed" and fuse_gelu and model.fp8_fused_act
                        and not model.torch_compile and not mlp_recomputed and not mlp_act)
    rope_fusion = on_gpu and model.rope_fusion and model.position_embedding_type == "rope"
    if rope_fusion:
        # mcore validates apply_rope_fusion against TE's kernel at construction; without TE ours
        # must be in place first, for every caller (the preflight check builds a config too)
        mcore_patches.install_fused_rope()
    return ExtendedTransformerConfig(
        recompute_mlp_act=mlp_act,
        fp8_gemm=fp8,
        swiglu_kernel=swiglu_kernel,
        fp8_act_cast=fp8_act_cast,
        fp8_act_bwd_cast=bool(fp8_act_cast and model.fp8_fused_act_backward),
        fp8_bwd_fast_accum=bool(fp8 and model.fp8_backward_fast_accum),
        # (GPU, RoPE: the fused QKV path falls back to mcore's split + rotation elsewhere)
        qkv_rope_fusion=bool(rope_fusion and model.qkv_rope_fusion),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn,
        kv_channels=model.kv_channels,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=model.activation in ("swiglu", "geglu_tanh"),
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        # (mcore sums the q/k norm weights' gradients over TP ranks when this is set)
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        apply_residual_connection_post_layernorm=model.apply_residual_connection_post_layernorm,
        softmax_scale=model.softmax_scale,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        recompute_granularity=recompute,
        recompute_modules=modules if recompute == "selective" else None,
        recompute_method=parallel.recompute_method if recompute == "full" else None,
        recompute_num_layers=(parallel.recompute_num_layers or 1) if recompute == "full" else None,
        bf16=bf16,
        fp16=fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        # jit-fused (torch.jit) kernels need no apex/TE; they need CUDA
        bias_activation_fusion=fuse_gelu or fuse_swiglu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=on_gpu and (model.fused_wgrad or _has_fused_wgrad()),
        apply_rope_fusion=rope_fusion,
        deallocate_pipeline_outputs=True,
        overlap_p2p_comm=parallel.p2p_overlap,
        batch_p2p_comm=not parallel.p2p_overlap,
        persist_layer_norm=False,
        cuda_graph_impl="local" if on_gpu and model.cuda_graph else "none",
        # the whole layer; mcore's default spelling ("full") warns that it is deprecated
        cuda_graph_scope=[],
    )


def layer_spec(model: ModelConfig, fp8: Optional[str] = None, mask: str = "causal"):
    """One transformer layer: mcore modules, with our core attention and norm; self-attention
    with a `causal` or `padding` (bidirectional) mask; with `fp8` (a `train.fp8` recipe) the QKV,
    attention-projection, fc1 and fc2 linears run FP8 GEMMs."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                             TransformerLayerSubmodules)

    if fp8:
        qkv = Fp8BiasAddLinear if model.fused_bias_add else Fp8ColumnParallelLinear
    else:
        qkv = BiasAddLinear if model.fused_bias_add else ColumnParallelLinear
    # q/k norms (model.qk_layernorm): mcore builds them over one head (hidden_size = head dim)
    # and applies them after the QKV split, before RoPE. torch's norm (`Norm`), not the Triton
    # kernels of `model.fused_norm`, whose GPU tests cover rows of the model's width.
    qk_norm = Norm if model.qk_layernorm else IdentityOp
    # mcore calls the core-attention builder directly (a class or any callable), not build_module
    core_attention = (partial(SDPAttention, alibi=model.position_embedding_type == "alibi",
                              flex_kernel_options=model.flex_kernel_options,
                              alibi_kernel=model.alibi_kernel, cudnn=model.cudnn_attention,
                              window_of=model.windowed)
                      if model.attention_backend == "sdpa" else DotProductAttention)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_class(model),
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": getattr(AttnMaskType, mask)},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=Fp8RowParallelLinear if fp8 else RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_class(model),
            # mcore's MLP, linear_fc2=MLPOutputLinear, optionally recomputing its activation
            mlp=ActRecomputeMLP,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(model: ModelConfig, tcfg, vp_stage: Optional[int], mask: str = "causal"):
    """This pipeline stage's layers (`layer_spec`) and the final norm."""
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    n = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    spec = layer_spec(model, fp8=getattr(tcfg, "fp8_gemm", None), mask=mask)
    return TransformerBlockSubmodules(layer_specs=[spec] * n,
                                     layer_norm=norm_class(model))


def lm_kwargs(model: ModelConfig, *, vocab_size: int, pre_process: bool,
              post_process: bool) -> dict:
    """The constructor arguments every family's builder passes alike to mcore's language models."""
    return dict(vocab_size=vocab_size, max_sequence_length=model.max_positions,
                pre_process=pre_process, post_process=post_process, parallel_output=True,
                share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
                rotary_percent=model.rotary_percent)
