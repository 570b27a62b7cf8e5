"""The layers our model families share, for megatron-core 0.16 without Transformer Engine or apex.
Shapes follow mcore: activations are [s, b, h] and q/k/v are [s, b, n, d].

Attention
* `SDPAttention`: a core attention on `torch.nn.functional.scaled_dot_product_attention`
  (flash / cuDNN / memory-efficient backends on GPU, the math path on CPU). It implements
  megatron-core's `CoreAttention` protocol (megatron/core/transformer/attention.py), so it plugs
  into a layer spec's `core_attention` slot. With `alibi=True` it adds ALiBi biases
  (framework/fast/alibi.py): in training and prefill as extra q/k head dims that SDPA's fused
  causal kernels carry (`alibi_kernel="augmented"`), through cuDNN's own ALiBi mask (`"cudnn"`,
  framework/fast/cudnn_attention.py) or FlexAttention (`"flex"`); with padding masks, a KV cache
  or on CPU (by default) as a dense SDPA bias.
* `SelfAttention`: MQA/GQA with fewer KV groups than TP ranks. mcore replicates each KV head over
  tp/groups ranks by all-gathering the fused QKV output (`Attention.get_query_key_value_tensors`);
  that all-gather allocates on CUDA. This keeps mcore's path on GPU and takes an equivalent
  torch.distributed path on CPU, whose backward all-reduces, so the gradient of a replicated KV
  head is the sum over the ranks that use it (`GatherLastDim`).
* `RotaryEmbeddingOnDevice`: mcore's `RotaryEmbedding.get_emb` moves its inverse frequencies to
  `torch.cuda.current_device()` on the first forward whenever they live on the CPU
  (megatron/core/models/common/embeddings/rotary_pos_embedding.py). This leaves them where the
  model was built (mcore already creates them on the GPU when `use_cpu_initialization` is off),
  so RoPE also runs on CPU (`keep_rotary_on_device`).

Linears
* `MLPOutputLinear`: selective recompute of "mlp" with biased linears, which megatron-core 0.16
  alone cannot run.
* `BiasAddLinear`: the QKV projection's bias add as one Triton kernel (framework/fast/bias.py).
* `Fp8Linear` and its four classes: mcore's column- / row-parallel linears with FP8 GEMMs in
  training (`train.fp8`, framework/fast/fp8.py).

MLP
* `ActRecomputeMLP`: selective recompute of a dense MLP's activation ("mlp_act" in
  `parallel.recompute_modules`). linear_fc2 keeps its input, the activation output
  act(fc1 output + bias), [s, b, ffn/TP], for its weight gradient. With "mlp_act" that tensor's
  memory is freed after the forward and refilled right before fc2's backward by recomputing the
  activation from fc1's output (kept anyway), at the cost of one elementwise kernel per layer. It
  is megatron-core's "moe_act" mechanism (`tensor_parallel.CheckpointWithoutOutput`,
  transformer/moe/experts.py) applied to the dense MLP, which mcore 0.16 offers no such option
  for. mcore's TransformerConfig rejects module names it does not know, so
  `framework.models.transformer.transformer_config` removes "mlp_act" from the list mcore sees and
  sets `ExtendedTransformerConfig.recompute_mlp_act` instead, which `ActRecomputeMLP` reads the
  way mcore's modules read `recompute_modules`.

Norms
* `Norm`: LayerNorm / RMSNorm that works with sequence parallelism. mcore's `WrappedTorchNorm`
  refuses `sequence_parallel=True`; this one marks its parameters `sequence_parallel` so that
  `finalize_model_grads` all-reduces their grads over the TP group. `FusedNorm` runs the Triton
  kernels of framework/fast/norm.py in training.

The megatron-core module globals we replace are in framework/mcore_patches.py.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention as _McoreSelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from framework.fast.alibi import (alibi_augment, alibi_augment_supported, alibi_bias,
                                  alibi_q_columns, alibi_slopes_for_rank, flex_alibi,
                                  flex_supported)
from framework.fast.bias import bias_add
from framework.fast.cudnn_attention import (CudnnUnavailable, cudnn_causal_attention,
                                            supported as cudnn_supported)
from framework.fast.fp8 import ab_switch, fp8_linear, shapes_supported
from framework.fast.norm import fused_norm, supported as fused_norm_supported
from framework.fast.rope import fused_qkv_rope, fused_qkv_rope_supported
from framework.fast.swiglu import swiglu


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
class SDPAttention(MegatronModule):
    """Core attention through `F.scaled_dot_product_attention`.

    Masks follow mcore: `attention_mask` is a bool tensor broadcastable to [b, n, sq, sk] where
    True means "masked out". With `attn_mask_type=causal` and no mask, the fused causal kernel
    runs. `padding` (BERT, the T5 encoder and cross-attention) is bidirectional: only the given
    mask applies, typically [b, 1, 1, sk] over padded keys. `attention_bias` (ALiBi, T5's
    relative position bias [1, n, sq, sk]) is added to the scores; it combines with either mask
    type. GQA/MQA key/value heads are expanded with `enable_gqa` semantics.

    `window_of(layer)` (ModelConfig.windowed: the window W of 0-based layer `layer`, or None): each query
    attends to itself and the W - 1 keys before it, Hugging Face's rule (key index > query index
    - W). Queries are the last sq of the sk keys (training, prefill through a KV cache, dynamic
    decode steps), so a band mask over key indices applies it, combined with any other mask;
    with sk <= W the band is the causal mask and the fused causal kernel runs as before. The
    static (CUDA-graph) decode step writes its query at a device-side index: it masks the keys
    that left the window itself and passes `window_in_mask=True`.
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
        window_of: Optional[Callable[[int], Optional[int]]] = None,
    ):
        super().__init__(config=config)
        # mcore numbers layers from 1 across pipeline stages and virtual chunks
        self.window = window_of(layer_number - 1) if window_of is not None else None
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
        window_in_mask: bool = False,
    ) -> torch.Tensor:
        assert packed_seq_params is None, "packed sequences are not supported by SDPAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq = query.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.dropout_p if self.training else 0.0
        # sliding window: True = attend (causal within the window); None where it changes nothing
        band = (_cached_band(sq, k.shape[2], self.window, q.device)
                if self.window is not None and not window_in_mask and k.shape[2] > self.window
                else None)
        if self.alibi:
            if self.alibi_slopes.device != q.device:
                self.alibi_slopes = self.alibi_slopes.to(q.device)
            slopes = self.alibi_slopes
            plain_causal = (attention_mask is None and attention_bias is None
                            and mask_type == AttnMaskType.causal and sq == k.shape[2])
            # fp32 on CUDA: the fused kernels do not keep the extra columns' products exact (the
            # GPU test's tolerance), so FlexAttention runs it there
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
                # v keeps head dim d (padding it to q's width made the kernel slower)
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
            if band is not None:  # before the empty-row fix below
                mask, band = mask & band, None
            if mask_type == AttnMaskType.causal and sq > 1:
                mask = mask & torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(
                    k.shape[2] - sq)
            elif mask_type != AttnMaskType.causal and mask.shape[-2] > 1:
                # padding/arbitrary [b,1,sq,sk] masks (mcore's b1ss) mask whole query rows at
                # padded positions; a row with no key gives NaN in SDPA, which then spreads
                # through 0 x NaN. Let such rows attend everywhere (their outputs are unused).
                mask = mask | ~mask.any(dim=-1, keepdim=True)
        elif mask_type == AttnMaskType.causal and band is None:
            if sq == k.shape[2]:
                if self.cudnn:  # opt-in: torch SDPA is as fast here (benchmarks/RESULTS.md)
                    out = self._cudnn(q, k, v, p, None, "causal")
                    if out is not None:
                        return out
                is_causal = True
            elif sq > 1:  # queries are the last sq positions (KV cache with a multi-token chunk)
                mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(
                    k.shape[2] - sq)
        if band is not None:  # the band carries causality too
            if mask is None:
                mask = band
            elif mask.dtype == torch.bool:
                mask = mask & band
            else:
                mask = mask.masked_fill(~band, float("-inf"))
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


def window_band(sq: int, sk: int, window: int, device) -> torch.Tensor:
    """Bool [sq, sk], True = attend: queries are the last sq of sk keys, and query i (a key
    index) sees keys j with i - window < j <= i (Hugging Face's sliding-window rule)."""
    i = torch.arange(sk - sq, sk, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i) & (j > i - window)


_BANDS: dict = {}


def _cached_band(sq: int, sk: int, window: int, device) -> torch.Tensor:
    """`window_band`, one tensor per shape shared by every layer (SDPA keeps its mask for the
    backward: one [sq, sk] mask in all, not one per layer); built anew inside torch.compile and
    CUDA-graph capture (a cached tensor from a capture's private pool must not escape it)."""
    if torch.compiler.is_compiling() or (device.type == "cuda"
                                         and torch.cuda.is_current_stream_capturing()):
        return window_band(sq, sk, window, device)
    key = (sq, sk, window, device)
    band = _BANDS.get(key)
    if band is None:
        if len(_BANDS) >= 8:
            _BANDS.clear()
        band = _BANDS[key] = window_band(sq, sk, window, device)
    return band


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


class GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward sums the gradient over ranks and keeps this rank's
    slice (a reduce-scatter built from all-reduce, which gloo supports)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None


class SelfAttention(_McoreSelfAttention):
    """mcore SelfAttention; with num_query_groups < tp off the GPU, QKV is assembled through
    torch.distributed (mcore's all-gather allocates on CUDA). Same layout as mcore: the fused
    output is interleaved per group [q.. k v | q.. k v | ...]; rank r uses group r // (tp/g) and
    query heads [r*n/tp, (r+1)*n/tp)."""

    # the rotary angles `forward` hands to `get_query_key_value_tensors` while mcore's forward
    # runs without them (model.qkv_rope_fusion); None otherwise
    _qkv_rope = None

    def forward(self, hidden_states, *args, **kwargs):
        """mcore's forward; with `config.qkv_rope_fusion` in training, q and k are rotated as they
        are split out of the fused QKV output (`framework.fast.rope.fused_qkv_rope`), and mcore's
        forward runs with no rotary angles, so it does not rotate them again."""
        freqs = self._fusable_rope(hidden_states, args, kwargs)
        if freqs is None:
            return super().forward(hidden_states, *args, **kwargs)
        self._qkv_rope = freqs
        try:
            return super().forward(hidden_states, *args, **dict(kwargs, rotary_pos_emb=None))
        finally:
            self._qkv_rope = None

    def _fusable_rope(self, hidden_states, args, kwargs):
        """(q angles, k angles) where the fused QKV RoPE can take this call's rotation, else None:
        training on CUDA without a KV cache or packed sequences, plain (non-interleaved,
        unscaled) RoPE in every layer, every query group on this rank, no q/k norms or output
        gate; mcore's own path otherwise."""
        c = self.config
        emb = kwargs.get("rotary_pos_emb")
        if not getattr(c, "qkv_rope_fusion", False) or args or emb is None \
                or not self.training:
            return None
        if any(kwargs.get(k) is not None for k in (
                "inference_context", "inference_params", "packed_seq_params", "rotary_pos_cos",
                "rotary_pos_sin", "rotary_pos_cos_sin")):
            return None
        if (c.rotary_interleaved or c.multi_latent_attention or c.no_rope_freq
                or c.attention_output_gate or c.mrope_section is not None or c.test_mode
                or hasattr(c, "yarn_rotary_scaling_factor")
                or c.num_query_groups < self.world_size
                or not isinstance(self.q_layernorm, (type(None), IdentityOp))
                or not isinstance(self.k_layernorm, (type(None), IdentityOp))):
            return None
        q_emb, k_emb = emb if isinstance(emb, tuple) else (emb, emb)
        if q_emb is None or k_emb is None:
            return None
        # the positions of the QKV output (sequence parallel: gathered by linear_qkv)
        seq = hidden_states.shape[0] * (self.world_size if c.sequence_parallel else 1)
        if not fused_qkv_rope_supported(hidden_states.is_cuda, seq,
                                        self.hidden_size_per_attention_head, q_emb, k_emb):
            return None
        return q_emb, k_emb

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        if self._qkv_rope is not None:
            # (mcore's forward was handed no rotary angles: a path that returned unsplit or
            # gated tensors here would train without RoPE; `_fusable_rope` rules both out)
            if not split_qkv or output_gate:
                raise RuntimeError("qkv_rope_fusion: megatron-core asked for unsplit or gated "
                                   "QKV tensors, which the fused rotation does not produce")
            mixed, _ = self.linear_qkv(hidden_states)
            qpg = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            mixed = mixed.view(*mixed.shape[:-1], self.num_query_groups_per_partition, -1)
            q_emb, k_emb = self._qkv_rope
            return fused_qkv_rope(mixed, q_emb, k_emb, qpg)
        groups, tp = self.config.num_query_groups, self.world_size
        if groups >= tp or hidden_states.is_cuda or output_gate or not split_qkv:
            return super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       output_gate=output_gate,
                                                       split_qkv=split_qkv)
        mixed, _ = self.linear_qkv(hidden_states)
        full = GatherLastDim.apply(mixed, self.tp_group)
        rank = self.tp_group.rank()
        ranks_per_group = tp // groups
        size = full.shape[-1] // groups
        g = rank // ranks_per_group
        blob = full[..., g * size:(g + 1) * size]
        hn = self.hidden_size_per_attention_head
        q_per_group = self.config.num_attention_heads // groups
        query, key, value = torch.split(blob, [q_per_group * hn, hn, hn], dim=-1)
        s, b = blob.shape[0], blob.shape[1]
        query = query.reshape(s, b, q_per_group, hn)
        n = q_per_group // ranks_per_group
        j = rank % ranks_per_group
        query = query[:, :, j * n:(j + 1) * n, :]
        key, value = key.reshape(s, b, 1, hn), value.reshape(s, b, 1, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value


def tp_rank_and_size(pg_collection=None) -> Tuple[int, int]:
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp.rank(), pg_collection.tp.size()
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


class RotaryEmbeddingOnDevice(RotaryEmbedding):
    """mcore's RotaryEmbedding without the move of `inv_freq` to CUDA in `get_emb`: the
    frequencies stay on the device the model was built on."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def keep_rotary_on_device(model: torch.nn.Module) -> None:
    """Make a GPTModel's RotaryEmbedding device-agnostic (see module docstring)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None and type(rope) is RotaryEmbedding:
        rope.__class__ = RotaryEmbeddingOnDevice


# --------------------------------------------------------------------------------------------
# linears
# --------------------------------------------------------------------------------------------
class MLPOutputLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear as an MLP's linear_fc2, safe under selective recompute of
    "mlp" with biased linears.

    mcore 0.16 recomputes the MLP through `tensor_parallel.checkpoint`, an autograd Function
    whose outputs include the MLP's output bias. With `add_bias_linear` (GPT-2, BERT, T5 here)
    fc2 skips its bias add and returns the bias Parameter itself, so the Function marks the
    Parameter as its own output. In backward the recompute returns the same Parameter, which now
    carries the Function's grad_fn, and backward re-enters the Function without end: on a GPU
    each round recomputes the MLP until memory runs out; on CPU it never returns. When the MLP is recomputed, this layer returns a copy of
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
    torch's generic broadcast add. Same arithmetic (fp32 add,
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
    with `config.fp8_gemm` set ("tensorwise", "delayed" or "rowwise", from `train.fp8`; for
    "delayed", `build_model` gives each layer its `fp8_meta`), the layer's GEMMs
    run in FP8 in training, forward and backward (framework/fast/fp8.py), keeping mcore's TP /
    sequence-parallel communication and its fused accumulation of the weight gradient into
    `main_grad`. Parameters, state dict and checkpoints are those of the mcore layer. Evaluation,
    frozen weights and shapes torch's FP8 GEMM cannot take (a dim not a multiple of 16) run
    mcore's bf16 path."""

    fp8_mode = "column"

    def _runs_fp8(self, input, weight, sequence_parallel: bool, grad_output_buffer) -> bool:
        """Whether this call's GEMMs run in FP8 (else mcore's bf16 path)."""
        tokens = input.numel() // input.shape[-1]
        if sequence_parallel:
            tokens *= self.tp_group.size()
        return (getattr(self.config, "fp8_gemm", None) is not None and self.training
                and weight.requires_grad and grad_output_buffer is None
                and shapes_supported(tokens, weight.shape[1], weight.shape[0]))

    def _forward_impl(self, input, weight, *args, **kwargs):
        recipe = getattr(self.config, "fp8_gemm", None)
        seq_par = kwargs.get("sequence_parallel", False)
        # (act, bias, fc1's amax histories or None): `input` is fc1's output, and this layer's
        # input its activation (`ActRecomputeMLP._forward_fused_act`, recipe delayed)
        act, act_bias, act_meta = getattr(self, "fp8_act_input", None) or (None, None, None)
        if not self._runs_fp8(input, weight, seq_par, kwargs.get("grad_output_buffer")):
            if act is not None:
                input = _unfused_activation(act, input, act_bias)
            return super()._forward_impl(input, weight, *args, **kwargs)
        return fp8_linear(input, weight, kwargs.get("bias"), recipe, self.fp8_mode,
                          kwargs.get("gradient_accumulation_fusion", False),
                          kwargs.get("allreduce_dgrad", False), seq_par, self.tp_group,
                          getattr(self, "fp8_meta", None),
                          getattr(self, "fp8_wgrad_overwrite", False), act, act_bias,
                          act_meta, getattr(self.config, "fp8_bwd_fast_accum", False))


def _unfused_activation(act: str, h, bias):
    """What the MLP runs when the FP8 cast does not take the activation: the same kernel as
    without `fp8_act_cast` (mcore's fused bias-GeLU)."""
    assert act == "gelu_tanh", act
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    return bias_gelu_impl(h, bias)


class Fp8ColumnParallelLinear(Fp8Linear, tensor_parallel.ColumnParallelLinear):
    fp8_mode = "column"


class Fp8BiasAddLinear(Fp8Linear, BiasAddLinear):
    """The QKV linear with FP8 GEMMs: where they run, the bias goes into the FP8 GEMM (cuBLAS
    adds it in the GEMM's epilogue, before the one rounding to bf16) and its gradient comes from
    the output gradient's FP8 cast (`cast(sums_out=)`), so neither the separate bias-add pass nor
    its gradient's reduction runs. Elsewhere (evaluation, bf16 fallback, torch.compile) it is
    `BiasAddLinear`."""

    fp8_mode = "column"

    def forward(self, input_, *args, **kwargs):
        if (self.bias_add_after and self.bias is not None and not args
                and kwargs.get("weight") is None and not torch.compiler.is_compiling()
                and not ab_switch("FP8_QKV_BIAS_AFTER")
                and self._runs_fp8(input_, self.weight, self.sequence_parallel,
                                   None if not self.config.defer_embedding_wgrad_compute
                                   else self.grad_output_buffer)):
            # mcore's forward passes the bias to the GEMM and returns none when the layer does
            # not skip its bias add
            self.skip_bias_add = False
            try:
                output, bias = tensor_parallel.ColumnParallelLinear.forward(self, input_,
                                                                            **kwargs)
            finally:
                self.skip_bias_add = True
            assert bias is None
            return output, None
        return super().forward(input_, *args, **kwargs)


class Fp8RowParallelLinear(Fp8Linear, tensor_parallel.RowParallelLinear):
    fp8_mode = "row"


class Fp8MLPOutputLinear(Fp8Linear, MLPOutputLinear):
    fp8_mode = "row"


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
class _ActivationStep:
    """Stands in for an MLP in mcore's `MLP.forward` so that only its activation step runs:
    linear_fc1 hands over the given fc1 output and bias, linear_fc2 returns its input. mcore's own
    dispatch (fused bias-GeLU / GeGLU / SwiGLU, GLU, plain activation) thus picks the kernels, as
    in the forward without recompute."""

    def __init__(self, mlp: MLP, bias):
        self.config = mlp.config
        self.activation_func = mlp.activation_func
        self.linear_fc1 = lambda x: (x, bias)
        self.linear_fc2 = lambda y: (y, None)


class ActRecomputeMLP(MLP):
    """megatron-core's MLP that, with `config.recompute_mlp_act`, in training with grad enabled,
    does not keep its activation output (see the module docstring). Otherwise it is mcore's MLP
    unchanged (same parameters, same state dict).

    A layer spec names the class itself, not a ModuleSpec: mcore 0.16's TransformerLayer passes
    `tp_group` only to a ModuleSpec of exactly `MLP` and logs "Unknown MLP type" for any other
    (once per layer). So the class takes the TP group the layer's default process groups hold
    (megatron's global one, as for every layer we build), and its linears default to ours."""

    def __init__(self, config, submodules: Optional[MLPSubmodules] = None, **kwargs):
        if submodules is None:
            fp8 = getattr(config, "fp8_gemm", None)
            submodules = MLPSubmodules(
                linear_fc1=Fp8ColumnParallelLinear if fp8 else tensor_parallel.ColumnParallelLinear,
                linear_fc2=Fp8MLPOutputLinear if fp8 else MLPOutputLinear)
        kwargs.setdefault("ffn_hidden_size", config.ffn_hidden_size)
        kwargs.setdefault("tp_group",
                          parallel_state.get_tensor_model_parallel_group(check_initialized=False))
        super().__init__(config, submodules, **kwargs)
        # (framework.mcore_patches makes mcore's CheckpointWithoutOutput usable without TE;
        # build_model installs it before any layer is built)
        self.recompute_act = bool(getattr(config, "recompute_mlp_act", False))
        # model.swiglu_kernel: our SwiGLU kernels in place of mcore's fused one (no bias here;
        # the config decides, framework/models/transformer.py)
        self.swiglu_kernel = bool(getattr(config, "swiglu_kernel", False))
        # model.fp8_fused_act (train.fp8=delayed): fc2's FP8 input cast computes the activation
        # from fc1's output, so the activation is never stored in bf16. `fp8_act_cast` is set
        # only with mcore's fused bias + tanh-GeLU (framework/models/transformer.py)
        self.fp8_act = "gelu_tanh" if getattr(config, "fp8_act_cast", False) \
            and isinstance(self.linear_fc2, Fp8Linear) else None
        # model.fp8_fused_act_backward: the activation's backward also casts fc1's output
        # gradient to FP8, for fc1's backward (framework/fast/fp8.py act_backward_cast)
        self.fp8_act_bwd = self.fp8_act is not None and bool(
            getattr(config, "fp8_act_bwd_cast", False)) and isinstance(self.linear_fc1, Fp8Linear)

    def _activation(self, fc1_output, bias):
        if self.swiglu_kernel and bias is None:
            return swiglu(fc1_output)
        return MLP.forward(_ActivationStep(self, bias), fc1_output)[0]

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is None and self.recompute_act and self.training \
                and torch.is_grad_enabled():
            return self._forward_recompute_act(hidden_states)
        if per_token_scale is None and self.fp8_act is not None and self.training \
                and torch.is_grad_enabled():
            return self._forward_fused_act(hidden_states)
        if per_token_scale is None and self.swiglu_kernel:
            fc1_output, bias = self.linear_fc1(hidden_states)
            return self.linear_fc2(self._activation(fc1_output, bias))
        return super().forward(hidden_states, per_token_scale, **kwargs)

    def _forward_fused_act(self, hidden_states):
        """fc1, then fc2 on fc1's output with the activation made in fc2's FP8 input cast
        (`framework.fast.fp8.fp8_linear`'s `act`); fc2 falls back to the unfused activation
        where its GEMM does not run in FP8. Same parameters and outputs as mcore's forward."""
        fc1_output, bias = self.linear_fc1(hidden_states)
        fc1_meta = getattr(self.linear_fc1, "fp8_meta", None) if self.fp8_act_bwd else None
        self.linear_fc2.fp8_act_input = (self.fp8_act, bias, fc1_meta)
        try:
            return self.linear_fc2(fc1_output)
        finally:
            self.linear_fc2.fp8_act_input = None

    # eager also inside a torch.compile'd layer (model.torch_compile): CheckpointWithoutOutput
    # works by side effects on real tensors (the activation's storage resized to 0, a hook on
    # fc2's output), kept out of dynamo's tracing; mcore's jit-fused activations still compile
    @torch.compiler.disable
    def _forward_recompute_act(self, hidden_states):
        fc1_output, bias = self.linear_fc1(hidden_states)
        ckpt = tensor_parallel.CheckpointWithoutOutput()
        act = ckpt.checkpoint(self._activation, fc1_output, bias)
        output, output_bias = self.linear_fc2(act)
        # frees act's storage; refilled by a hook when the gradient reaches fc2's output
        ckpt.discard_output_and_register_recompute(output)
        return output, output_bias


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------
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
