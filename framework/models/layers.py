"""Layers megatron-core 0.16 lacks without Transformer Engine or apex.

* `SDPAttention`: a core attention on `torch.nn.functional.scaled_dot_product_attention`
  (flash / cuDNN / memory-efficient backends on GPU, the math path on CPU). It implements
  megatron-core's `CoreAttention` protocol (megatron/core/transformer/attention.py), so it plugs
  into a layer spec's `core_attention` slot. With `alibi=True` it adds ALiBi biases
  (framework/models/attention_variants.py): in training and prefill as extra q/k head dims that
  SDPA's fused causal kernels carry (`alibi_kernel="augmented"`, the GPU default) or through
  FlexAttention (`"flex"`); with padding masks, a KV cache or on CPU (by default) as a dense SDPA
  bias.
* `MLPOutputLinear` and `fix_checkpoint_without_output`: selective recompute of "mlp" (with
  biased linears) and of "layernorm" (without TE), which megatron-core 0.16 alone cannot run.
* `Fp8Linear` and its four classes: mcore's column- / row-parallel linears with FP8 GEMMs in
  training (`train.fp8`, framework/fast/fp8.py).
* `Norm`: LayerNorm / RMSNorm that works with sequence parallelism. mcore's `WrappedTorchNorm`
  refuses `sequence_parallel=True`; this one marks its parameters `sequence_parallel` so that
  `finalize_model_grads` all-reduces their grads over the TP group.

Both keep the shape conventions of mcore: activations are [s, b, h] and q/k/v are [s, b, n, d].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from framework.fast.bias import bias_add
from framework.fast.cudnn_attention import (CudnnUnavailable, cudnn_causal_attention,
                                            supported as cudnn_supported)
from framework.fast.fp8 import fp8_linear, shapes_supported
from framework.fast.norm import fused_norm, supported as fused_norm_supported
from framework.models.attention_variants import (alibi_augment, alibi_augment_supported,
                                                 alibi_bias, alibi_q_columns,
                                                 alibi_slopes_for_rank, flex_alibi,
                                                 flex_supported, tp_rank_and_size)


class SDPAttention(MegatronModule):
    """Core attention through `F.scaled_dot_product_attention`.

    Masks follow mcore: `attention_mask` is a bool tensor broadcastable to [b, n, sq, sk] where
    True means "masked out". With `attn_mask_type=causal` and no mask, the fused causal kernel
    runs. `padding` (BERT, the T5 encoder and cross-attention) is bidirectional: only the given
    mask applies, typically [b, 1, 1, sk] over padded keys. `attention_bias` (ALiBi, T5's
    relative position bias [1, n, sq, sk]) is added to the scores; it combines with either mask
    type. GQA/MQA key/value heads are expanded with `enable_gqa` semantics.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        alibi: bool = False,
        flex_kernel_options: Optional[dict] = None,
        alibi_kernel: str = "auto",
        cudnn: Optional[bool] = None,
    ):
        super().__init__(config=config)
        tp_rank, tp = tp_rank_and_size(pg_collection)
        self.attn_mask_type = attn_mask_type
        divide(config.num_attention_heads, tp)  # each rank holds whole heads and KV groups
        divide(config.num_query_groups, tp)
        kv = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # ALiBi: the slopes of this rank's heads. A plain fp32 attribute, not a buffer: not saved
        # (a function of the architecture) and not cast to bf16 by Float16Module.
        self.alibi = alibi
        self.flex_kernel_options = dict(flex_kernel_options or {})
        self.alibi_kernel = alibi_kernel
        self._alibi_q_columns = {}  # (dtype, device) -> [n, extra] (alibi_kernel=augmented)
        self.alibi_slopes = (alibi_slopes_for_rank(config.num_attention_heads, tp, tp_rank).float()
                             if alibi else None)
        # cuDNN's built-in ALiBi mask derives the slopes from the local head count: right only
        # when this rank holds every head; otherwise the cudnn kernel reads a dense bias
        self._cudnn_mode = "alibi" if tp == 1 else "bias"
        # cuDNN frontend attention: None = ALiBi at TP1 when installed; True = plain causal
        # attention too; False = never
        self.cudnn = cudnn

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert packed_seq_params is None, "packed sequences are not supported by SDPAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq = query.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.dropout_p if self.training else 0.0
        if self.alibi:
            if self.alibi_slopes.device != q.device:
                self.alibi_slopes = self.alibi_slopes.to(q.device)
            slopes = self.alibi_slopes
            plain_causal = (attention_mask is None and attention_bias is None
                            and mask_type == AttnMaskType.causal and sq == k.shape[2])
            # fp32 on CUDA: the extra columns' products are not exact in the kernels' arithmetic
            # (a GPU fp32 check missed its tolerance), so FlexAttention runs it there
            kernel = self.alibi_kernel
            if kernel == "auto":  # GPU: the fastest measured; CPU: the reference
                kernel = ("dense" if not q.is_cuda else
                          "cudnn" if self.cudnn is not False and self._cudnn_mode == "alibi"
                          else "augmented")
            if kernel == "cudnn" and plain_causal:
                out = self._cudnn(q, k, v, p, slopes, self._cudnn_mode)
                if out is not None:
                    return out
            augmented = (kernel in ("augmented", "cudnn") and plain_causal
                         and alibi_augment_supported(k.shape[2])
                         and not (q.is_cuda and q.dtype == torch.float32))
            if augmented:
                # ALiBi as extra q/k head dims: SDPA's fused causal kernels (also with dropout).
                # v keeps head dim d (padding it to q's width measured 1.4x slower on an H200)
                key = (q.dtype, q.device)
                if key not in self._alibi_q_columns:
                    self._alibi_q_columns[key] = alibi_q_columns(slopes, self.softmax_scale,
                                                                 q.shape[-1], q.dtype)
                q, k = alibi_augment(q, k, self._alibi_q_columns[key])
                return _to_sbh(self._sdpa(q, k, v, None, p, True))
            if (kernel != "dense" and flex_supported(q) and p == 0.0
                    and plain_causal):
                return _to_sbh(flex_alibi(q, k, v, slopes, self.softmax_scale,
                                          self.flex_kernel_options))
            # reference path: dense bias (also padding masks and KV-cache decoding);
            # it carries the causal mask, so it replaces the causal mask type
            bias = alibi_bias(slopes, sq, k.shape[2], q.device, q.dtype)
            attention_bias = bias if attention_bias is None else attention_bias + bias
            mask_type = AttnMaskType.no_mask
        mask = None
        is_causal = False
        if attention_bias is not None:
            mask = attention_bias.to(q.dtype)
            if attention_mask is not None:
                # where, not masked_fill: a [b,1,1,sk] padding mask broadcasts over a
                # [1,n,sq,sk] bias (T5's relative position bias)
                mask = torch.where(attention_mask, float("-inf"), mask)
                if mask_type == AttnMaskType.causal and not self.alibi:
                    mask = mask + _causal_bias(sq, k.shape[2], q.device, q.dtype)
            elif mask_type == AttnMaskType.causal:
                mask = mask + _causal_bias(sq, k.shape[2], q.device, q.dtype)
        elif attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
            if mask_type == AttnMaskType.causal and sq > 1:
                mask = mask & torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(
                    k.shape[2] - sq)
            elif mask_type != AttnMaskType.causal and mask.shape[-2] > 1:
                # padding/arbitrary [b,1,sq,sk] masks (mcore's b1ss) mask whole query rows at
                # padded positions; a row with no key gives NaN in SDPA, which then spreads
                # through 0 x NaN. Let such rows attend everywhere (their outputs are unused).
                mask = mask | ~mask.any(dim=-1, keepdim=True)
        elif mask_type == AttnMaskType.causal:
            if sq == k.shape[2]:
                if self.cudnn:  # opt-in: torch SDPA measured as fast here (RESULTS.md)
                    out = self._cudnn(q, k, v, p, None, "causal")
                    if out is not None:
                        return out
                is_causal = True
            elif sq > 1:  # queries are the last sq positions (KV cache with a multi-token chunk)
                mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(
                    k.shape[2] - sq)
        return _to_sbh(self._sdpa(q, k, v, mask, p, is_causal))

    # GQA / MQA as grouped KV heads inside SDPA's fused kernels (enable_gqa; torch picks flash or
    # cuDNN): no copies of k and v per query head in the forward, and the kernel reduces their
    # grads over each group. Only where flash would accept the inputs: otherwise SDPA would fall
    # back to its math kernel under enable_gqa, and repeating the heads is faster.
    native_gqa = True

    def _sdpa(self, q, k, v, mask, p: float, is_causal: bool) -> torch.Tensor:
        gqa = False
        if k.shape[1] != q.shape[1]:
            if self.native_gqa and _flash_gqa_ok(q, k, v, mask, p, is_causal):
                gqa = True
            else:  # repeat each KV group for its query heads
                # = repeat_interleave(rep, dim=1), as a view expansion + copy: no index tensor,
                # so it can run inside a CUDA-graph capture (generation's decode_cuda_graph)
                rep = q.shape[1] // k.shape[1]
                k, v = _repeat_groups(k, rep), _repeat_groups(v, rep)
        kw = {"enable_gqa": True} if gqa else {}
        return self._rng_scope(p, q.is_cuda, lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=self.softmax_scale,
            **kw))

    def _cudnn(self, q, k, v, p: float, slopes, mode: str) -> Optional[torch.Tensor]:
        """Causal attention through the cuDNN frontend ([s, b, h] out) in training, or None
        where it does not run: evaluation and generation (prompt lengths vary, and each shape
        builds its own cuDNN graphs), CUDA-graph capture, CPU, fp32, the frontend not
        installed, or its graphs failed to build (warned once)."""
        if (not self.training or not cudnn_supported(q, k, p)
                or torch.cuda.is_current_stream_capturing()):
            return None
        try:
            return _to_sbh(self._rng_scope(p, True, lambda: cudnn_causal_attention(
                q, k, v, self.softmax_scale, slopes, p, mode)))
        except CudnnUnavailable:
            return None

    def _rng_scope(self, p: float, on_cuda: bool, fn):
        """Run `fn` under mcore's model-parallel RNG fork when it draws attention dropout on
        CUDA (each TP rank drops its own heads differently), otherwise as is."""
        if p > 0 and on_cuda and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return fn()
        return fn()


def _to_sbh(out: torch.Tensor) -> torch.Tensor:
    """Attention output [b, n, s, d] -> [s, b, n*d]."""
    b, _, s, _ = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _causal_bias(sq: int, sk: int, device, dtype) -> torch.Tensor:
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
    return torch.zeros(sq, sk, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))


def _flash_gqa_ok(q, k, v, mask, p: float, is_causal: bool) -> bool:
    """Whether SDPA can run these inputs with grouped KV heads in a fused kernel: torch's own
    flash eligibility check (CUDA, fp16/bf16, no mask tensor, head dim); with enable_gqa, inputs
    no fused kernel takes would fall back to the math kernel."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or mask is not None:
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        if not torch.backends.cuda.flash_sdp_enabled():
            return False
        return bool(can_use_flash_attention(
            SDPAParams(q, k, v, None, p, is_causal, True), debug=False))
    except (ImportError, TypeError, RuntimeError):  # a torch without enable_gqa
        return False


def _repeat_groups(t: torch.Tensor, rep: int) -> torch.Tensor:
    """[b, g, s, d] -> [b, g * rep, s, d], each group repeated `rep` times in a row."""
    b, g, s, d = t.shape
    return t[:, :, None].expand(b, g, rep, s, d).reshape(b, g * rep, s, d)


class MLPOutputLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear as an MLP's linear_fc2, safe under selective recompute of
    "mlp" with biased linears.

    mcore 0.16 recomputes the MLP through `tensor_parallel.checkpoint`, an autograd Function
    whose outputs include the MLP's output bias. With `add_bias_linear` (GPT-2, BERT, T5 here)
    fc2 skips its bias add and returns the bias Parameter itself, so the Function marks the
    Parameter as its own output. In backward the recompute returns the same Parameter, which now
    carries the Function's grad_fn, and backward re-enters the Function without end: on a GPU
    each round recomputes the MLP until memory runs out (gpt2-large on an H200 stopped at
    139 GB); on CPU it never returns. When the MLP is recomputed, this layer returns a copy of
    the bias instead: the Function owns the copy and the recompute reaches the Parameter through
    it. Otherwise it is mcore's layer unchanged."""

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if bias is not None and self.config.recompute_granularity == "selective" and \
                "mlp" in (self.config.recompute_modules or []):
            bias = bias.clone()
        return output, bias


class BiasAddLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear whose own bias add (QKV's: not deferred to a later
    fusion) runs after the GEMM as one Triton kernel on GPU (framework/fast/bias.py) instead of
    torch's broadcast add (2.5x this kernel's time on an H200). Same arithmetic (fp32 add,
    one rounding), so the results are identical; CPU tensors, evaluation and generation take
    torch's add."""

    def __init__(self, *args, skip_bias_add: bool = False, gather_output: bool = False,
                 **kwargs):
        # with gather_output mcore adds the local bias shard before the gather: leave it to mcore
        after = not skip_bias_add and not gather_output
        super().__init__(*args, skip_bias_add=skip_bias_add or after,
                         gather_output=gather_output, **kwargs)
        self.bias_add_after = after

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if self.bias_add_after:
            if bias is None:
                return output, None
            # training: the Triton kernel; evaluation and decoding: torch's add (shorter launch)
            return (bias_add(output, bias) if self.training else output + bias), None
        return output, bias


class Fp8Linear:
    """Mixin for megatron-core's ColumnParallelLinear / RowParallelLinear (and our subclasses):
    with `config.fp8_gemm` set ("tensorwise" or "rowwise", from `train.fp8`), the layer's GEMMs
    run in FP8 in training, forward and backward (framework/fast/fp8.py), keeping mcore's TP /
    sequence-parallel communication and its fused accumulation of the weight gradient into
    `main_grad`. Parameters, state dict and checkpoints are those of the mcore layer. Evaluation,
    frozen weights and shapes torch's FP8 GEMM cannot take (a dim not a multiple of 16) run
    mcore's bf16 path."""

    fp8_mode = "column"

    def _forward_impl(self, input, weight, *args, **kwargs):
        recipe = getattr(self.config, "fp8_gemm", None)
        seq_par = kwargs.get("sequence_parallel", False)
        tokens = input.numel() // input.shape[-1]
        if seq_par:
            tokens *= self.tp_group.size()
        if (recipe is None or not self.training or not weight.requires_grad
                or kwargs.get("grad_output_buffer") is not None
                or not shapes_supported(tokens, weight.shape[1], weight.shape[0])):
            return super()._forward_impl(input, weight, *args, **kwargs)
        return fp8_linear(input, weight, kwargs.get("bias"), recipe, self.fp8_mode,
                          kwargs.get("gradient_accumulation_fusion", False),
                          kwargs.get("allreduce_dgrad", False), seq_par, self.tp_group)


class Fp8ColumnParallelLinear(Fp8Linear, tensor_parallel.ColumnParallelLinear):
    fp8_mode = "column"


class Fp8BiasAddLinear(Fp8Linear, BiasAddLinear):
    fp8_mode = "column"


class Fp8RowParallelLinear(Fp8Linear, tensor_parallel.RowParallelLinear):
    fp8_mode = "row"


class Fp8MLPOutputLinear(Fp8Linear, MLPOutputLinear):
    fp8_mode = "row"


def fix_checkpoint_without_output() -> None:
    """Make megatron-core's selective recompute of "layernorm" run without Transformer Engine
    (`build_model` calls it).

    mcore 0.16's TransformerLayer builds `tensor_parallel.CheckpointWithoutOutput()` for it, whose
    default fp8=False is read as "fp8 on" (`self.fp8 = fp8 is not None`), so its forward calls
    TE's FP8GlobalStateManager, a name that only exists when TE is installed (a GPU run without
    TE stopped with NameError). Without TE, the class is replaced by a subclass that passes
    fp8=None unless fp8 is really requested; everything else is mcore's. Idempotent; nothing
    changes when TE is installed."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    base = tensor_parallel.CheckpointWithoutOutput
    if tp_random.HAVE_TE or getattr(base, "fp8_none_unless_requested", False):
        return

    class CheckpointWithoutOutputNoTE(base):
        fp8_none_unless_requested = True

        def __init__(self, fp8=None):
            super().__init__(fp8=fp8 or None)

    tensor_parallel.CheckpointWithoutOutput = CheckpointWithoutOutputNoTE


class AddmmWgrad:
    """Stands in for apex's `fused_weight_gradient_mlp_cuda` in megatron-core's linear layers
    (`gradient_accumulation_fusion`): main_grad += grad_output^T @ input, accumulated in fp32
    straight from the bf16/fp16 GEMM (torch.addmm with out_dtype), with no bf16 weight gradient
    and no separate add."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        if total_input.dtype == torch.float32:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32,
                        out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        main_grad.addmm_(grad_output.t(), total_input)


def install_fused_wgrad() -> None:
    """Let megatron-core's `gradient_accumulation_fusion` run without apex, through
    `AddmmWgrad` (`build_model` calls it for `model.fused_wgrad` on GPU). Keeps apex's kernel
    when it is installed; idempotent."""
    from megatron.core.tensor_parallel import layers as tp_layers

    if not tp_layers._grad_accum_fusion_available:
        tp_layers.fused_weight_gradient_mlp_cuda = AddmmWgrad
        tp_layers._grad_accum_fusion_available = True


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm (per `config.normalization`) that supports sequence parallelism.

    `FusedNorm` (the subclass `norm_class` picks for `model.fused_norm`) runs CUDA tensors
    through the Triton kernels of framework/fast/norm.py in training; CPU tensors, evaluation
    and generation keep torch's."""

    fused = False

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=device))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training only: evaluation and decoding (small, latency-bound calls) keep torch's
        # kernels, whose launch path is shorter than Triton's
        if self.fused and self.training and fused_norm_supported(x):
            return fused_norm(x, self.weight, self.bias, self.eps, self.rms)
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


class FusedNorm(Norm):
    fused = True


def norm_class(model) -> type:
    """The norm module for a ModelConfig: `FusedNorm` for `model.fused_norm`, else `Norm`."""
    return FusedNorm if model.fused_norm else Norm
