"""GPT decode steps without megatron-core's module stack.

A one-token decode step through megatron-core's modules is dominated by Python: every linear
layer goes through an autograd Function even under no_grad, attention re-checks its inference
bookkeeping, and deprecation warnings are issued per layer and token. At gpt2-large's depth the
host time per token is many times the kernels' (benchmarks/RESULTS.md).

`forward_chunk` runs the same arithmetic on the same parameters and the same KV-cache buffers,
calling the modules' weights directly: the same matmuls (`torch.matmul(x, w.t())` then `+ bias`,
as mcore's linear function does), the same norm modules and core attention module (ALiBi,
GQA, masks), the same fused bias-GeLU / SwiGLU functions, the same q/k norm modules
(model.qk_layernorm), the same tensor-parallel all-reduces.
It is used for decode steps after a prefill through the real modules; `supported` says which
models it covers (GPT with the standard layer and learned-absolute, no, or rotary positions: no
multi-latent attention, no q/k norm other than ours, no MoE, no post-LN residual, no context
parallelism, query groups divisible by TP); anything else keeps megatron-core's path.

Rotary embeddings (`_Rope`): the angles are the model's own `rotary_pos_emb` table for positions
0..max_len-1, i.e. whatever that module holds (rotary_percent, rotary_base, interleaving, our
Llama-3 `inv_freq` from framework/models/gpt/rope_scaling.py); q and k are rotated as mcore's
`apply_rotary_pos_emb` does: with `apply_rope_fusion` through that very function (the fused
kernel mcore would call), otherwise with mcore's unfused formula (the same products) on cos/sin
tables precomputed once per generation in the activation dtype (mcore casts them to it too).
A group's query heads and key head are rotated in one call. Each row is rotated at
its own position (the generator's `positions`: real tokens counted from 0 in a left-padded
batch); mcore's path rotates all rows at the shared cache offset, which gives the same attention
scores (RoPE scores depend on q - k positions only) up to rounding. mcore keeps raw keys in the
cache and rotates the whole cache every step; here keys are stored rotated (one rotation per new
key): the first lean step rotates, in place, the raw keys the prefill left in the cache
(`_rotate_cached_keys`). From then on the cache must not go back to mcore's modules (the
generator never mixes the two within one generation).

`StaticDecoder` runs the same step with static shapes (CUDA-graph capturable): positions are a
device buffer updated per step, cos/sin are gathered from the precomputed tables by it. A layer
with a sliding window (model.sliding_window) also masks the keys at or before the device-side
write index minus the window.
tests/test_generation.py and tests/test_lean_decode_rope.py check logits and tokens against
megatron-core's path (fp32, TP1 and TP2).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from framework.fast.swiglu import swiglu


def supported(mod) -> bool:
    """True when `mod` (an unwrapped model chunk) is a GPT model this path reproduces."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    cfg = getattr(mod, "config", None)
    if not isinstance(mod, GPTModel) or cfg is None:
        return False
    position = getattr(mod, "position_embedding_type", None)
    if position not in ("learned_absolute", "none", "rope"):
        return False
    if position == "rope" and not _rope_supported(mod, cfg):
        return False
    if (cfg.sequence_parallel or cfg.apply_residual_connection_post_layernorm
            or cfg.fp32_residual_connection or getattr(cfg, "attention_output_gate", False)
            or getattr(cfg, "mtp_num_layers", None)):
        return False
    tp = cfg.tensor_model_parallel_size
    if cfg.num_query_groups is not None and cfg.num_query_groups % tp != 0:
        return False
    if cfg.bias_activation_fusion and not (
            (cfg.activation_func is F.gelu and not cfg.gated_linear_unit)
            or (cfg.activation_func is F.silu and cfg.gated_linear_unit)):
        return False
    if getattr(cfg, "activation_func_clamp_value", None) is not None or \
            getattr(cfg, "glu_linear_offset", 0.0):
        return False
    for layer in mod.decoder.layers:
        att = layer.self_attention
        if (not isinstance(layer, TransformerLayer) or not isinstance(layer.mlp, MLP)
                or not isinstance(layer.cross_attention, IdentityOp)
                or not _plain_or_our_norm(getattr(att, "q_layernorm", None))
                or not _plain_or_our_norm(getattr(att, "k_layernorm", None))
                or layer.self_attn_bda is None):
            return False
    return True


def _plain_or_our_norm(module) -> bool:
    """No q/k norm, or our `Norm` over one head (model.qk_layernorm), which `_qkv` applies as
    megatron-core does: after the split, before RoPE."""
    from megatron.core.transformer.identity_op import IdentityOp

    from framework.models.layers import Norm

    return module is None or isinstance(module, IdentityOp) or type(module) is Norm


def _qk_norms(att):
    """The layer's (q norm, k norm) modules, or None without q/k norms."""
    from megatron.core.transformer.identity_op import IdentityOp

    q, k = getattr(att, "q_layernorm", None), getattr(att, "k_layernorm", None)
    if q is None or isinstance(q, IdentityOp):
        return None
    return q, k


def _rope_supported(mod, cfg) -> bool:
    """RoPE as `_Rope` reproduces it: mcore's plain RotaryEmbedding on every layer, unscaled
    (mscale 1), no context parallelism (mcore would shard the angle table), no flash decode
    (mcore's other static-cache RoPE path), no multi-latent attention, no per-layer `no_rope_freq`."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config)

    return (isinstance(getattr(mod, "rotary_pos_emb", None), RotaryEmbedding)
            and not cfg.multi_latent_attention and not cfg.flash_decode
            and not getattr(cfg, "no_rope_freq", None)
            and not getattr(cfg, "mrope_section", None)
            and (cfg.context_parallel_size or 1) == 1
            and _yarn_get_concentration_factor_from_config(cfg) == 1.0)


class _Rope:
    """Rotary embedding of one model chunk for one KV cache of `max_len` positions.

    `angles` [max_len, rot] is the chunk's own `rotary_pos_emb(max_len)` (the call, and so the
    cached tensor, that mcore's GPTModel makes in inference), whatever frequencies the module
    holds. `at(positions)` gathers one step's values by a device-side index (capturable in a
    CUDA graph); `apply(t, values)` rotates t [s, b, ..., d] as mcore's `apply_rotary_pos_emb`:
    * with `apply_rope_fusion`, through that function itself (the fused kernel mcore calls), t
      seen as [s * b, 1, heads, d] with one angle row per (position, row);
    * otherwise mcore's unfused `t * cos + rotate_half(t) * sin` with cos / sin of the angles
      cast to t's dtype, tabulated once. rotate_half(t) * sin is computed as
      swap(t) * signed_sin, where swap exchanges the halves (or the pairs, interleaved) and
      signed_sin carries rotate_half's minus signs: the same products (IEEE negation is exact),
      in one roll instead of chunk / neg / cat."""

    def __init__(self, mod, max_len: int, dtype: torch.dtype):
        self.config = mod.config
        self.interleaved = bool(self.config.rotary_interleaved)
        self.fused = bool(self.config.apply_rope_fusion)
        emb = mod.rotary_pos_emb(max_len, packed_seq=False, cp_group=None)  # [L, 1, 1, rot]
        self.angles = emb[:, 0, 0, :]
        self.rot = self.angles.shape[-1]
        if not self.fused:
            self.cos = torch.cos(self.angles).to(dtype)
            sign = torch.ones(self.rot, dtype=dtype, device=self.angles.device)
            if self.interleaved:  # rotate_half: [-x1, x0, -x3, x2, ...]
                sign[0::2] = -1
            else:  # rotate_half: [-x2, x1] (halves)
                sign[:self.rot // 2] = -1
            self.sin = torch.sin(self.angles).to(dtype) * sign
        self.cp_group = getattr(getattr(mod, "pg_collection", None), "cp", None)

    def at(self, positions: torch.Tensor):
        """Per-row values for positions [b, s], in t's [s, b] order."""
        b, s = positions.shape
        idx = positions.t().reshape(-1)
        if self.fused:  # [s * b, 1, 1, rot]
            return self.angles.index_select(0, idx).view(s * b, 1, 1, self.rot)
        return (self.cos.index_select(0, idx).view(s, b, self.rot),
                self.sin.index_select(0, idx).view(s, b, self.rot))

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            return x.unflatten(-1, (self.rot // 2, 2)).flip(-1).flatten(-2)
        return x.roll(self.rot // 2, dims=-1)

    def apply(self, t: torch.Tensor, values) -> torch.Tensor:
        if self.fused:
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

            s, b = t.shape[0], t.shape[1]
            out = apply_rotary_pos_emb(t.reshape(s * b, 1, -1, t.shape[-1]), values,
                                       config=self.config, cp_group=self.cp_group)
            return out.view(t.shape)
        cos, sin = values
        shape = cos.shape[:2] + (1,) * (t.dim() - 3) + (self.rot,)
        cos, sin = cos.view(shape), sin.view(shape)
        if self.rot == t.shape[-1]:
            return (t * cos) + (self._swap(t) * sin)
        x = t[..., :self.rot]  # rotary_percent < 1: the rest passes through
        return torch.cat(((x * cos) + (self._swap(x) * sin), t[..., self.rot:]), dim=-1)


def _rope(mod, ctx) -> Optional[_Rope]:
    """The `_Rope` of chunk `mod` for the cache `ctx` (made once per generation), or None."""
    if getattr(mod, "position_embedding_type", None) != "rope":
        return None
    store = ctx.__dict__.setdefault("lean_decode_rope", {})
    if id(mod) not in store:
        dtype = next((layer.self_attention.linear_qkv.weight.dtype
                      for layer in mod.decoder.layers), torch.float32)  # q / k's dtype
        store[id(mod)] = _Rope(mod, ctx.max_sequence_length, dtype)
    return store[id(mod)]


def _rotated_upto(ctx) -> dict:
    """layer number -> how many leading cache positions hold rotated keys."""
    return ctx.__dict__.setdefault("lean_decode_rotated", {})


def _rotate_cached_keys(att, rope: _Rope, ctx, positions: torch.Tensor, start: int) -> None:
    """Rotate, in place, the raw keys that megatron-core's prefill left at cache indices
    [done, start) of this layer (done: what an earlier lean step already rotated). `positions`
    [b, s]: the per-row positions of this step's tokens, the first at cache index `start`. A row
    is left-padded, so its key at index j sits at position positions[:, 0] - (start - j); pads
    (below 0) are masked and are rotated as position 0."""
    done_map = _rotated_upto(ctx)
    done = done_map.get(att.layer_number, 0)
    if done < start:
        kmem, _ = ctx.key_value_memory_dict[att.layer_number]
        b0, b = ctx.batch_size_offset, positions.shape[0]
        offsets = torch.arange(done - start, 0, device=positions.device)
        key_pos = (positions[:, :1] + offsets[None, :]).clamp(min=0)  # [b, start - done]
        keys = kmem[done:start, b0:b0 + b]
        kmem[done:start, b0:b0 + b] = rope.apply(keys, rope.at(key_pos))
    done_map[att.layer_number] = start


def _adds_own_bias(linear) -> bool:
    """Whether `linear`'s forward adds its bias into its output (what decode must reproduce).

    mcore's ColumnParallelLinear adds it unless `skip_bias_add`. `BiasAddLinear`
    (model.fused_bias_add) sets `skip_bias_add` so that mcore leaves the add to it, then adds the
    bias itself (`bias_add_after`): its output includes the bias too. Reading `skip_bias_add`
    alone dropped the QKV bias of every decode step with the default config."""
    if linear.bias is None:
        return False
    return not linear.skip_bias_add or bool(getattr(linear, "bias_add_after", False))


def _column(linear, x: torch.Tensor) -> torch.Tensor:
    """ColumnParallelLinear without SP: x @ w.T (+ bias where the layer's forward adds it)."""
    out = torch.matmul(x, linear.weight.t())
    if _adds_own_bias(linear):
        out = out + linear.bias
    return out


def _row(linear, x: torch.Tensor, tp_group, tp: int) -> torch.Tensor:
    """RowParallelLinear (bias returned separately by mcore, added in bias-dropout-add)."""
    out = torch.matmul(x, linear.weight.t())
    if tp > 1:
        torch.distributed.all_reduce(out, group=tp_group)
    return out


def _add_bias_residual(x: torch.Tensor, bias: Optional[torch.Tensor],
                       residual: torch.Tensor) -> torch.Tensor:
    """mcore's bias-dropout-add in eval mode: (x + bias) + residual."""
    if bias is not None:
        x = x + bias
    residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
    return x + residual


def _mlp(mlp, x: torch.Tensor, tp_group, tp: int) -> torch.Tensor:
    from megatron.core.fusions.fused_bias_gelu import bias_gelu
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    cfg = mlp.config
    inter = torch.matmul(x, mlp.linear_fc1.weight.t())
    bias = mlp.linear_fc1.bias
    if cfg.bias_activation_fusion and cfg.gated_linear_unit:  # SwiGLU (checked in `supported`)
        # the kernel the model's own forward uses (model.swiglu_kernel), so that prefill,
        # use_cache=False and these decode steps compute the same numbers
        inter = swiglu(inter) if getattr(mlp, "swiglu_kernel", False) and bias is None \
            else bias_swiglu_impl(inter, bias)
    elif cfg.bias_activation_fusion:  # F.gelu, not gated (checked in `supported`)
        inter = bias_gelu(bias, inter)
    else:
        if bias is not None:
            inter = inter + bias
        if cfg.gated_linear_unit:
            a, b = torch.chunk(inter, 2, dim=-1)
            inter = cfg.activation_func(a) * b
        else:
            inter = mlp.activation_func(inter)
    return _row(mlp.linear_fc2, inter, tp_group, tp)


def _qkv(att, x: torch.Tensor, rope=None):
    """mcore's fused QKV projection and its per-group split: q [s, b, heads, d], k and v
    [s, b, groups, d] (this rank's part). `rope` (`_Rope`, this step's values): q and k rotated,
    all of a group's q heads and its k head in one rotation."""
    s, b = x.shape[0], x.shape[1]
    mixed = _column(att.linear_qkv, x)
    groups = att.num_query_groups_per_partition
    d = att.hidden_size_per_attention_head
    per = att.num_attention_heads_per_partition // groups
    # per group: `per` query heads, then its key head, then its value head
    mixed = mixed.view(s, b, groups, per + 2, d)
    qk, v = mixed[:, :, :, :per + 1], mixed[:, :, :, per + 1]
    norms = _qk_norms(att)
    if norms is not None:  # over each head, before RoPE (mcore's order); the cache keeps k normed
        qk = torch.cat([norms[0](qk[:, :, :, :per]), norms[1](qk[:, :, :, per:])], dim=3)
    if rope is not None:
        qk = rope[0].apply(qk, rope[1])
    return qk[:, :, :, :per].reshape(s, b, groups * per, d), qk[:, :, :, per], v


def _attention(att, x: torch.Tensor, mask, ctx, tp_group, tp: int, rope=None):
    """`rope`: (the chunk's `_Rope`, this step's values, positions [b, s]) or None."""
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = _qkv(att, x, None if rope is None else rope[:2])
    s, b = x.shape[0], x.shape[1]
    start, b0 = ctx.sequence_len_offset, ctx.batch_size_offset
    if rope is not None:
        _rotate_cached_keys(att, rope[0], ctx, rope[2], start)  # the prefill's raw keys, once
        _rotated_upto(ctx)[att.layer_number] = start + s
    # the KV cache megatron-core's prefill filled: [max_len, max_batch, groups, d]
    kmem, vmem = ctx.key_value_memory_dict[att.layer_number]
    kmem[start:start + s, b0:b0 + b] = k
    vmem[start:start + s, b0:b0 + b] = v
    keys, values = kmem[:start + s, b0:b0 + b], vmem[:start + s, b0:b0 + b]
    # decode steps come after the prefill, where megatron-core passes no causal mask type
    # (queries are the newest positions); padding masks still apply
    core = att.core_attention(q, keys, values, mask, attn_mask_type=AttnMaskType.no_mask)
    return _row(att.linear_proj, core, tp_group, tp), att.linear_proj.bias


def _tp(mod):
    """(tensor-parallel group or None, size) of a model chunk."""
    from megatron.core import parallel_state as ps

    tp = mod.config.tensor_model_parallel_size
    return (ps.get_tensor_model_parallel_group() if tp > 1 else None), tp


def _layers_and_head(mod, x: torch.Tensor, attention) -> torch.Tensor:
    """The decoder layers (`attention(att, normed_x, tp_group, tp)` -> (out, bias)), then, on
    the last stage, the final norm and the output layer: logits [b, s, vocab]."""
    tp_group, tp = _tp(mod)
    for layer in mod.decoder.layers:
        out, bias = attention(layer.self_attention, layer.input_layernorm(x), tp_group, tp)
        x = _add_bias_residual(out, bias, x)
        out = _mlp(layer.mlp, layer.pre_mlp_layernorm(x), tp_group, tp)
        x = _add_bias_residual(out, layer.mlp.linear_fc2.bias, x)
    if not mod.post_process:
        return x
    if getattr(mod.decoder, "final_layernorm", None) is not None:
        x = mod.decoder.final_layernorm(x)
    weight = (mod.shared_embedding_or_output_weight()
              if mod.share_embeddings_and_output_weights else None)
    logits, _ = mod.output_layer(x, weight=weight, runtime_gather_output=True)
    return logits.transpose(0, 1).contiguous()


def forward_chunk(mod, tokens: torch.Tensor, positions: torch.Tensor, mask, ctx,
                  input_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One chunk's forward for `tokens` [b, s] at the cache position of `ctx`: hidden states
    [s, b, h] for the next stage, or logits [b, s, vocab] (gathered over TP) on the last one."""
    x = (mod.embedding(input_ids=tokens, position_ids=positions) if mod.pre_process
         else input_tensor)
    rp = _rope(mod, ctx)
    rope = None if rp is None else (rp, rp.at(positions), positions)
    return _layers_and_head(
        mod, x, lambda att, h, group, tp: _attention(att, h, mask, ctx, group, tp, rope))


# --------------------------------------------------------------------------------------------
# static-shape decode steps (CUDA-graph capturable)
# --------------------------------------------------------------------------------------------
def _attention_static(att, x: torch.Tensor, key_mask: torch.Tensor, write_at: torch.Tensor,
                      ctx, tp_group, tp: int, rope=None):
    """One query per row over the whole KV buffer: this step's keys/values are written at the
    device-side index `write_at`; positions not yet written (and pads) are masked out. `rope`:
    (`_Rope`, this step's values gathered by the device-side positions) or None."""
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = _qkv(att, x, rope)
    kmem, vmem = ctx.key_value_memory_dict[att.layer_number]
    kmem.index_copy_(0, write_at, k)
    vmem.index_copy_(0, write_at, v)
    window = getattr(att.core_attention, "window", None)
    if window is None:
        core = att.core_attention(q, kmem, vmem, key_mask, attn_mask_type=AttnMaskType.no_mask)
    else:  # sliding window: the keys at or before write_at - window have left it
        gone = torch.arange(key_mask.shape[-1], device=key_mask.device) <= write_at - window
        core = att.core_attention(q, kmem, vmem, key_mask | gone, window_in_mask=True,
                                  attn_mask_type=AttnMaskType.no_mask)
    return _row(att.linear_proj, core, tp_group, tp), att.linear_proj.bias


def _embed_static(mod, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mcore's LanguageModelEmbedding (eval, no SP) without boolean-index assignments, which
    need a host sync and cannot be captured: [b, s] -> [s, b, h]."""
    emb = mod.embedding
    word = emb.word_embeddings
    tp_group, tp = _tp(mod)
    if tp > 1:
        outside = (tokens < word.vocab_start_index) | (tokens >= word.vocab_end_index)
        local = torch.where(outside, torch.zeros_like(tokens), tokens - word.vocab_start_index)
        x = F.embedding(local, word.weight).masked_fill(outside[..., None], 0.0)
        torch.distributed.all_reduce(x, group=tp_group)
    else:
        x = F.embedding(tokens, word.weight)
    if emb.add_position_embedding:
        x = x + emb.position_embeddings(positions)
    return x.transpose(0, 1).contiguous()


def forward_static(mod, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                   write_at: torch.Tensor, ctx) -> torch.Tensor:
    """`forward_chunk` for a one-token step of a whole (single-stage) model with static shapes:
    logits [b, 1, vocab]. With RoPE the cache must hold rotated keys (`StaticDecoder.step`
    rotates the prefill's once)."""
    x = _embed_static(mod, tokens, positions)
    rp = _rope(mod, ctx)
    rope = None if rp is None else (rp, rp.at(positions))
    return _layers_and_head(
        mod, x,
        lambda att, h, group, tp: _attention_static(att, h, key_mask, write_at, ctx, group, tp,
                                                    rope))


class StaticDecoder:
    """Decode steps of one single-stage model with static shapes, replayed as a CUDA graph on
    GPU (`graph=True`): inputs are copied into fixed buffers, the step attends over the whole
    KV-cache buffer with a key mask, and its keys/values go to a device-side index, so nothing
    in the step depends on a Python value. The first step captures the graph (after two warm-up
    runs on a side stream); later steps replay it, so a token costs one graph launch instead of
    hundreds of kernel launches from Python. On CPU, or with `graph=False`, the same static step
    runs eagerly (the test reference for the formulation)."""

    def __init__(self, mod, ctx, rows: int, max_len: int, device: torch.device, graph: bool):
        self.mod, self.ctx = mod, ctx
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(rows, 1, 1, max_len, dtype=torch.bool, device=device)
        # masked positions get weight 0, but 0 x garbage (NaN/inf in never-written memory) is
        # NaN: the buffers start zeroed (before the prefill fills the prompt part)
        for kmem, vmem in ctx.key_value_memory_dict.values():
            kmem.zero_()
            vmem.zero_()
        # RoPE: cos/sin tables for max_len positions, made now (outside any graph)
        self.rope = _rope(mod, ctx)
        self.graph_wanted = graph and device.type == "cuda"
        self.graph = None
        self.out: Optional[torch.Tensor] = None
        self.started = False

    def _run(self) -> torch.Tensor:
        return forward_static(self.mod, self.tokens, self.positions, self.key_mask,
                              self.write_at, self.ctx)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
             write_at: int) -> torch.Tensor:
        """tokens/positions [rows, 1]; real [rows, write_at + 1] (True = a real token)."""
        if not self.started:  # the prompt's pads stay masked; everything not yet written too
            self.key_mask[:, 0, 0, :write_at] = ~real[:, :write_at]
            if self.rope is not None:  # the prefill's raw keys, rotated once (not in the graph)
                for layer in self.mod.decoder.layers:
                    _rotate_cached_keys(layer.self_attention, self.rope, self.ctx, positions,
                                        write_at)
            self.started = True
        self.key_mask[:, 0, 0, write_at] = False
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.write_at.fill_(write_at)
        if not self.graph_wanted:
            return self._run()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # idempotent: the same keys/values land at the same index
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        self.graph.replay()
        return self.out.clone()
