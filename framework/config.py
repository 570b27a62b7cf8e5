"""Typed config schemas.

Every Hydra group (`conf/<group>/*.yaml`) is validated against one dataclass here, registered in
Hydra's ConfigStore by `register_configs()`. Field names follow megatron-core's own
(`TransformerConfig`, `OptimizerConfig`, `DistributedDataParallelConfig`, `GPTDatasetConfig`,
`OptimizerParamScheduler`) so builders pass them through without a renaming layer.

Validation happens in `__post_init__`, which `OmegaConf.to_object` calls, so a bad config fails
in `train.py` before any process group or GPU memory exists. Checks that need the world size
(known only once we count GPUs) live in `Config.resolve_world`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from framework.errors import ConfigError, choice, require  # noqa: F401  (ConfigError: re-exported)
from framework.models import registry


# Integers in the config are sizes, counts and steps; megatron-core and numpy index several of
# them with int32, and no real setting comes near this.
INT_LIMIT = 2**31 - 1
# max_steps x global_batch_size samples are indexed up front (framework.data checks the memory
# that takes for the data at hand); beyond this many steps no run is real.
MAX_STEPS_LIMIT = 10**9


def check_numbers(obj: Any, prefix: str) -> None:
    """Every float field of the dataclass `obj` (and of its lists) finite, every int field within
    +-INT_LIMIT: NaN, inf and huge values are refused here, naming the field, before any check
    that compares them (NaN compares false with everything)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        for x in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            name = f"{prefix}{f.name}={value}"
            if isinstance(x, float):
                require(math.isfinite(x), f"{name} must be a finite number")
            else:
                require(-INT_LIMIT <= x <= INT_LIMIT,
                         f"{name} is out of range (at most {INT_LIMIT} in absolute value)")


def _positive_or_unset(obj: Any, prefix: str, names: tuple, unset: str) -> None:
    """Optional sizes: null means unset; 0 or a negative number is an error (never "unset")."""
    for f in names:
        v = getattr(obj, f)
        require(v is None or v > 0, f"{prefix}{f}={v} must be positive (or null: {unset})")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
# the largest multiple the vocabulary may be padded to (model.make_vocab_size_divisible_by)
MAX_VOCAB_MULTIPLE = 65536

@dataclass
class ModelConfig:
    """Architecture. Fields named as in megatron-core's TransformerConfig / GPTModel."""

    name: str = "gpt_tiny"
    type: str = "gpt"  # model family: a name in framework.models.registry.FAMILIES
    # The preset's learning rate (and floor), used when optimizer.lr (optimizer.min_lr) is null:
    # a tiny CPU model and a 1.5B model do not share one good learning rate. Not architecture;
    # a resume compares the resolved optimizer.lr / min_lr (framework/plan.py). Every preset in
    # conf/model sets it; 1e-3 is for configs built in code (Config(), HF imports).
    default_lr: Optional[float] = 1e-3
    default_min_lr: Optional[float] = None
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; 1 = MQA; None = MHA
    # Alias in the Accelerate/HF spelling: multiquery = num_query_groups 1, multihead = MHA
    attention_head_type: Optional[str] = None
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    kv_channels: Optional[int] = None
    seq_length: int = 64
    max_position_embeddings: Optional[int] = None  # None -> seq_length
    vocab_size: Optional[int] = None  # None -> from the tokenizer
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    # gelu = exact (erf) GeLU; gelu_tanh = its tanh approximation (GPT-2's "gelu_new");
    # swiglu / geglu_tanh = gated (GLU) MLPs with SiLU / tanh-GeLU (HF T5 v1.1 "gated-gelu")
    activation: str = "gelu"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # mcore: only used when add_bias_linear is False
    # RMSNorm/LayerNorm (model.normalization) over each query and key head, after the QKV split
    # and before RoPE (mcore's q_layernorm / k_layernorm; Qwen3, and a common stability fix).
    # Weights of head_dim, shared by all heads; their gradients are summed over TP ranks.
    qk_layernorm: bool = False
    # learned_absolute | rope | alibi (no position table: a per-head linear bias on the
    # attention scores) | none
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    # Llama-3 RoPE frequency scaling (HF rope_parameters rope_type "llama3"). rope_scaling and
    # rope_scaling_factor are megatron-core's GPTModel names; mcore fixes the other three at
    # Llama 3.1's values (1, 4, 8192), so they are ours and the frequencies are computed in
    # framework/models/gpt/rope_scaling.py from all four (HF's general llama3 parameters).
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    apply_residual_connection_post_layernorm: bool = False
    # "sdpa" = torch scaled_dot_product_attention (fast default); "local" = mcore DotProductAttention
    attention_backend: str = "sdpa"
    # GPT: sliding-window (local) causal attention, as Mistral v0.1 and windowed Qwen2/Qwen3
    # layers have it: each query attends to itself and the sliding_window - 1 tokens before it
    # (Hugging Face's rule, key index > query index - window). null = full causal attention.
    # In training, prefill, KV-cache decoding (dynamic and CUDA-graph steps) and beam search;
    # SDPA with a band mask (framework/models/layers.py). sliding_window_layers: the 0-based
    # layers that use the window (HF Qwen2/Qwen3: max_window_layers and up); null = every layer
    sliding_window: Optional[int] = None
    sliding_window_layers: Optional[List[int]] = None
    # ALiBi training through FlexAttention (model.alibi_kernel=flex, or fp32 on a GPU; bf16 with
    # another kernel refuses them): its Triton `kernel_options` (block sizes,
    # num_warps/num_stages, fwd_/bwd_ prefixed variants, USE_TMA, ...), merged over the defaults
    # in framework/fast/alibi.py (FLEX_KERNEL_OPTIONS). benchmarks/attention.py
    # compares settings on one card.
    flex_kernel_options: Dict[str, Any] = field(default_factory=dict)
    # How ALiBi reaches the attention kernel in training / prefill (causal, no padding mask):
    # cudnn = cuDNN's fused attention with its own ALiBi mask at TP1 (a dense bias tensor under
    # TP; bf16/fp16; needs nvidia-cudnn-frontend, a Linux x86_64 dependency; otherwise as
    # augmented); augmented = extra q/k head dims carrying slope * key position, so SDPA's fused
    # causal kernels run it, dropout included (bf16/fp16 on GPU, any dtype on CPU; fp32 on GPU
    # takes flex); flex = FlexAttention score_mod on GPU (no dropout, a head dim that is a power
    # of two >= 16: otherwise an error); dense = an SDPA float bias (the reference); auto
    # (default) = cudnn at TP1 when the frontend imports and model.cudnn_attention is not
    # false, else augmented, on GPU; dense on CPU (cudnn and flex on CPU are errors). Padding
    # masks, evaluation and KV-cache decoding use the dense bias or flex.
    # benchmarks/attention.py compares them on one card (times in benchmarks/RESULTS.md); the
    # auto order is the measured one, fastest first.
    alibi_kernel: str = "auto"
    # cuDNN's fused attention through the cuDNN frontend (framework/fast/cudnn_attention.py),
    # in training: q/k/v read in mcore's layout, GQA native. null (default) = for ALiBi at TP1
    # (cuDNN's own ALiBi mask, faster than the extra head dims) when nvidia-cudnn-frontend
    # imports; true = also for plain causal attention (where it is no faster than torch SDPA),
    # and required; false = never. Evaluation, generation and CUDA-graph capture use torch SDPA.
    cudnn_attention: Optional[bool] = None
    # GPT: fused, chunked output layer + vocab-parallel cross-entropy that never holds the fp32
    # logits of the whole micro-batch (framework/fast/fused_ce.py); same losses and gradients.
    # None -> on for GPT (the fast path; false = megatron-core's output layer + cross-entropy)
    fused_cross_entropy: Optional[bool] = None
    # GPT, fused cross-entropy: keep the micro-batch's logits (tokens x vocab/TP in bf16) from
    # forward to backward instead of recomputing them chunk by chunk, so the output layer runs
    # the 3 GEMMs of an unfused one, at full size (framework/fast/fused_ce.py). true = keep;
    # false = recompute (the least memory); null (default) = fused_ce.keep_logits_auto: keep
    # in training on a GPU when they take at most 8% of its memory (benchmarks/RESULTS.md,
    # 2026-12-05: Llama-3.2-1B shape at mb 16 on an H200)
    fused_ce_keep_logits: Optional[bool] = None
    # GPT, fused cross-entropy: tokens per chunk of the output layer (its logits and their
    # gradient exist one chunk at a time). null = as many as fit 256 MB of logits in the
    # compute dtype (1024 at vocab 128256 in bf16). Larger chunks cost that much more memory and
    # give the chunk's input-gradient GEMM more tiles to spread over the GPU
    fused_ce_chunk_tokens: Optional[int] = None
    # GPU: wrap each transformer layer in torch.compile (fuses the norm / bias / GeLU / residual
    # elementwise work between the matmuls); ignored on CPU. Off by default: with the fused
    # kernels below on, it measured no faster at the gpt2-large and Llama-1B shapes
    # (benchmarks/RESULTS.md, 2026-12-04)
    torch_compile: bool = False
    # GPU: weight gradients accumulate straight into megatron-core's fp32 main grads from the
    # GEMM (mcore's gradient_accumulation_fusion; without apex through torch.addmm with
    # out_dtype, framework/models/layers.py AddmmWgrad) instead of a bf16 wgrad plus a separate
    # fp32 add per weight: closer to the exact gradient (one rounding instead of two) and no
    # separate add kernel (benchmarks/norm_kernels.py). false = mcore's unfused path (apex's
    # kernel, when installed, is used either way).
    fused_wgrad: bool = True
    # GPU, RoPE: one Triton kernel per direction (framework/fast/rope.py) in place of
    # megatron-core's ~10 unfused elementwise kernels (TE's fused RoPE slot); false = mcore's
    rope_fusion: bool = True
    # GPU training, RoPE (with rope_fusion): q and k rotated as they are split out of the fused
    # QKV projection's output (framework/fast/rope.py fused_qkv_rope), which saves the copy of
    # the query heads and the concatenation of the three gradients. null/false = mcore's split,
    # then the rotation; null stays off until a GPU run has tested and measured it (written
    # 2026-12-04 without a GPU)
    qkv_rope_fusion: Optional[bool] = None
    # GPU training: LayerNorm / RMSNorm as one Triton kernel per direction (framework/fast/norm.py,
    # weight/bias grads reduced inside the backward kernel) in place of torch's native kernels
    # (forward, input gradient and a separate weight-gradient reduction; benchmarks/norm_kernels.py);
    # false = torch's F.layer_norm / F.rms_norm
    fused_norm: bool = True
    # GPU training: the QKV projection's bias add as one Triton kernel (framework/fast/bias.py)
    # in place of torch's generic broadcast add (same arithmetic, one read and one write of the
    # output); false = mcore's add
    fused_bias_add: bool = True
    # GPU: megatron-core's fused activation kernels (bias + tanh-GeLU for gelu_tanh with biases;
    # SwiGLU forward and backward for swiglu, keeping only fc1's output for the backward).
    # null = on where mcore has one, on GPU; false = the unfused reference (what CPUs run)
    bias_activation_fusion: Optional[bool] = None
    # GPU, swiglu without linear biases: SwiGLU as one Triton kernel per direction
    # (framework/fast/swiglu.py) in place of mcore's fused one, whose backward joins the two
    # halves' gradients with a cat. null = on where it applies (bias_activation_fusion on, GPU,
    # triton installed, not model.torch_compile); false = mcore's fused SwiGLU
    swiglu_kernel: Optional[bool] = None
    # GPU, train.fp8=delayed: fc2's FP8 input cast computes the MLP activation from fc1's output
    # (bias + tanh-GeLU: gelu_tanh with biases) in the same pass, so the activation is never
    # written and read back in bf16 (framework/fast/fp8.py). true = on (needs that activation
    # fused, no recompute of the MLP, no model.torch_compile); null/false = the activation
    # kernel, then the cast. Opt-in: its kernel, layer and 20-step training GPU tests passed
    # on 2026-12-04 (README, FP8), but the fix to its first step (rounded to bf16 before the
    # cast) has run only in the layer test, and it gains 1%
    fp8_fused_act: Optional[bool] = None
    # GPU, with fp8_fused_act: the activation's backward (megatron-core's bias-GeLU backward)
    # also casts its result, fc1's output gradient, to FP8 in the same pass, with the bias
    # gradient, so fc1's backward reads no bf16 gradient to cast it (framework/fast/fp8.py
    # act_backward_cast); fc1's bf16 output gradient is then not stored at all. null/false =
    # the activation's backward, then fc1's cast. Opt-in (GPU-tested since 2026-12-05; README)
    fp8_fused_act_backward: Optional[bool] = None
    # GPU, with train.fp8: the backward's FP8 GEMMs (input and weight gradients) use cuBLAS's
    # fast accumulation (no periodic promotion of the partial sums to fp32), as the forward GEMM
    # always does. Faster, less precise; torchao and Transformer Engine keep it off by default
    # in backward, and so do we (false)
    fp8_backward_fast_accum: bool = False
    # GPU: capture each transformer layer's forward and backward as CUDA graphs after warm-up
    # (megatron-core's local CudaGraphManager; the RNG tracker becomes graph-safe). Removes the
    # per-kernel launch cost that makes small/medium models CPU-bound. Ignored on CPU (a note).
    # null = on with train.fp8 on one GPU without activation recompute, torch.compile or
    # model.cudnn_attention=true (the FP8 layers' amax, cast and FP8-GEMM launches make an eager
    # step host-bound; the combination is GPU-tested there), off otherwise; resolved once the
    # world size is known
    cuda_graph: Optional[bool] = None
    # BERT (mcore BertModel): the sentence-order head (+ 2 token types) and its loss
    add_binary_head: bool = False
    # T5 (mcore T5Model): num_layers is the decoder's; the encoder has encoder_num_layers
    # (None -> num_layers). seq_length is the encoder's, decoder_seq_length the decoder's.
    encoder_num_layers: Optional[int] = None
    decoder_seq_length: Optional[int] = None
    # T5 relative position bias (position_embedding_type=relative)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # Attention softmax scale (mcore TransformerConfig.softmax_scale); None -> 1/sqrt(kv_channels).
    # Hugging Face T5 uses 1.0 (no scaling: its initialisation folds it into the query weights).
    softmax_scale: Optional[float] = None
    # T5 only: multiply the decoder output by hidden_size**-0.5 before the LM head (HF T5 v1.0
    # with tied embeddings, `scale_decoder_outputs`)
    scale_decoder_output: bool = False
    # T5 only: mcore's tied T5 LM head has a bias over the vocabulary; false removes it (HF T5)
    lm_head_bias: bool = True

    def __post_init__(self) -> None:
        check_numbers(self, "model.")
        require(bool(self.type), f"model.type must be set (one of {registry.names()})")
        for f in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            require(getattr(self, f) > 0, f"model.{f} must be positive, got {getattr(self, f)}")
        # null is the documented "unset" of these; 0 is an error, never "unset"
        _positive_or_unset(self, "model.", ("ffn_hidden_size",), "4 x model.hidden_size")
        _positive_or_unset(self, "model.", ("vocab_size",), "the tokenizer's vocabulary")
        _positive_or_unset(self, "model.", ("kv_channels",),
                           "model.hidden_size / model.num_attention_heads")
        _positive_or_unset(self, "model.", ("max_position_embeddings",), "model.seq_length")
        # (padding rows are real parameters: a huge multiple would allocate them all)
        require(0 < self.make_vocab_size_divisible_by <= MAX_VOCAB_MULTIPLE,
                 f"model.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} must "
                 f"be in [1, {MAX_VOCAB_MULTIPLE}]")
        for f in ("init_method_std", "layernorm_epsilon"):
            require(getattr(self, f) > 0, f"model.{f}={getattr(self, f)} must be positive")
        # megatron-core (0.16) keeps the field in TransformerConfig but no layer reads it: a run
        # with it on would train the pre-LN residual of the default, bit for bit
        require(not self.apply_residual_connection_post_layernorm,
                "model.apply_residual_connection_post_layernorm=true is not implemented by "
                "megatron-core's transformer layer (the run would be the pre-LN default): unset it")
        require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"model.hidden_size={self.hidden_size} must be divisible by "
            f"model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
        )
        if self.attention_head_type is not None:
            choice(self.attention_head_type, ("multiquery", "multihead"),
                    "model.attention_head_type")
            want = 1 if self.attention_head_type == "multiquery" else self.num_attention_heads
            require(self.num_query_groups in (None, want),
                     f"model.attention_head_type={self.attention_head_type} conflicts with "
                     f"model.num_query_groups={self.num_query_groups} (it means {want})")
            # written back only when set by the user (the schema default is None)
            self.num_query_groups = want if want != self.num_attention_heads else None
        if self.num_query_groups is not None:
            require(
                self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                f"model.num_query_groups={self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}",
            )
        require(
            self.position_embedding_type != "learned_absolute"
            or self.max_positions >= self.seq_length,
            f"model.seq_length={self.seq_length} exceeds "
            f"model.max_position_embeddings={self.max_position_embeddings}",
        )

        choice(self.alibi_kernel, ("auto", "augmented", "cudnn", "flex", "dense"),
                "model.alibi_kernel")
        choice(self.position_embedding_type,
                ("learned_absolute", "rope", "alibi", "none", "relative"),
                "model.position_embedding_type")
        self._check_family()
        require(0.0 < self.rotary_percent <= 1.0,
                 f"model.rotary_percent={self.rotary_percent} must be in (0, 1]")
        require(self.rotary_base > 0, f"model.rotary_base={self.rotary_base} must be positive")
        if self.rope_scaling:
            require(self.position_embedding_type == "rope",
                    f"model.rope_scaling=true needs model.position_embedding_type=rope (got "
                    f"{self.position_embedding_type})")
            require(self.rope_scaling_factor > 0 and self.rope_scaling_low_freq_factor > 0
                    and self.rope_scaling_original_max_position_embeddings > 0,
                    "model.rope_scaling_factor, model.rope_scaling_low_freq_factor and "
                    "model.rope_scaling_original_max_position_embeddings must be positive")
            require(self.rope_scaling_high_freq_factor > self.rope_scaling_low_freq_factor,
                    f"model.rope_scaling_high_freq_factor={self.rope_scaling_high_freq_factor} "
                    f"must exceed model.rope_scaling_low_freq_factor="
                    f"{self.rope_scaling_low_freq_factor}")
        if self.position_embedding_type == "rope":
            head_dim = self.head_dim
            rot = int(head_dim * self.rotary_percent)
            require(rot > 0 and rot % 2 == 0,
                     f"model.rotary_percent={self.rotary_percent} x head dim {head_dim} gives "
                     f"{rot} rotary channels; it must be a positive even number")
        self._check_sliding_window()
        require(self.position_embedding_type != "alibi" or self.attention_backend == "sdpa",
                 "model.position_embedding_type=alibi needs model.attention_backend=sdpa "
                 f"(got {self.attention_backend!r}: mcore's local attention has no ALiBi)")
        choice(self.normalization, ("LayerNorm", "RMSNorm"), "model.normalization")
        choice(self.activation, ("gelu", "gelu_tanh", "swiglu", "geglu_tanh", "relu"),
                "model.activation")
        choice(self.attention_backend, ("sdpa", "local"), "model.attention_backend")
        require(not self.bias_activation_fusion or self.activation == "swiglu"
                 or (self.activation == "gelu_tanh" and self.add_bias_linear),
                 f"model.bias_activation_fusion=true: megatron-core has no fused kernel for "
                 f"model.activation={self.activation} (add_bias_linear="
                 f"{self.add_bias_linear}); it fuses swiglu, and gelu_tanh with biases")
        require(not self.swiglu_kernel or (self.activation == "swiglu"
                                           and not self.add_bias_linear
                                           and self.bias_activation_fusion is not False),
                 f"model.swiglu_kernel=true needs model.activation=swiglu without linear biases "
                 f"and model.bias_activation_fusion not false (got activation="
                 f"{self.activation}, add_bias_linear={self.add_bias_linear}, "
                 f"bias_activation_fusion={self.bias_activation_fusion})")
        require(not self.fp8_fused_act or (
                    self.activation == "gelu_tanh" and self.add_bias_linear
                    and self.bias_activation_fusion is not False and not self.torch_compile),
                f"model.fp8_fused_act=true needs the fused gelu_tanh with biases "
                f"(model.activation=gelu_tanh, add_bias_linear=true, bias_activation_fusion not "
                f"false) and no model.torch_compile (got activation={self.activation}, "
                f"add_bias_linear={self.add_bias_linear}, bias_activation_fusion="
                f"{self.bias_activation_fusion}, torch_compile={self.torch_compile})")
        require(not self.fp8_fused_act_backward or self.fp8_fused_act,
                "model.fp8_fused_act_backward=true needs model.fp8_fused_act=true (it is the "
                "backward of that fused activation)")
        for f in ("hidden_dropout", "attention_dropout"):
            require(0.0 <= getattr(self, f) < 1,
                     f"model.{f}={getattr(self, f)} must be in [0, 1)")
        require(not self.qkv_rope_fusion or (self.position_embedding_type == "rope"
                                             and self.rope_fusion),
                f"model.qkv_rope_fusion=true needs RoPE with model.rope_fusion (got "
                f"position_embedding_type={self.position_embedding_type}, rope_fusion="
                f"{self.rope_fusion})")
        require(not (self.qkv_rope_fusion and self.qk_layernorm),
                "model.qkv_rope_fusion=true cannot run with model.qk_layernorm=true (the fused "
                "kernel rotates q and k before the q/k norms would apply); leave it null")
        require(self.fused_ce_chunk_tokens is None or (
                    isinstance(self.fused_ce_chunk_tokens, int)
                    and not isinstance(self.fused_ce_chunk_tokens, bool)
                    and self.fused_ce_chunk_tokens > 0),
                f"model.fused_ce_chunk_tokens={self.fused_ce_chunk_tokens} must be a positive "
                f"number of tokens (or null)")

    def _check_sliding_window(self) -> None:
        w, layers = self.sliding_window, self.sliding_window_layers
        require(w is None or (isinstance(w, int) and not isinstance(w, bool) and w > 0),
                f"model.sliding_window={w} must be a positive number of tokens (or null)")
        if layers is not None:
            require(w is not None, f"model.sliding_window_layers={list(layers)} needs "
                                   f"model.sliding_window")
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)
                   or not 0 <= i < self.num_layers]
            require(not bad, f"model.sliding_window_layers: {bad} are not layer indices in "
                             f"[0, {self.num_layers}) (0-based)")
            require(len(set(layers)) == len(layers),
                    f"model.sliding_window_layers={list(layers)} repeats a layer")
            # one spelling per model (sorted; every layer = null), so comparisons need no care
            self.sliding_window_layers = (None if sorted(layers) == list(range(self.num_layers))
                                          else sorted(layers))
        if w is None:
            return
        require(self.attention_backend == "sdpa",
                f"model.sliding_window={w} needs model.attention_backend=sdpa (got "
                f"{self.attention_backend!r}: mcore's local attention has no window)")
        require(self.position_embedding_type != "alibi",
                f"model.sliding_window={w} cannot run with model.position_embedding_type=alibi "
                f"(the ALiBi kernels attend over the whole causal range)")

    def windowed(self, layer: int) -> Optional[int]:
        """The window of 0-based layer `layer`, or None where it attends causally in full."""
        if self.sliding_window is None or (self.sliding_window_layers is not None
                                           and layer not in self.sliding_window_layers):
            return None
        return self.sliding_window

    def check_settings_used(self) -> None:
        """Settings a new run would accept and then not use (a one-line error naming the field).
        Called for configs composed for a run (`Config`), not for the model config stored in a
        checkpoint (`framework.checkpoint.reader.stored_model_config`), so that a checkpoint
        written before a check existed still loads."""
        if self.rope_scaling:
            # applied by the GPT builder (framework/models/gpt/rope_scaling.py) only
            require(self.type == "gpt", f"model.rope_scaling=true is applied to GPT models only "
                                        f"(model.type={self.type} would train without it)")
        require(self.rotary_percent == 1.0 or self.position_embedding_type == "rope",
                f"model.rotary_percent={self.rotary_percent} applies to "
                f"model.position_embedding_type=rope only (got {self.position_embedding_type})")
        # megatron-core's BertModel / T5Model build their RotaryEmbedding with the default base
        require(self.rotary_base == 10000 or (self.position_embedding_type == "rope"
                                              and self.type == "gpt"),
                f"model.rotary_base={self.rotary_base} is used by GPT models with "
                f"model.position_embedding_type=rope only (got model.type={self.type}, "
                f"position_embedding_type={self.position_embedding_type}): leave it 10000")
        self._check_attention_kernels()
        # (not for T5, whose presets set them: switching its position embedding keeps them)
        if self.position_embedding_type != "relative" and self.type != "t5":
            for f, value in _changed(self, ("relative_attention_num_buckets",
                                            "relative_attention_max_distance")):
                raise ConfigError(f"model.{f}={_shown(value)} shapes T5's relative position "
                                  f"bias, which model.position_embedding_type="
                                  f"{self.position_embedding_type} does not use: unset it")

    def _check_attention_kernels(self) -> None:
        """The attention-kernel switches reach a kernel that this model's training runs: where
        they do not, SDPAttention (framework/models/layers.py) would fall back without a word."""
        head, alibi = self.head_dim, self.position_embedding_type == "alibi"
        # (dense, the reference, is what attention without ALiBi runs anyway)
        require(alibi or self.alibi_kernel in ("auto", "dense"),
                f"model.alibi_kernel={self.alibi_kernel} needs model.position_embedding_type=alibi "
                f"(got {self.position_embedding_type}): leave it auto")
        require(alibi or not self.flex_kernel_options,
                f"model.flex_kernel_options={self.flex_kernel_options} needs "
                f"model.position_embedding_type=alibi (got {self.position_embedding_type})")
        require(self.alibi_kernel != "flex" or (self.attention_dropout == 0 and head >= 16
                                                and head & (head - 1) == 0),
                f"model.alibi_kernel=flex runs without dropout, at a head dim that is a power of "
                f"two >= 16 (got model.attention_dropout={self.attention_dropout}, head dim "
                f"{head}); otherwise training takes the dense bias: use alibi_kernel=auto")
        require(not (self.alibi_kernel == "cudnn" and self.cudnn_attention is False),
                "model.alibi_kernel=cudnn contradicts model.cudnn_attention=false (cuDNN never): "
                "unset one of them")
        if not self.cudnn_attention:
            return
        for ok, why in (
                (self.attention_backend == "sdpa",
                 f"model.attention_backend={self.attention_backend} (mcore's attention)"),
                (self.type != "bert", "model.type=bert (bidirectional attention with a padding "
                                      "mask; the cuDNN path runs causal attention)"),
                (self.position_embedding_type != "relative",
                 "model.position_embedding_type=relative (the cuDNN path takes no position bias)"),
                (head % 8 == 0 and head <= 128,
                 f"head dim {head} (cuDNN takes multiples of 8 up to 128)"),
                (self.cuda_graph is not True,
                 "model.cuda_graph=true (graph capture runs torch SDPA)"),
                (any(self.windowed(i) is None for i in range(self.num_layers)),
                 f"model.sliding_window={self.sliding_window} on every layer (the cuDNN path "
                 f"runs full causal attention; windowed layers take SDPA with a band mask)")):
            require(ok, f"model.cudnn_attention=true has no effect with {why}: leave it null")

    def _check_family(self) -> None:
        """What the model family (model.type) accepts: its position embeddings, the family-only
        options (FAMILY_OPTIONS) it declares, and its own rules (ModelSpec.check_model)."""
        t = self.type
        spec = registry.family(t)
        allowed = spec.position_embeddings
        require(self.position_embedding_type in allowed,
                f"model.position_embedding_type={self.position_embedding_type} is not "
                f"supported for model.type={t} (use one of {list(allowed)})")
        for name, unset in FAMILY_OPTIONS.items():
            value = getattr(self, name)
            if name in spec.options or value in unset:
                continue
            owners = "/".join(registry.family(n).label for n in registry.names()
                              if name in registry.family(n).options) or "no family's"
            require(False, f"model.{name}={_show(value)} is a {owners} option (model.type={t})")
        if self.fused_cross_entropy is None:  # on where the family offers it
            self.fused_cross_entropy = "fused_cross_entropy" in spec.options
        require(not self.fused_ce_keep_logits or self.fused_cross_entropy,
                f"model.fused_ce_keep_logits=true needs model.fused_cross_entropy (it is "
                f"{self.fused_cross_entropy} for model.type={t})")
        require(self.fused_ce_chunk_tokens is None or self.fused_cross_entropy,
                f"model.fused_ce_chunk_tokens={self.fused_ce_chunk_tokens} needs "
                f"model.fused_cross_entropy (it is {self.fused_cross_entropy} for model.type={t})")
        require(self.softmax_scale is None or self.softmax_scale > 0,
                f"model.softmax_scale={self.softmax_scale} must be positive (or null)")
        spec.check_model(self)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def enc_layers(self) -> int:
        """T5 encoder depth."""
        return self.encoder_num_layers or self.num_layers

    # Derived values are properties, never written back: OmegaConf instantiates the defaults
    # once to build the schema, so a value set in __post_init__ would leak into every config.
    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length


# ModelConfig fields that only some model families use (ModelSpec.options), with the values that
# mean "unset": a family that does not list a field refuses any other value.
FAMILY_OPTIONS: Dict[str, tuple] = {
    "fused_cross_entropy": (None, False),
    "add_binary_head": (False,),
    "scale_decoder_output": (False,),
    "lm_head_bias": (True,),
    "decoder_seq_length": (None,),
    "encoder_num_layers": (None,),
    "qk_layernorm": (False,),
    "sliding_window": (None,),
    "sliding_window_layers": (None,),
}


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------------------------
# parallel
# --------------------------------------------------------------------------------------------
# Selective recompute: megatron-core's modules that apply to our dense models, and ours
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "mlp_act")


@dataclass
class ParallelConfig:
    """Layout. Fields named as in ModelParallelConfig / DistributedDataParallelConfig."""

    name: str = "single"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # None -> all remaining devices (world_size / (TP*PP)); on CPU, 1.
    data_parallel_size: Optional[int] = None
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # None | "selective" | "full"
    recompute_granularity: Optional[str] = None
    # selective only, any of RECOMPUTE_MODULES. mlp_act (ours, framework/models/layers.py): the
    # MLP's activation output is not kept for fc2's backward but recomputed from fc1's output
    # (saves one [s, b, ffn/TP] tensor per layer for one elementwise kernel; within "mlp")
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    recompute_method: Optional[str] = None  # "uniform" | "block" (full recompute only)
    recompute_num_layers: Optional[int] = None
    # Pipeline p2p: None -> on with interleaving (Megatron-LM's default), off otherwise. With it
    # off, mcore batches the p2p ops (batch_isend_irecv), and at PP=2 the interleaved schedule
    # then posts sends/receives in both directions to the same peer, which pair up in the wrong
    # order (activations arrive as gradients): tests/test_pipeline_cpu.py shows it.
    overlap_p2p_comm: Optional[bool] = None
    distributed_backend: str = "nccl"  # gloo is used on CPU regardless
    distributed_timeout_minutes: int = 10

    def __post_init__(self) -> None:
        check_numbers(self, "parallel.")
        for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            require(getattr(self, f) >= 1, f"parallel.{f} must be >= 1, got {getattr(self, f)}")
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
        )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            require(vpp >= 1, f"parallel.virtual_pipeline_model_parallel_size={vpp} must be >= 1")
            require(
                vpp == 1 or self.pipeline_model_parallel_size > 1,
                "parallel.virtual_pipeline_model_parallel_size > 1 needs "
                "parallel.pipeline_model_parallel_size > 1",
            )
        if self.data_parallel_size is not None:
            require(self.data_parallel_size >= 1,
                     f"parallel.data_parallel_size={self.data_parallel_size} must be >= 1")
        if self.recompute_granularity is not None:
            choice(self.recompute_granularity, ("selective", "full"),
                    "parallel.recompute_granularity")
        choice(self.recompute_method, (None, "uniform", "block"), "parallel.recompute_method")
        # torch.distributed's built-in backends (a CPU run takes gloo whatever this says)
        choice(self.distributed_backend, ("nccl", "gloo", "ucc", "mpi"),
               "parallel.distributed_backend")
        bad = [m for m in self.recompute_modules or () if m not in RECOMPUTE_MODULES]
        require(not bad, f"parallel.recompute_modules={list(self.recompute_modules)}: {bad} "
                          f"not among {list(RECOMPUTE_MODULES)}")
        if self.recompute_granularity == "full":
            require(self.recompute_method in ("uniform", "block"),
                     "parallel.recompute_granularity=full needs parallel.recompute_method "
                     "(uniform or block)")
        _positive_or_unset(self, "parallel.", ("recompute_num_layers",), "1 with full recompute")
        # timedelta overflows past ~1.4e12 minutes; a week is already far beyond any collective
        require(0 < self.distributed_timeout_minutes <= 7 * 24 * 60,
                 f"parallel.distributed_timeout_minutes={self.distributed_timeout_minutes} must "
                 f"be in [1, {7 * 24 * 60}] (a week)")
        require(not (self.overlap_p2p_comm is False and vpp and vpp > 1
                      and self.pipeline_model_parallel_size == 2),
                 "parallel.overlap_p2p_comm=false with interleaving at "
                 "pipeline_model_parallel_size=2 gives wrong gradients (batched p2p to one "
                 "peer in both directions pairs up out of order); leave it unset")
        require(not self.overlap_param_gather or self.use_distributed_optimizer,
                 "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
        require(not self.overlap_p2p_comm or self.pipeline_model_parallel_size > 1,
                "parallel.overlap_p2p_comm=true overlaps pipeline sends and receives: it needs "
                f"parallel.pipeline_model_parallel_size > 1 (got "
                f"{self.pipeline_model_parallel_size})")
        # megatron-core's non-interleaved 1F1B schedule raises at the first step otherwise
        require(not self.overlap_p2p_comm or self.vpp is not None,
                "parallel.overlap_p2p_comm=true needs the interleaved schedule "
                "(parallel.virtual_pipeline_model_parallel_size > 1): megatron-core's "
                "non-interleaved one does not overlap sends and receives")

    @property
    def p2p_overlap(self) -> bool:
        return self.vpp is not None if self.overlap_p2p_comm is None else self.overlap_p2p_comm

    @property
    def vpp(self) -> Optional[int]:
        """Virtual pipeline size, None when not interleaving."""
        v = self.virtual_pipeline_model_parallel_size
        return v if v and v > 1 else None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    """Fields named as in megatron.core.optimizer.OptimizerConfig and OptimizerParamScheduler."""

    optimizer: str = "adam"
    # null: the model preset's default_lr / default_min_lr (min_lr: else 0.1 x lr, as in
    # Megatron-LM's GPT recipes); resolved once the whole config is known (Config.__post_init__)
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    lr_warmup_steps: int = 10
    lr_decay_steps: Optional[int] = None  # None -> train.max_steps
    lr_decay_style: str = "cosine"
    # fp16 loss scaling (mcore names); loss_scale set -> static scaling
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0**16
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2
    # Without apex/TE: torch's fused AdamW/SGD kernel (GPU and CPU) and foreach (sync-free)
    # grad-norm/scale/copy kernels instead of mcore's per-tensor fallbacks
    # (framework/fast/multi_tensor.py). It is also what lets train.defer_step_stats work.
    fused_step: bool = True
    # Resuming a checkpoint whose optimizer settings differ from these: its optimizer and
    # scheduler state would silently keep its own lr, min_lr, warm-up, decay, weight decay,
    # betas, eps and momentum, so such a resume is refused (RESUMED_OPTIMIZER_FIELDS, one line
    # naming them). true = continue with this config's values from the checkpoint's step (the
    # moments are kept; the schedule is recomputed at that step, and a null lr_decay_steps is
    # the new train.max_steps), as Megatron-LM's --override-opt_param-scheduler does
    override_on_resume: bool = False

    def __post_init__(self) -> None:
        check_numbers(self, "optimizer.")  # lr=inf would train and skip every step as non-finite
        choice(self.optimizer, ("adam", "sgd"), "optimizer.optimizer")
        choice(self.lr_decay_style, ("linear", "cosine", "constant"), "optimizer.lr_decay_style")
        if self.lr is not None:
            self._check_lr()
        for f in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            require(0 <= getattr(self, f) < 1, f"optimizer.{f}={getattr(self, f)} must be in "
                                                f"[0, 1)")
        require(self.adam_eps > 0, f"optimizer.adam_eps={self.adam_eps} must be positive")
        require(self.weight_decay >= 0,
                 f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        require(self.lr_warmup_steps >= 0,
                 f"optimizer.lr_warmup_steps={self.lr_warmup_steps} must be >= 0")
        _positive_or_unset(self, "optimizer.", ("lr_decay_steps",), "train.max_steps")
        require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 "
                                      f"(0 disables clipping)")
        require(self.loss_scale is None or self.loss_scale > 0,
                 f"optimizer.loss_scale={self.loss_scale} must be positive (or null: dynamic)")
        for f in ("initial_loss_scale", "min_loss_scale", "loss_scale_window"):
            require(getattr(self, f) > 0, f"optimizer.{f}={getattr(self, f)} must be positive")
        require(self.min_loss_scale <= self.initial_loss_scale,
                 f"optimizer.min_loss_scale={self.min_loss_scale} must be <= "
                 f"optimizer.initial_loss_scale={self.initial_loss_scale}")
        require(self.hysteresis >= 1, f"optimizer.hysteresis={self.hysteresis} must be >= 1")
        require(self.min_lr is None or self.lr_decay_style != "constant",
                f"optimizer.min_lr={self.min_lr} has no effect with optimizer.lr_decay_style="
                f"constant (the LR stays at optimizer.lr after warmup): unset it or pick "
                f"linear/cosine")

    def _check_lr(self) -> None:
        require(self.lr > 0, f"optimizer.lr must be positive, got {self.lr}")
        if self.min_lr is not None:
            require(0 <= self.min_lr <= self.lr,
                     f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]")

    def resolve_lr(self, model: "ModelConfig") -> None:
        """Fill a null lr / min_lr from the model preset (see the field comments)."""
        from_model = self.lr is None
        if from_model:
            require(model.default_lr is not None,
                     f"optimizer.lr is null and model={model.name} has no default_lr: give "
                     f"optimizer.lr=<value>")
            self.lr = float(model.default_lr)
        if self.min_lr is None:
            floor = model.default_min_lr if from_model else None
            self.min_lr = float(floor) if floor is not None else float(f"{self.lr / 10:.6g}")
        self._check_lr()


# --------------------------------------------------------------------------------------------
# data and tokenizer
# --------------------------------------------------------------------------------------------
EMBEDDED_DOCUMENTS_LIMIT = 200_000
# GPT packs the embedded corpus to the sequence length: data.num_documents x model.seq_length
# tokens are generated and preprocessed on the first run (minutes at this size; 4096-token
# presets at the default 20000 documents make 82M)
EMBEDDED_PACKED_TOKENS_LIMIT = 2 ** 28



@dataclass
class DataConfig:
    """Fields named as in GPTDatasetConfig where one exists."""

    type: str = "embedded"  # embedded | indexed | mock | random
    # Megatron blend: [prefix] or [weight, prefix, weight, prefix, ...]
    path: List[str] = field(default_factory=list)
    split: str = "949,50,1"
    path_to_cache: Optional[str] = None  # None -> <data dir>/cache or ~/.cache/framework
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 0
    # batches copied into page-locked host memory, so the host-to-GPU copy is asynchronous and
    # the host does not wait for the previous step's GPU work at each step's first batch;
    # null = on when training on a GPU (GPU-only: a CPU run goes without, with a note if true)
    pin_memory: Optional[bool] = None
    # embedded corpus
    num_documents: int = 20000
    # BERT/T5 masked-LM data (mcore MaskedWordPieceDatasetConfig); None -> Megatron-LM's
    # defaults for the model type (BERT: 3-grams; T5: geometric spans up to 10)
    masking_probability: float = 0.15
    short_sequence_probability: float = 0.1
    masking_max_ngram: Optional[int] = None
    masking_do_full_word: bool = True
    masking_do_permutation: bool = False
    masking_use_longer_ngrams: bool = False
    masking_use_geometric_distribution: Optional[bool] = None

    def __post_init__(self) -> None:
        check_numbers(self, "data.")
        choice(self.type, ("embedded", "indexed", "mock", "random"), "data.type")
        # the embedded corpus is generated on the first run; beyond this it takes minutes
        require(0 < self.num_documents <= EMBEDDED_DOCUMENTS_LIMIT,
                 f"data.num_documents={self.num_documents} must be in [1, "
                 f"{EMBEDDED_DOCUMENTS_LIMIT}] (more data: preprocess it and use data=indexed)")
        require(0 <= self.num_workers <= 64,
                 f"data.num_workers={self.num_workers} must be in [0, 64]")
        require(0.0 < self.masking_probability < 1.0,
                 f"data.masking_probability={self.masking_probability} must be in (0, 1)")
        require(0.0 <= self.short_sequence_probability <= 1.0,
                 f"data.short_sequence_probability={self.short_sequence_probability} must be in "
                 f"[0, 1]")
        require(self.masking_max_ngram is None or self.masking_max_ngram > 0,
                 f"data.masking_max_ngram={self.masking_max_ngram} must be positive")
        require(not (self.masking_use_geometric_distribution and self.masking_do_permutation),
                 "data.masking_use_geometric_distribution and data.masking_do_permutation "
                 "cannot both be true")
        if self.type == "indexed":
            require(len(self.path) > 0, "data=indexed needs data.path=[prefix] (or a blend "
                                         "[weight, prefix, ...])")
        if self.type == "random":
            # RandomTokens has no documents, files or splits: each of these would go unused
            unused = [f"data.{f}" for f, on in (
                ("path", bool(self.path)), ("eod_mask_loss", self.eod_mask_loss),
                ("reset_position_ids", self.reset_position_ids),
                ("reset_attention_mask", self.reset_attention_mask),
                ("split", self.split != "949,50,1")) if on]
            require(not unused, f"data=random draws ids with no documents, files or splits: "
                                f"{', '.join(unused)} would have no effect; unset them")
        parts = self.split.replace("/", ",").split(",")
        require(
            len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
            and sum(float(p) for p in parts) > 0,
            f"data.split={self.split!r} must be three non-negative numbers like '949,50,1'",
        )


@dataclass
class TokenizerConfig:
    # An HF tokenizer name or local directory. None -> the embedded char tokenizer (data=embedded)
    # or the tokenizer saved with the checkpoint being loaded.
    path: Optional[str] = None
    vocab_file: Optional[str] = None  # GPT-2 BPE vocab.json
    merge_file: Optional[str] = None  # GPT-2 BPE merges.txt

    def __post_init__(self) -> None:
        require((self.vocab_file is None) == (self.merge_file is None),
                 "tokenizer.vocab_file and tokenizer.merge_file must be given together")
        require(self.path is None or self.vocab_file is None,
                 "give either tokenizer.path or tokenizer.vocab_file/merge_file, not both")


# --------------------------------------------------------------------------------------------
# train, checkpoint, logging
# --------------------------------------------------------------------------------------------
@dataclass
class ProfileConfig:
    """torch.profiler traces of some train steps (framework.training.profiling)."""

    steps: List[int] = field(default_factory=list)  # [first, last] (1-based); [] = off
    ranks: Optional[List[int]] = field(default_factory=lambda: [0])  # null/[] = every rank
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        check_numbers(self, "train.profile.")
        s = list(self.steps)
        require(not s or (len(s) <= 2 and 1 <= s[0] <= s[-1]),
                 f"train.profile.steps={s} must be [first, last] with 1 <= first <= last "
                 f"(or [] for off)")
        require(all(r >= 0 for r in self.ranks or ()),
                 f"train.profile.ranks={self.ranks} must be ranks (>= 0)")


@dataclass
class TrainConfig:
    max_steps: int = 300  # 0: build, save the initial weights ("seed checkpoint") and stop
    micro_batch_size: int = 16
    # samples per optimizer step over all data-parallel ranks; null = micro_batch_size x the
    # data-parallel size (no accumulation, megatron-core's rule), fixed when the world is known
    # (resolve_world); a multiple of that accumulates gradients over micro-batches
    global_batch_size: Optional[int] = 32
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    seed: int = 1234
    device: str = "auto"  # auto | cuda | cpu
    # Mixed precision with megatron-core's field names. bf16=None -> bf16 on GPU, fp32 on CPU.
    bf16: Optional[bool] = None
    fp16: bool = False
    progress_bar: bool = True
    # Plugin point: the train-step class (see framework.training.step). Only `_target_` here.
    step: dict = field(default_factory=dict)
    # resilience (framework.training.stop, framework.training.nan_guard)
    max_minutes: Optional[float] = None  # wall-clock budget: save a checkpoint and exit 0
    nan_policy: str = "skip"  # non-finite loss/grad norm: skip the update | stop the run
    max_consecutive_nan: int = 10  # stop after this many non-finite steps in a row
    spike_factor: Optional[float] = None  # warn when loss > factor x running mean; None = off
    # Hang watchdog: a rank whose step phase (forward/backward, optimizer, eval, stop-flag
    # all-reduce, ...) makes no progress for this many seconds prints its rank, iteration and
    # phase and exits (status 3), which ends the whole run; a checkpoint save may take 6x as
    # long. null = parallel.distributed_timeout_minutes + 1 minute (NCCL's own timeout fires
    # first there). Shorter than the slowest real step would stop a healthy run.
    watchdog_seconds: Optional[float] = None
    # The host reads each step's loss and grad norm one step late (and at every log, eval, save
    # and stop), so it never waits for the GPU between steps; the finiteness check and the skip
    # of a non-finite step happen on the device. Same losses and updates as false (synchronous
    # steps). Needs optimizer.fused_step and no fp16 loss scaler; otherwise steps stay
    # synchronous.
    defer_step_stats: bool = True
    # FP8 GEMMs in the transformer layers' linears (QKV, attention projection, fc1, fc2), forward
    # and backward, on GPUs with FP8 (compute capability 8.9+; framework/fast/fp8.py). null/false
    # = off; tensorwise (= true) = one dynamic scale per tensor, e4m3 activations and weights,
    # e5m2 gradients; delayed = tensorwise with each scale from the tensor's amax over the last
    # 16 steps (no amax pass before each cast; values beyond the max saturate); rowwise = one
    # scale per row along each GEMM's reduction dim, all e4m3.
    # Weights stay bf16 (fp32 main params and grads); embeddings, the output layer, norms and
    # attention stay bf16. Needs bf16 and model.type=gpt.
    fp8: Optional[str] = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        check_numbers(self, "train.")
        choice(self.device, ("auto", "cuda", "cpu"), "train.device")
        choice(self.nan_policy, ("skip", "stop"), "train.nan_policy")
        require(self.max_steps <= MAX_STEPS_LIMIT,
                 f"train.max_steps={self.max_steps} is beyond {MAX_STEPS_LIMIT:,} steps "
                 f"(max_steps x global_batch_size samples are indexed before training starts)")
        # numpy seeds are < 2**32, and each pipeline stage adds 100 x its rank
        require(0 <= self.seed < 2**31, f"train.seed={self.seed} must be in [0, 2**31)")
        require(self.max_minutes is None or self.max_minutes > 0,
                 f"train.max_minutes must be positive (or null), got {self.max_minutes}")
        require(self.max_consecutive_nan > 0,
                 f"train.max_consecutive_nan must be positive, got {self.max_consecutive_nan}")
        require(self.spike_factor is None or self.spike_factor > 1,
                 f"train.spike_factor must be > 1 (or null), got {self.spike_factor}")
        require(self.watchdog_seconds is None or self.watchdog_seconds > 0,
                f"train.watchdog_seconds must be positive (or null), got "
                f"{self.watchdog_seconds}")
        require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        for f in ("micro_batch_size", "global_batch_size", "log_interval"):
            v = getattr(self, f)
            require((v is None and f == "global_batch_size") or (v is not None and v > 0),
                    f"train.{f} must be positive, got {v}")
        require(self.eval_interval >= 0 and self.eval_iters >= 0,
                 "train.eval_interval and train.eval_iters must be >= 0")
        require(not (self.fp16 and self.bf16),
                 "train.fp16=true and train.bf16=true cannot both be set")
        # Hydra hands a boolean to this string field as "True" / "False"
        if isinstance(self.fp8, str) and self.fp8.lower() in ("false", "none", "off", ""):
            self.fp8 = None
        elif isinstance(self.fp8, str) and self.fp8.lower() == "true":
            self.fp8 = "tensorwise"
        require(self.fp8 in (None, "tensorwise", "delayed", "rowwise"),
                 f"train.fp8={self.fp8!r} is not one of [null, 'tensorwise', 'delayed', "
                 f"'rowwise']")
        require(not self.fp8 or (not self.fp16 and self.bf16 is not False),
                 f"train.fp8={self.fp8} needs bf16 (FP8 GEMMs between bf16 layers): unset "
                 f"train.fp16 / train.bf16=false")


@dataclass
class CheckpointConfig:
    # Save here and auto-resume from the latest checkpoint here. None -> checkpoints/<overrides>
    # under the directory train.py was started from (so the same command resumes).
    dir: Optional[str] = None
    save_interval: int = 500  # conf/train.yaml's value
    load: Optional[str] = None  # start from another checkpoint (when `dir` has none yet)
    # start from a Hugging Face model directory (when `dir` has no checkpoint yet); the model
    # config must describe the same architecture (e.g. model=gpt2_small for HF "gpt2")
    load_hf: Optional[str] = None
    allow_pickle: bool = False  # let load_hf read pytorch_model.bin (weights_only) files
    save: bool = True
    keep_last: Optional[int] = None  # keep only the newest N committed checkpoints; None = all
    # follow symlinks inside checkpoints read (dir, load); refused by default: a checkpoint is a
    # closed tree, so a link cannot make the run read files from elsewhere
    allow_symlinks: bool = False
    # load this committed iteration instead of the tracker's (of `dir` when resuming, else of
    # `load`): e.g. the earlier checkpoint that a failed verification names
    load_iteration: Optional[int] = None
    # check the xxh3_64 checksums in each checkpoint's manifest.json when loading (sizes are
    # always checked); false skips reading every byte twice for huge checkpoints
    verify: bool = True

    def __post_init__(self) -> None:
        check_numbers(self, "checkpoint.")
        require(self.load_iteration is None or self.load_iteration >= 0,
                f"checkpoint.load_iteration must be >= 0 (or null), got {self.load_iteration}")
        require(self.keep_last is None or self.keep_last > 0,
                 f"checkpoint.keep_last must be positive (or null), got {self.keep_last}")
        require(not (self.load and self.load_hf),
                 "give checkpoint.load or checkpoint.load_hf, not both")
        require(self.save_interval > 0,
                 f"checkpoint.save_interval must be positive, got {self.save_interval}")


def wandb_mode_in_effect(logging_cfg) -> str:
    """The mode W&B starts in for `logging.*` (framework/training/metrics.py) and the run summary
    reports: logging.wandb_mode, else $WANDB_MODE, else online."""
    return logging_cfg.wandb_mode or os.environ.get("WANDB_MODE") or "online"


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "framework"
    wandb_name: Optional[str] = None
    wandb_mode: Optional[str] = None  # None -> $WANDB_MODE, else "online"
    wandb_tags: List[str] = field(default_factory=list)
    wandb_notes: Optional[str] = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        require(self.wandb_mode in (None, "online", "offline", "disabled", "shared"),
                 f"logging.wandb_mode={self.wandb_mode!r} is not one of "
                 f"[null, 'online', 'offline', 'disabled', 'shared']")
        # W&B's own rules, which it enforces only in wandb.init (after the model is built)
        project = str(self.wandb_project)
        require(project.strip() and len(project) <= 128
                and not any(c in project for c in "/\\#?%:"),
                f"logging.wandb_project={project!r} is not a W&B project name (1 to 128 "
                f"characters, none of / \\ # ? % :)")
        for tag in self.wandb_tags:
            require(1 <= len(str(tag)) <= 64,
                    f"logging.wandb_tags: {str(tag)[:40]!r}{'...' if len(str(tag)) > 40 else ''} "
                    f"is not a W&B tag (1 to 64 characters)")


def _default(cls: type, name: str) -> Any:
    """The schema default of field `name` of dataclass `cls`."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default


def _changed(obj: Any, names: tuple) -> List[tuple]:
    """(name, value) of the fields `names` of `obj` set away from their schema default: the
    settings-used checks leave a field at its default alone."""
    return [(n, getattr(obj, n)) for n in names if getattr(obj, n) != _default(type(obj), n)]


def _shown(value: Any) -> str:
    """A value as an override writes it (null, true/false, 128 for 128.0)."""
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else _show(value)


# optimizer fields of megatron-core's DynamicGradScaler (fp16 without optimizer.loss_scale)
# What a resumed optimizer and scheduler take from the checkpoint (megatron-core's scheduler
# keeps its own values; the optimizer's param groups carry betas, eps and momentum)
RESUMED_OPTIMIZER_FIELDS = ("optimizer", "lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                            "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2",
                            "adam_eps", "sgd_momentum")
# the fields of the other optimizer, which this one never reads
UNREAD_BY_OPTIMIZER = {"adam": ("sgd_momentum",), "sgd": ("adam_beta1", "adam_beta2", "adam_eps")}
# ...of which the scheduler's state holds these (the optimizer's param groups the rest)
SCHEDULED_OPTIMIZER_FIELDS = ("lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                              "lr_decay_style", "weight_decay")
DYNAMIC_LOSS_SCALE_FIELDS = ("initial_loss_scale", "min_loss_scale", "loss_scale_window",
                             "hysteresis")
# data fields that only some data types read (data=random refuses its own in DataConfig):
# path (the blend of data=indexed), split (mcore's MockGPTDataset forces 1,1,1), the embedded
# corpus size, the index cache (data=random has no index)
DATA_FIELD_TYPES: Dict[str, tuple] = {
    "path": ("indexed",),
    "split": ("embedded", "indexed"),
    "num_documents": ("embedded",),
    "path_to_cache": ("embedded", "indexed", "mock"),
}
# masked-LM data fields (megatron-core's MaskedWordPieceDatasetConfig; framework/data/masked_lm.py)
MASKED_LM_FIELDS = ("masking_probability", "short_sequence_probability", "masking_max_ngram",
                    "masking_do_full_word", "masking_do_permutation", "masking_use_longer_ngrams",
                    "masking_use_geometric_distribution")
# the masked-LM families and whether their span lengths are geometric when
# data.masking_use_geometric_distribution is null (framework/models/{bert,t5}/data.py)
MASKED_LM_GEOMETRIC = {"bert": False, "t5": True}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "."

    def __post_init__(self) -> None:
        m, p, t = self.model, self.parallel, self.train
        m.check_settings_used()
        self.optimizer.resolve_lr(m)
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        require(m.num_attention_heads % tp == 0,
                 f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
                 f"parallel.tensor_model_parallel_size={tp}")
        groups = m.num_query_groups or m.num_attention_heads
        require(groups % tp == 0 or tp % groups == 0,
                 f"model.num_query_groups={groups} and parallel.tensor_model_parallel_size={tp}: "
                 f"one must divide the other")
        require(not m.qkv_rope_fusion or groups >= tp,
                f"model.qkv_rope_fusion=true needs a whole KV group per TP rank "
                f"(model.num_query_groups={groups} < parallel.tensor_model_parallel_size={tp}, "
                f"where megatron-core gathers the QKV output first): leave it null")
        require(m.ffn % tp == 0,
                 f"model.ffn_hidden_size={m.ffn} must be divisible by "
                 f"parallel.tensor_model_parallel_size={tp}")
        vpp = p.vpp or 1
        require(m.num_layers % (pp * vpp) == 0,
                 f"model.num_layers={m.num_layers} must be divisible by "
                 f"parallel.pipeline_model_parallel_size={pp} x "
                 f"parallel.virtual_pipeline_model_parallel_size={vpp}")
        if p.sequence_parallel:
            require(m.seq_length % tp == 0,
                     f"model.seq_length={m.seq_length} must be divisible by "
                     f"parallel.tensor_model_parallel_size={tp} when parallel.sequence_parallel")
            require(m.decoder_seq_length is None or m.decoder_seq_length % tp == 0,
                     f"model.decoder_seq_length={m.decoder_seq_length} must be divisible by "
                     f"parallel.tensor_model_parallel_size={tp} when parallel.sequence_parallel")
        spec = registry.family(m.type)
        require(self.data.type in spec.data_types,
                f"data={self.data.type} is not supported for model.type={m.type} (use "
                f"{' or '.join('data=' + d for d in spec.data_types)})")
        spec.check_run(self)
        require(not self.model.fp8_backward_fast_accum or t.fp8,
                "model.fp8_backward_fast_accum=true needs train.fp8 (it is a setting of the FP8 "
                "GEMMs' backward)")
        require(not self.model.fp8_fused_act or t.fp8 == "delayed",
                f"model.fp8_fused_act=true needs train.fp8=delayed (the fused cast takes its "
                f"scale from the amax history; got train.fp8={t.fp8})")
        require(not self.model.fp8_fused_act or not (
                    p.recompute_granularity == "full" or (p.recompute_granularity == "selective"
                                                          and ({"mlp", "mlp_act"}
                                                               & set(p.recompute_modules)))),
                f"model.fp8_fused_act=true cannot run with the MLP recomputed (parallel."
                f"recompute_granularity={p.recompute_granularity}, recompute_modules="
                f"{list(p.recompute_modules or [])}): unset one of them")
        if t.fp8:
            self._check_fp8()
        self._check_unused()
        require(t.global_batch_size is None or t.global_batch_size % t.micro_batch_size == 0,
                 f"train.global_batch_size={t.global_batch_size} must be divisible by "
                 f"train.micro_batch_size={t.micro_batch_size}")
        if p.data_parallel_size is not None:
            self._check_batch(p.data_parallel_size)
        if self.data.type == "embedded":
            require(self.checkpoint.load_hf is None,
                     "checkpoint.load_hf needs data=indexed, mock or random: the embedded corpus is "
                     "tokenized with its own character tokenizer, not the model's")
            require(self.tokenizer.path is None and self.tokenizer.vocab_file is None,
                     "data=embedded uses its own tokenizer; unset tokenizer.path/vocab_file or "
                     "pick data=indexed")

    def _check_unused(self) -> None:
        """Settings this run would accept and then not use (transformer_config passes each
        recompute field only with its granularity; the profiler stops at train.max_steps)."""
        p, t, m = self.parallel, self.train, self.model
        # RoPE has no position table, but the checkpoint records max_position_embeddings as the
        # model's context: generation refused prompts longer than it after a longer training.
        # (Here, not in ModelConfig, which also reads older checkpoints' stored configs.)
        require(
            m.position_embedding_type != "rope" or m.max_positions >= m.seq_length,
            f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}, the context the checkpoint would record (used by "
            f"generation and the HF export): raise model.max_position_embeddings to at least "
            f"{m.seq_length}",
        )
        for f, value in (("recompute_method", p.recompute_method),
                         ("recompute_num_layers", p.recompute_num_layers)):
            require(value is None or p.recompute_granularity == "full",
                    f"parallel.{f}={value} applies to parallel.recompute_granularity=full only "
                    f"(got {p.recompute_granularity})")
        layers = max(self.model.num_layers, self.model.encoder_num_layers or 0)
        stage = layers // max(1, p.pipeline_model_parallel_size)
        require(p.recompute_num_layers is None or p.recompute_num_layers <= stage,
                f"parallel.recompute_num_layers={p.recompute_num_layers} is more than the "
                f"{stage} layers a pipeline stage holds ({layers} layers / parallel."
                f"pipeline_model_parallel_size={p.pipeline_model_parallel_size})")
        modules = list(p.recompute_modules or [])
        require(not modules or modules == ["core_attn"] or p.recompute_granularity == "selective",
                f"parallel.recompute_modules={modules} applies to "
                f"parallel.recompute_granularity=selective only (got {p.recompute_granularity})")
        require(modules or p.recompute_granularity != "selective",
                "parallel.recompute_granularity=selective needs parallel.recompute_modules "
                f"(one or more of {list(RECOMPUTE_MODULES)})")
        steps = list(t.profile.steps)
        require(not steps or steps[0] <= t.max_steps,
                f"train.profile.steps={steps} starts after train.max_steps={t.max_steps}: no "
                f"step would be profiled")
        self._check_optimizer_used()
        self._check_data_used()
        self._check_run_used()

    def _check_optimizer_used(self) -> None:
        """Optimizer fields the chosen optimizer, precision and LR schedule read
        (framework/optimizer.py, megatron-core's get_megatron_optimizer)."""
        o, t = self.optimizer, self.train
        name, label = {"adam": ("sgd", "an SGD"), "sgd": ("adam", "an Adam")}[o.optimizer]
        unread = UNREAD_BY_OPTIMIZER[o.optimizer]
        for f, value in _changed(o, unread):
            raise ConfigError(f"optimizer.{f}={_shown(value)} is {label} setting and "
                              f"optimizer.optimizer={o.optimizer} never reads it: unset it (or "
                              f"optimizer={name})")
        # megatron-core builds the DynamicGradScaler from these for fp16 without loss_scale only
        for f, value in _changed(o, DYNAMIC_LOSS_SCALE_FIELDS):
            require(t.fp16, f"optimizer.{f}={_shown(value)} tunes fp16's dynamic loss scaling: it "
                            f"needs train.fp16=true (got train.fp16={_shown(t.fp16)})")
            require(o.loss_scale is None,
                    f"optimizer.{f}={_shown(value)} tunes dynamic loss scaling, which "
                    f"optimizer.loss_scale={_shown(o.loss_scale)} (a static scale) replaces: unset one")
        require(o.lr_decay_steps is None or o.lr_decay_style != "constant",
                f"optimizer.lr_decay_steps={o.lr_decay_steps} has no effect with "
                f"optimizer.lr_decay_style=constant (the LR stays at optimizer.lr after warmup): "
                f"unset it or pick linear/cosine")

    def _check_data_used(self) -> None:
        """Data fields the data type and the model family's datasets read (framework/data/gpt.py
        for GPT samples, framework/data/masked_lm.py for BERT/T5)."""
        d, m = self.data, self.model
        for f, value in _changed(d, tuple(DATA_FIELD_TYPES)):
            types = DATA_FIELD_TYPES[f]
            readers = " and ".join("data=" + x for x in types)
            require(d.type in types, f"data.{f}={_shown(value)} is read by {readers} only (got "
                                     f"data={d.type}): unset it")
        require(not d.reset_attention_mask,
                "data.reset_attention_mask=true has no effect: the datasets build no attention "
                "mask (the models' attention kernels are causal over the whole sequence): unset "
                "it (data.reset_position_ids=true resets positions at document ends)")
        if m.type == "gpt":
            for f, value in _changed(d, MASKED_LM_FIELDS):
                raise ConfigError(f"data.{f}={_shown(value)} applies to masked-LM data (model.type="
                                  f"bert/t5); model.type=gpt trains on GPT samples without it")
            if d.type == "embedded":  # framework/data/embedded.py packed_documents, AnswerLoss
                tokens = d.num_documents * m.seq_length
                require(tokens <= EMBEDDED_PACKED_TOKENS_LIMIT,
                        f"data=embedded packs data.num_documents={d.num_documents} documents of "
                        f"model.seq_length={m.seq_length} tokens ({tokens / 1e6:,.0f}M tokens, "
                        f"more than the {EMBEDDED_PACKED_TOKENS_LIMIT / 1e6:.0f}M it builds on a "
                        f"first run): lower data.num_documents to at most "
                        f"{EMBEDDED_PACKED_TOKENS_LIMIT // m.seq_length}, or use data=indexed")
                for f, value in _changed(d, ("reset_position_ids", "eod_mask_loss")):
                    raise ConfigError(
                        f"data.{f}={_shown(value)} has no effect on data=embedded: each sample "
                        f"is one packed document ending in its end-of-document token, which the "
                        f"answer-only loss leaves out already; use it with data=indexed/mock")
        elif m.type in MASKED_LM_GEOMETRIC:
            for f, value in _changed(d, ("reset_position_ids", "eod_mask_loss")):
                raise ConfigError(f"data.{f}={_shown(value)} applies to GPT samples; "
                                  f"model.type={m.type} trains on masked-LM samples without it")
            geometric = d.masking_use_geometric_distribution
            default = geometric is None
            if default:
                geometric = MASKED_LM_GEOMETRIC[m.type]
            why = (f"null: model.type={m.type}'s default, true" if default else "true")
            for f in ("masking_use_longer_ngrams", "masking_do_permutation"):
                require(not (geometric and getattr(d, f)),
                        f"data.{f}=true cannot be used with geometric span lengths "
                        f"(data.masking_use_geometric_distribution={why}; megatron-core "
                        f"{'ignores it' if f == 'masking_use_longer_ngrams' else 'refuses both'})"
                        f": set data.masking_use_geometric_distribution=false or unset data.{f}")

    def _check_run_used(self) -> None:
        """Train, profile, checkpoint and logging fields that need another switch."""
        t, c, lg = self.train, self.checkpoint, self.logging
        if not t.profile.steps:
            for f, value in _changed(t.profile, ("ranks", "record_shapes", "profile_memory",
                                                 "with_stack")):
                raise ConfigError(f"train.profile.{f}={_shown(value)} has no effect without "
                                  f"train.profile.steps=[first, last] (profiling is off)")
        require(t.nan_policy == "skip" or t.max_consecutive_nan == _default(TrainConfig,
                                                                             "max_consecutive_nan"),
                f"train.max_consecutive_nan={t.max_consecutive_nan} applies to "
                f"train.nan_policy=skip (train.nan_policy=stop stops at the first non-finite "
                f"step): unset one of them")
        require(not (t.eval_interval and t.eval_iters == 0),
                f"train.eval_iters=0 evaluates nothing every train.eval_interval="
                f"{t.eval_interval} steps: set train.eval_interval=0 to turn evaluation off, or "
                f"train.eval_iters >= 1")
        require(c.save or c.keep_last is None,
                f"checkpoint.keep_last={c.keep_last} prunes saved checkpoints and "
                f"checkpoint.save=false saves none: unset one of them")
        require(not c.allow_pickle or c.load_hf is not None,
                "checkpoint.allow_pickle=true lets checkpoint.load_hf read pytorch_model.bin "
                "files; without checkpoint.load_hf it has no effect: unset it")
        if not lg.wandb:
            for f, value in _changed(lg, ("wandb_project", "wandb_name", "wandb_mode",
                                          "wandb_tags", "wandb_notes")):
                raise ConfigError(f"logging.{f}={_shown(value)} is a W&B setting and "
                                  f"logging.wandb=false: use logging=wandb (or "
                                  f"logging.wandb=true), or unset it")

    def _check_fp8(self) -> None:
        """torch's FP8 GEMM needs every reduction dim and output width to be a multiple of 16:
        the linears' input and output widths on each TP rank, and the tokens per micro-batch."""
        m, tp, t = self.model, self.parallel.tensor_model_parallel_size, self.train
        supported = registry.with_capability("fp8")
        require(m.type in supported, f"train.fp8 is supported for model.type="
                                     f"{'/'.join(supported)} (got {m.type})")
        head = m.kv_channels or m.hidden_size // m.num_attention_heads
        groups = m.num_query_groups or m.num_attention_heads
        widths = {"model.hidden_size": m.hidden_size,
                  "model.ffn_hidden_size / TP": m.ffn // tp,
                  "attention width (heads x head dim) / TP": m.num_attention_heads * head // tp,
                  "QKV width / TP": (m.num_attention_heads + 2 * groups) * head // tp,
                  "train.micro_batch_size x model.seq_length": t.micro_batch_size * m.seq_length}
        for name, v in widths.items():
            require(v % 16 == 0, f"train.fp8 needs {name} to be a multiple of 16 (got {v})")

    def _check_batch(self, dp: int) -> None:
        t = self.train
        if t.global_batch_size is None:  # null: one micro-batch per data-parallel rank
            t.global_batch_size = t.micro_batch_size * dp
        require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} must be divisible by "
                 f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")
        vpp = self.parallel.vpp
        if vpp:
            n_micro = t.global_batch_size // (t.micro_batch_size * dp)
            pp = self.parallel.pipeline_model_parallel_size
            require(n_micro % pp == 0,
                     f"interleaved pipelining needs the number of micro-batches ({n_micro} = "
                     f"train.global_batch_size / (train.micro_batch_size x DP)) to be a multiple "
                     f"of parallel.pipeline_model_parallel_size={pp}: set train.global_batch_size "
                     f"to a multiple of {pp * t.micro_batch_size * dp}")

    def resolve_world(self, world_size: int, on_gpu: bool) -> None:
        """Fix data_parallel_size from the world size and check every world-dependent rule."""
        p = self.parallel
        mp = p.model_parallel_size
        require(world_size % mp == 0,
                 f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size"
                 f"={p.tensor_model_parallel_size} x parallel.pipeline_model_parallel_size="
                 f"{p.pipeline_model_parallel_size}")
        dp = world_size // mp
        if p.data_parallel_size is not None:
            require(p.data_parallel_size == dp,
                     f"parallel.data_parallel_size={p.data_parallel_size} but world size "
                     f"{world_size} / (TP x PP = {mp}) = {dp}")
        p.data_parallel_size = dp
        self._check_batch(dp)
        m = self.model
        if m.cuda_graph is None:
            # on only where the combination is GPU-tested: train.fp8 on one GPU (TP = PP = DP =
            # 1), without activation recompute or torch.compile
            # (nor with model.cudnn_attention=true, which graph capture would leave unused)
            m.cuda_graph = bool(on_gpu and self.train.fp8 and world_size == 1
                                and p.recompute_granularity is None and not m.torch_compile
                                and not m.cudnn_attention)
        # (on a CPU the plan names the missing CUDA device instead)
        require(not (on_gpu and m.cudnn_attention and self.train.bf16 is False
                     and not self.train.fp16),
                "model.cudnn_attention=true has no effect in fp32 (train.bf16=false; cuDNN's "
                "attention takes bf16/fp16): leave it null")
        # an ALiBi kernel asked for by name that SDPAttention would leave for another one
        half = self.train.fp16 or self.train.bf16 is not False
        if on_gpu and m.alibi_kernel in ("cudnn", "augmented"):
            require(half, f"model.alibi_kernel={m.alibi_kernel} runs in bf16/fp16; in fp32 "
                          f"(train.bf16=false) training takes FlexAttention or the dense bias: "
                          f"use model.alibi_kernel=auto")
        # FlexAttention serves ALiBi training only by name, or in fp32 (the fused kernels take
        # bf16/fp16; decoding and padding masks take the dense bias)
        require(not (on_gpu and m.flex_kernel_options and half and m.alibi_kernel != "flex"),
                f"model.flex_kernel_options={m.flex_kernel_options} tune FlexAttention, which "
                f"bf16/fp16 ALiBi training with model.alibi_kernel={m.alibi_kernel} does not "
                f"run (it takes cuDNN or the extra head dims): set model.alibi_kernel=flex, or "
                f"unset them")
        if on_gpu and m.alibi_kernel == "cudnn":
            head = m.head_dim
            require(head % 8 == 0 and head <= 128,
                    f"model.alibi_kernel=cudnn: cuDNN takes head dims that are multiples of 8 up "
                    f"to 128 (got {head}); training would take another kernel: use "
                    f"model.alibi_kernel=auto")
        ranks = self.train.profile.ranks or []
        require(not self.train.profile.steps or not ranks or min(ranks) < world_size,
                f"train.profile.ranks={list(ranks)}: no such rank in a world of {world_size} "
                f"(ranks 0..{world_size - 1}), so nothing would be profiled")
        if not on_gpu:
            import os

            # one process per rank, each holding torch and a model copy
            limit = max(8, 2 * (os.cpu_count() or 1))
            require(world_size <= limit,
                     f"the layout needs {world_size} worker processes (parallel.tensor_model_"
                     f"parallel_size={p.tensor_model_parallel_size} x data-parallel size {dp}); "
                     f"a CPU run allows at most {limit} (2 x the CPU cores, at least 8)")
            self._check_cpu()
        # megatron-core scales the loss of its mixed-precision optimizers only (GPU: bf16, fp16 or
        # the distributed optimizer); the fp32 optimizer (and every CPU run) never reads it
        t, o = self.train, self.optimizer
        half = t.fp16 or (on_gpu if t.bf16 is None else t.bf16)
        require(o.loss_scale is None or (on_gpu and (half or p.use_distributed_optimizer)),
                f"optimizer.loss_scale={_shown(o.loss_scale)} scales the loss of bf16/fp16 training; "
                f"this run trains in fp32 ({'on the CPU' if not on_gpu else 'train.bf16=false'}), "
                f"where nothing reads it: unset it")

    def _check_cpu(self) -> None:
        """What a CPU run cannot do, in one line that names what does run on a CPU."""
        p, t, m = self.parallel, self.train, self.model
        gpu_only = []
        if p.pipeline_model_parallel_size > 1:
            gpu_only.append(f"pipeline parallelism (parallel.pipeline_model_parallel_size="
                            f"{p.pipeline_model_parallel_size}: megatron-core's pipeline "
                            f"schedules are CUDA-only)")
        if p.sequence_parallel:
            gpu_only.append("sequence parallelism (parallel.sequence_parallel=true: gloo has no "
                            "reduce-scatter)")
        if p.use_distributed_optimizer:
            gpu_only.append("the distributed optimizer (parallel.use_distributed_optimizer=true: "
                            "CUDA-only in megatron-core)")
        if gpu_only:
            tp = p.tensor_model_parallel_size
            works = {1: ["parallel=single"], 2: ["parallel=tp2"]}.get(
                tp, ["parallel=single", f"parallel.tensor_model_parallel_size={tp}"])
            tiny = registry.family(m.type).cpu_model  # a model that trains in minutes on a CPU
            if m.hidden_size > 256 and tiny:
                works.append(f"model={tiny}")
            raise ConfigError(
                f"parallel={p.name} needs GPUs for {' and '.join(gpu_only)}, and this run is on "
                f"the CPU (no CUDA device, or train.device=cpu). Tensor and data parallelism run "
                f"on a CPU over gloo: `{' '.join(works)}` works here")
        for flag in ("bf16", "fp16"):
            require(not getattr(t, flag),
                    f"train.{flag}=true needs a GPU; a CPU run trains in fp32: "
                    f"`train.{flag}=false` works here")
        require(p.distributed_backend in ("nccl", "gloo"),
                f"parallel.distributed_backend={p.distributed_backend} has no effect on the CPU "
                f"(a CPU run always uses gloo): unset it")
        require(not p.overlap_grad_reduce,
                "parallel.overlap_grad_reduce=true needs GPUs (megatron-core's DDP wrapper, which "
                "a CPU run goes without): `parallel.overlap_grad_reduce=false` works here")
        require(p.recompute_granularity is None,
                f"parallel.recompute_granularity={p.recompute_granularity} needs a GPU "
                f"(megatron-core's recompute saves and restores the CUDA RNG state); a CPU run "
                f"trains without it: `parallel.recompute_granularity=null` works here")
        require(m.alibi_kernel not in ("cudnn", "flex"),
                f"model.alibi_kernel={m.alibi_kernel} needs a GPU (a CPU run would take another "
                f"ALiBi kernel): `model.alibi_kernel=auto` works here")


def _nested_schema(t: Any) -> Optional[type]:
    """The dataclass a field of type `t` holds (Optional unwrapped), or None."""
    import dataclasses
    import typing

    args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    return next((a for a in args if dataclasses.is_dataclass(a)), None)


def check_unknown_keys(node: Any, cls: type = None, prefix: str = "", root: type = None) -> None:
    """Refuse keys that no schema field declares (Hydra's `+key=` bypasses struct mode), in
    `node` and every nested group (Optional ones included). `cls`: the schema of `node`
    (default Config); `root`: the top schema, whose keys the "did you mean" draws from."""
    import typing

    cls = cls or Config
    root = root or cls
    known = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in node.keys():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key} ({cls.__name__} has no such "
                              f"field){did_you_mean(f'{prefix}{key}', schema_keys(root))}")
        sub = _nested_schema(hints.get(key))
        value = node[key]
        if sub is not None and value is not None and hasattr(value, "keys"):
            check_unknown_keys(value, sub, f"{prefix}{key}.", root)


def schema_keys(cls: type, prefix: str = "") -> List[str]:
    """Every dotted key of a schema dataclass (nested dataclasses included, Optional unwrapped)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        out.append(prefix + f.name)
        sub = _nested_schema(hints.get(f.name))
        if sub is not None:
            out.extend(schema_keys(sub, f"{prefix}{f.name}."))
    return out


def did_you_mean(key: str, known: List[str]) -> str:
    """'; did you mean a.b?' for the closest known keys (whole key, then the last part alone),
    or ''."""
    import difflib

    def best(word: str, words: List[str], cutoff: float) -> List[str]:
        scored = sorted(((difflib.SequenceMatcher(None, word, w).ratio(), w) for w in words),
                        reverse=True)
        top = scored[0][0] if scored else 0.0
        return [w for r, w in scored[:3] if r >= cutoff and r >= top - 0.05]

    close = best(key, known, 0.75)
    if not close:
        by_leaf: Dict[str, List[str]] = {}
        for k in known:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        close = [k for name in best(key.rsplit(".", 1)[-1], list(by_leaf), 0.8)
                 for k in by_leaf[name]][:3]
    return f"; did you mean {' or '.join(close)}?" if close else ""


GROUP_TYPES = {c.__name__: c for c in (ModelConfig, ParallelConfig, OptimizerConfig, DataConfig,
                                       TokenizerConfig, TrainConfig, CheckpointConfig,
                                       LoggingConfig, ProfileConfig)}

GROUPS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
}


def register_configs() -> None:
    """Register the root schema and one schema per group in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=_schema(Config))
    for group, cls in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=_schema(cls))


# free-form dict fields: their keys are the user's (FlexAttention's kernel options), so an
# override `model.flex_kernel_options={BLOCK_M: 64}` must add keys that no schema declares
OPEN_DICTS = ("flex_kernel_options",)


def _schema(cls: type) -> Any:
    """The structured config of `cls`, strict (struct mode) except for its OPEN_DICTS fields."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cls)
    model = node.model if cls is Config else node if cls is ModelConfig else None
    for name in OPEN_DICTS if model is not None else ():
        OmegaConf.set_struct(model[name], False)
    return node
