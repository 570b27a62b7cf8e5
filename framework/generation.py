"""Text generation for megatron-core GPT models: greedy, top-k / top-p sampling, beam search.

`generate(model, input_ids, attention_mask, **options)` decodes a batch of prompts on this rank's
model chunks (a list of chunks or one module; DDP / Float16Module wrapped or not). It works at any
TP (logits are all-gathered over the vocabulary) and PP (hidden states go stage to stage by
point-to-point send/recv; the last stage decides the next tokens and broadcasts them). Every rank
of a model-parallel group calls it with the same prompts and gets the same result; data-parallel
ranks are independent, each with its own prompts.

Semantics
* Greedy when `top_k` is 0 or 1 and `top_p` is 0 (temperature is then irrelevant). Otherwise
  sampling: logits / temperature, keep the `top_k` best (if > 0), then the smallest set of tokens
  whose probability reaches `top_p` (if > 0), renormalise and draw. After each generated token,
  `top_p = max(top_p * top_p_decay, top_p_bound)` when `top_p_decay` > 0 (Megatron: 0 = no decay).
* Beam search (`num_beams` > 1) follows Hugging Face `generate` (transformers >= 4.50): 2 x
  num_beams candidates per step, a hypothesis ends at EOS or at `max_new_tokens`, its score is
  sum(logprobs) / generated_len ** length_penalty (EOS counted), and `early_stopping`
  (False / True / "never") decides when a prompt is done. Beam search is deterministic, so it
  refuses sampling options.
* Prompts of different lengths are left-padded; positions count real tokens only (pads sit at
  position 0) and pads are never attended to, so a prompt decodes the same alone or in a batch.
* The KV cache is megatron-core's `StaticInferenceContext` (on by default). Its buffers are
  allocated here, on the model's device, because mcore allocates them with
  `torch.cuda.current_device()`. `use_cache=False` re-runs the whole sequence every step.
* Sequence parallelism is switched off for the duration of the call (and restored); activation
  recompute only acts in training mode, and generation runs in eval mode.
* On CPU with TP > 1 the vocabulary all-gather is done here (mcore's allocates on CUDA).

`forward_logits(model, input_ids, attention_mask)` returns full-vocabulary logits of a plain
forward pass (no labels) for training or evaluation scripts; `gather_across_data_parallel_groups`
concatenates per-DP-rank tensors.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from framework.errors import require
from framework.fast import lean_decode
from framework.models.wrappers import unwrap

NEG = -1.0e9  # Hugging Face's "impossible" score in beam search
MAX_SEED = 2**32 - 1  # numpy.random.seed's bound (generate.py seeds every generator with it)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
def normalize_early_stopping(value: Union[bool, str]) -> Union[bool, str]:
    """False | True | "never" (Hugging Face's values); strings "false"/"true" are accepted."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    mapping = {"false": False, "true": True, "never": "never"}
    require(text in mapping, f"early_stopping={value!r} is not one of [false, true, never]")
    return mapping[text]


@dataclass
class GenerationOptions:
    """Decoding options (also the top-level fields of conf/generate.yaml)."""

    max_new_tokens: Optional[int] = 64  # None: as many as the model's context holds
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0  # 0 = no decay (Megatron); else top_p *= decay after each token
    top_p_bound: float = 0.0  # top_p never decays below this
    temperature: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: str = "false"  # beam search: false | true | never (Hugging Face semantics)
    use_cache: bool = True
    # decode steps without megatron-core's module stack (framework/fast/lean_decode.py) where
    # the model allows it; false keeps megatron-core's modules for every step (reference path)
    lean_decode: bool = True
    # GPU: decode steps (greedy / sampling, one pipeline stage) with static shapes, captured as
    # a CUDA graph once and replayed for every token (framework/fast/lean_decode.py,
    # StaticDecoder): no per-kernel launch cost left on the host. None = on for a CUDA model
    # without tensor or pipeline parallelism (the case tested on a GPU; speeds in
    # benchmarks/RESULTS.md); true also under TP; false = eager steps. On CPU, true runs the
    # same static step eagerly.
    decode_cuda_graph: Optional[bool] = None
    return_logprobs: bool = False
    seed: Optional[int] = 1234

    def __post_init__(self) -> None:
        require(self.max_new_tokens is None or self.max_new_tokens >= 1,
                f"max_new_tokens={self.max_new_tokens} must be >= 1 (or null: fill the context)")
        require(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        require(0.0 <= self.top_p <= 1.0, f"top_p={self.top_p} must be in [0, 1] (0 = off)")
        require(0.0 <= self.top_p_decay <= 1.0,
                 f"top_p_decay={self.top_p_decay} must be in [0, 1] (0 = no decay)")
        require(0.0 <= self.top_p_bound <= 1.0,
                 f"top_p_bound={self.top_p_bound} must be in [0, 1]")
        # top_p = max(top_p * decay, bound) after each token: a bound above top_p would raise
        # it, and from top_p=0 (greedy) switch to sampling after the first token
        require(self.top_p_decay == 0.0 or self.top_p_bound <= self.top_p,
                 f"top_p_bound={self.top_p_bound} is above top_p={self.top_p}: with "
                 f"top_p_decay={self.top_p_decay} top_p would rise to the bound (from top_p=0, "
                 f"greedy decoding would turn into sampling); give top_p_bound <= top_p")
        require(self.temperature > 0.0 and math.isfinite(self.temperature),
                 f"temperature={self.temperature} must be a positive number")
        require(self.num_beams >= 1, f"num_beams={self.num_beams} must be >= 1")
        require(math.isfinite(self.length_penalty),
                 f"length_penalty={self.length_penalty} must be finite")
        normalize_early_stopping(self.early_stopping)
        # generate.py seeds Python's, NumPy's and torch's generators with it (NumPy: < 2**32)
        require(self.seed is None or 0 <= self.seed <= MAX_SEED,
                f"seed={self.seed} must be in [0, {MAX_SEED}] (or null)")
        require(
            self.num_beams == 1 or (self.top_k == 0 and self.top_p == 0.0
                                    and self.temperature == 1.0),
            f"num_beams={self.num_beams} is (deterministic) beam search; it cannot be combined "
            f"with sampling: set top_k=0, top_p=0.0 and temperature=1.0 (got top_k={self.top_k}, "
            f"top_p={self.top_p}, temperature={self.temperature})")

    @property
    def do_sample(self) -> bool:
        return self.top_k > 1 or self.top_p > 0.0


# --------------------------------------------------------------------------------------------
# parallel helpers
# --------------------------------------------------------------------------------------------
def _ps():
    from megatron.core import parallel_state as ps

    return ps if dist.is_initialized() and ps.model_parallel_is_initialized() else None


def _is_last_stage() -> bool:
    ps = _ps()
    return ps is None or ps.is_pipeline_last_stage(ignore_virtual=True)


_LOGGED = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED and (not dist.is_initialized() or dist.get_rank() == 0):
        _LOGGED.add(msg)
        print(msg, flush=True)


def _share_from_last_stage(t: Optional[torch.Tensor], ndim: int, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    """Make the last pipeline stage's TP-rank-0 tensor known to every rank of its model-parallel
    group: broadcast over the TP group on the last stage, then down the pipeline."""
    ps = _ps()
    if ps is None:
        return t
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    last = _is_last_stage()
    steps = []
    if last and tp_group.size() > 1:
        steps.append((ps.get_tensor_model_parallel_src_rank(), tp_group))
    if pp_group.size() > 1:
        steps.append((ps.get_pipeline_model_parallel_last_rank(), pp_group))
    for src, group in steps:
        have = dist.get_rank() == src or (group is pp_group and last)
        shape = torch.tensor(list(t.shape) if have else [0] * ndim, dtype=torch.long,
                             device=device)
        dist.broadcast(shape, src=src, group=group)
        buf = t.contiguous() if have else torch.empty(shape.tolist(), dtype=dtype, device=device)
        dist.broadcast(buf, src=src, group=group)
        t = buf
    return t


def gather_across_data_parallel_groups(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every data-parallel rank along dim 0, in DP-rank order.

    Shapes may differ in dim 0 only (e.g. each DP rank served a different number of prompts).
    Every DP rank gets the full result. Without DP (or without torch.distributed) it returns
    `tensor` unchanged.
    """
    ps = _ps()
    if ps is None or ps.get_data_parallel_world_size() == 1:
        return tensor
    group = ps.get_data_parallel_group()
    n = group.size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], dim=0)


# --------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------
def _chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


@contextmanager
def generation_mode(model) -> Iterator[None]:
    """eval(), no_grad and sequence parallelism off for the duration; all restored after.

    Sequence parallelism splits activations along the sequence, which a one-token decode step
    cannot be; megatron-core reads the flag from the shared TransformerConfig and from
    attributes its linear and embedding layers copy at construction, so all of them are flipped.
    """
    chunks = _chunks(model)
    saved_modes = [m.training for c in chunks for m in c.modules()]
    changed: list = []
    seen_cfgs = set()
    for c in chunks:
        for m in c.modules():
            for attr in ("sequence_parallel", "reduce_scatter_embeddings"):
                if getattr(m, attr, None) is True:
                    setattr(m, attr, False)
                    changed.append((m, attr))
            cfg = getattr(m, "config", None)
            if cfg is not None and id(cfg) not in seen_cfgs and getattr(cfg, "sequence_parallel",
                                                                        False) is True:
                seen_cfgs.add(id(cfg))
                cfg.sequence_parallel = False
                changed.append((cfg, "sequence_parallel"))
    cfg0 = unwrap(chunks[0]).config
    if changed:
        _log_once("generation: sequence parallelism is switched off while generating")
    if getattr(cfg0, "recompute_granularity", None):
        _log_once(f"generation: recompute_granularity={cfg0.recompute_granularity} is switched off "
             f"(activation recompute only acts in training mode)")
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad(), _gather_vocab_on_cpu(chunks):
            yield
    finally:
        for obj, attr in changed:
            setattr(obj, attr, True)
        modules = [m for c in chunks for m in c.modules()]
        for m, mode in zip(modules, saved_modes):
            m.training = mode


@contextmanager
def _gather_vocab_on_cpu(chunks) -> Iterator[None]:
    """Gather TP-sharded logits with torch.distributed on CPU.

    megatron-core's all-gather of the output layer allocates its buffer with
    `torch.cuda.current_device()`, and its inference path insists on it
    (`runtime_gather_output=True`). On CPU with TP > 1 the output layer is told not to gather and
    a forward hook gathers with `torch.distributed.nn.functional.all_gather` (differentiable).
    """
    ps = _ps()
    handles = []
    if ps is not None and ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        for c in chunks:
            layer = getattr(unwrap(c), "output_layer", None)
            if layer is None or next(c.parameters()).is_cuda:
                continue

            def no_gather(module, args, kwargs):
                return args, {**kwargs, "runtime_gather_output": False}

            def gather(module, args, output):
                from torch.distributed.nn.functional import all_gather

                logits, bias = output
                return torch.cat(all_gather(logits.contiguous(), group=group), dim=-1), bias

            handles.append(layer.register_forward_pre_hook(no_gather, with_kwargs=True))
            handles.append(layer.register_forward_hook(gather))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _prepare_batch(input_ids, attention_mask, pad_id: int, device) -> Tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Left-aligned (left-padded) tokens [b, s] and a bool mask of real tokens."""
    if not isinstance(input_ids, torch.Tensor):
        rows = [list(map(int, r)) for r in input_ids]
        require(len(rows) > 0, "no prompts to generate from (empty batch)")
        for i, r in enumerate(rows):
            require(len(r) > 0, f"prompt {i} has no tokens")
        s = max(len(r) for r in rows)
        tokens = torch.full((len(rows), s), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), s), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, s - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, s - len(r):] = True
        return tokens.to(device), mask.to(device)
    require(input_ids.dim() == 2 and input_ids.shape[0] > 0 and input_ids.shape[1] > 0,
             f"input_ids must be a non-empty [batch, seq] tensor, got shape "
             f"{tuple(input_ids.shape)}")
    tokens = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
    mask = attention_mask.to(device).bool()
    require(mask.shape == tokens.shape, "attention_mask must have the shape of input_ids")
    require(bool(mask.any(dim=1).all()), "a prompt has no tokens (attention_mask all zero)")
    # move real tokens to the right end of each row (right- or mixed padding -> left padding)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return tokens.gather(1, order), mask.gather(1, order)


class _Decoder:
    """Runs this rank's chunks over a growing batch of sequences, with or without a KV cache.

    Holds the token history (`tokens`, `real`, `positions`) of every row. `logits()` runs the
    part not yet seen by the cache (everything when there is no cache) and returns the next-token
    logits [rows, vocab] in fp32 on the last pipeline stage, None elsewhere.
    """

    def __init__(self, model, tokens: torch.Tensor, real: torch.Tensor, max_len: int,
                 use_cache: bool, lean: bool = True, static: bool = False):
        self.chunks = _chunks(model)
        self.modules = [unwrap(c) for c in self.chunks]
        self.config = self.modules[0].config
        self.tokens, self.real = tokens, real
        self.positions = (real.long().cumsum(1) - 1).clamp(min=0)
        self.cached = 0
        self.all_real: Optional[bool] = None
        self.ctx = self._new_cache(tokens.shape[0], max_len) if use_cache else None
        # decode steps after the prefill: the same arithmetic without megatron-core's module
        # stack (framework/fast/lean_decode.py), where the model is one it reproduces
        self.lean = (use_cache and lean
                     and all(lean_decode.supported(m) for m in self.modules))
        ps = _ps()
        single_stage = len(self.modules) == 1 and (
            ps is None or ps.get_pipeline_model_parallel_world_size() == 1)
        self.static = None
        if static and self.lean and single_stage:
            self.static = lean_decode.StaticDecoder(self.modules[0], self.ctx, tokens.shape[0],
                                                    max_len, tokens.device, graph=True)

    def _new_cache(self, rows: int, max_len: int):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.transformer.attention import Attention

        ctx = StaticInferenceContext(rows, max_len)
        device = self.tokens.device
        for mod in self.modules:
            for m in mod.modules():
                if isinstance(m, Attention):
                    dtype = m.linear_qkv.weight.dtype
                    kshape = (max_len, rows, m.num_query_groups_per_partition, m.key_hidden_size)
                    vshape = (max_len, rows, m.num_query_groups_per_partition, m.val_hidden_size)
                    ctx.key_value_memory_dict[m.layer_number] = (
                        torch.empty(kshape, dtype=dtype, device=device),
                        torch.empty(vshape, dtype=dtype, device=device))
        return ctx

    def _mask(self, start: int) -> Optional[torch.Tensor]:
        """Bool [rows, 1, q, k] (True = masked) for queries start..L-1 over keys 0..L-1."""
        if self.all_real is None:
            # appended tokens are real and pads stay pads (beam reordering keeps both), so the
            # answer never changes: one host sync, not one per step
            self.all_real = bool(self.real.all())
        if self.all_real:
            return None  # causal only: the attention's own causal path
        total = self.tokens.shape[1]
        q = torch.arange(start, total, device=self.tokens.device)[:, None]
        k = torch.arange(total, device=self.tokens.device)[None, :]
        future = k > q
        pad_key = ~self.real[:, None, None, :] & (k != q)  # a pad query sees itself: no empty row
        return (future | pad_key)

    def forward(self, tokens, positions, mask, last_only: bool = True
                ) -> Optional[torch.Tensor]:
        """One pass through every chunk of this rank, stage to stage; fp32 logits [rows, vocab]
        of the last position (or [rows, s, vocab]) on the last stage, None elsewhere."""
        ps = _ps()
        pp = ps.get_pipeline_model_parallel_world_size() if ps else 1
        rank = ps.get_pipeline_model_parallel_rank() if ps else 0
        out = None
        # after the prefill: one new token per row through the KV cache
        decode_step = self.ctx is not None and self.ctx.sequence_len_offset > 0
        for v, (chunk, mod) in enumerate(zip(self.chunks, self.modules)):
            if pp > 1 and not (rank == 0 and v == 0):
                hidden = torch.empty((tokens.shape[1], tokens.shape[0], self.config.hidden_size),
                                     dtype=self.config.pipeline_dtype, device=tokens.device)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                mod.set_input_tensor(hidden)
            if decode_step and self.static is not None:
                out = self.static.step(tokens, positions, self.real,
                                       self.ctx.sequence_len_offset)
            elif decode_step and self.lean:
                out = lean_decode.forward_chunk(mod, tokens, positions, mask, self.ctx,
                                                input_tensor=None if mod.pre_process else hidden)
            else:
                out = chunk(tokens, positions, mask, inference_context=self.ctx,
                            runtime_gather_output=True)
            if pp > 1 and not (rank == pp - 1 and v == len(self.chunks) - 1):
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        if self.ctx is not None:
            self.ctx.sequence_len_offset += tokens.shape[1]
        if not _is_last_stage():
            return None
        return out[:, -1, :].float() if last_only else out.float()

    def logits(self) -> Optional[torch.Tensor]:
        start = self.cached if self.ctx is not None else 0
        mask = self._mask(start)
        out = self.forward(self.tokens[:, start:], self.positions[:, start:], mask)
        self.cached = self.tokens.shape[1]
        return out

    def advance(self, next_tokens: torch.Tensor, reorder: Optional[torch.Tensor] = None) -> None:
        if reorder is not None:
            self.tokens = self.tokens.index_select(0, reorder)
            self.real = self.real.index_select(0, reorder)
            self.positions = self.positions.index_select(0, reorder)
            if self.ctx is not None:
                self.ctx.swap_key_value_dict(reorder)
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)
        self.real = torch.cat([self.real, torch.ones_like(next_tokens[:, None], dtype=torch.bool)],
                              dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                   ) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab] (fp32) of a forward pass without labels.

    For use inside a training or evaluation script: the model keeps its train/eval mode and
    autograd state. Tokens stay where they are; where `attention_mask` (1 = real) marks pads,
    they are not attended to and positions count real tokens only. Returns None on ranks that
    are not the last pipeline stage.
    """
    tokens = input_ids.long()
    real = (torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(tokens.device).bool())
    dec = _Decoder(model, tokens, real, max_len=tokens.shape[1], use_cache=False)
    with _gather_vocab_on_cpu(dec.chunks):
        return dec.forward(dec.tokens, dec.positions, dec._mask(0), last_only=False)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top `top_k` (if > 0), then outside the nucleus: the
    smallest set of the best tokens whose probability sums to at least `top_p` (if > 0)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        values, idx = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, values)
    if top_p > 0.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop = before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, *, top_k: int, top_p: float, temperature: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row from fp32 logits [rows, vocab]: argmax when not sampling."""
    if not (top_k > 1 or top_p > 0.0):
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------------
# decoding loops (the decisions are made on the last stage and broadcast)
# --------------------------------------------------------------------------------------------
def _real_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Logits of the real vocabulary only: the padded ids are never produced. Sliced rather than
    masked, so a sampler draws over exactly the real vocabulary (torch.multinomial's draws depend
    on the number of categories: the same seed then gives Hugging Face's tokens)."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        return logits[:, :vocab_size]
    return logits


def _model_parallel_size() -> int:
    ps = _ps()
    if ps is None:
        return 1
    return (ps.get_tensor_model_parallel_world_size()
            * ps.get_pipeline_model_parallel_world_size())


def _share_decision(next_tokens, reorder, stop: bool, rows: int, device) -> Tuple[
        torch.Tensor, Optional[torch.Tensor], bool]:
    if _model_parallel_size() == 1:
        # one rank decides alone: no packing, no host round trip for `reorder`
        return next_tokens, reorder, stop
    packed = None
    if _is_last_stage():
        re = reorder if reorder is not None else torch.full_like(next_tokens, -1)
        packed = torch.cat([next_tokens, re, torch.tensor([int(stop)], device=device)])
    packed = _share_from_last_stage(packed, 1, torch.long, device)
    re = packed[rows:2 * rows]
    return packed[:rows], (None if bool((re < 0).all()) else re), bool(packed[-1].item())


def _sample_loop(dec: _Decoder, opts: GenerationOptions, eos_id, pad_id, vocab_size,
                 generator) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, device = dec.tokens.shape[0], dec.tokens.device
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out_tokens, out_logprobs = [], []
    top_p = opts.top_p
    for t in range(opts.max_new_tokens):
        logits = dec.logits()
        nxt, stop = None, False
        if logits is not None:
            logits = _real_vocab(logits, vocab_size)
            nxt = sample_next(logits, top_k=opts.top_k, top_p=top_p,
                              temperature=opts.temperature, generator=generator)
            logprob = logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out_logprobs.append(torch.where(done, torch.zeros_like(logprob), logprob))
            stop = t == opts.max_new_tokens - 1
            if eos_id is not None:
                done = done | (nxt == eos_id)
                # a host sync per token only when EOS can stop the batch early
                stop = stop or bool(done.all())
        nxt, _, stop = _share_decision(nxt, None, stop, rows, device)
        out_tokens.append(nxt)
        if opts.top_p_decay > 0.0:
            top_p = max(top_p * opts.top_p_decay, opts.top_p_bound)
        if stop:
            break
        dec.advance(nxt)
    tokens = torch.stack(out_tokens, dim=1)
    logprobs = torch.stack(out_logprobs, dim=1) if out_logprobs else None
    return tokens, logprobs


def _beam_loop(dec: _Decoder, opts: GenerationOptions, batch: int, eos_id, pad_id, vocab_size
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam search with Hugging Face's candidate selection, scores and stopping rules."""
    nb, n = opts.num_beams, opts.max_new_tokens
    lp, early = opts.length_penalty, normalize_early_stopping(opts.early_stopping)
    rows, device = dec.tokens.shape[0], dec.tokens.device
    k = 2 * nb  # candidates kept per prompt, so that nb survive even if nb of them end
    last = _is_last_stage()
    if last:
        run_seq = torch.full((batch, nb, n), pad_id, dtype=torch.long, device=device)
        run_lp = torch.zeros((batch, nb, n), device=device)
        run_score = torch.zeros((batch, nb), device=device)
        run_score[:, 1:] = NEG  # all beams start identical: expand from the first only
        fin_seq, fin_lp = run_seq.clone(), run_lp.clone()
        fin_len = torch.zeros((batch, nb), dtype=torch.long, device=device)
        fin_score = torch.full((batch, nb), NEG, device=device)
        fin_flag = torch.zeros((batch, nb), dtype=torch.bool, device=device)
        open_ = torch.ones((batch, 1), dtype=torch.bool, device=device)
        top_mask = torch.arange(k, device=device) < nb
        offsets = (torch.arange(batch, device=device) * nb)[:, None]
    for t in range(n):
        logits = dec.logits()
        nxt = reorder = None
        stop = False
        if last:
            logp = _real_vocab(logits, vocab_size).log_softmax(-1)  # [rows, V]
            vocab = logp.shape[-1]
            cand = (logp.view(batch, nb, vocab) + run_score[:, :, None]).view(batch, nb * vocab)
            top_scores, top_idx = cand.topk(k, dim=-1)
            src, tok = top_idx // vocab, top_idx % vocab
            cand_seq = run_seq.gather(1, src[:, :, None].expand(-1, -1, n)).clone()
            cand_seq[:, :, t] = tok
            cand_lp = run_lp.gather(1, src[:, :, None].expand(-1, -1, n)).clone()
            cand_lp[:, :, t] = logp.view(batch, nb * vocab).gather(1, top_idx)
            ends = torch.full_like(tok, t == n - 1, dtype=torch.bool)
            if eos_id is not None:
                ends = ends | (tok == eos_id)
            # the best nb candidates that did not end keep running
            alive_scores = top_scores + ends.float() * NEG
            keep = alive_scores.topk(nb, dim=-1).indices
            run_seq, run_lp = cand_seq.gather(1, keep[:, :, None].expand(-1, -1, n)), \
                cand_lp.gather(1, keep[:, :, None].expand(-1, -1, n))
            run_score = alive_scores.gather(1, keep)
            reorder = (src.gather(1, keep) + offsets).view(-1)
            # candidates among the best nb that ended compete for the finished slots
            just_ended = ends & top_mask[None, :]
            scores = top_scores / float(t + 1) ** lp
            if early is True:
                scores = scores + fin_flag.all(-1, keepdim=True).float() * NEG
            scores = scores + (~open_).float() * NEG + (~just_ended).float() * NEG
            merged = torch.cat([fin_score, scores], dim=1)
            best = merged.topk(nb, dim=-1).indices
            fin_score = merged.gather(1, best)
            fin_flag = torch.cat([fin_flag, just_ended], 1).gather(1, best)
            fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1).gather(1, best)
            best_n = best[:, :, None].expand(-1, -1, n)
            fin_seq = torch.cat([fin_seq, cand_seq], 1).gather(1, best_n)
            fin_lp = torch.cat([fin_lp, cand_lp], 1).gather(1, best_n)
            # can a running beam still beat the worst finished one?
            length = n if (early == "never" and lp > 0.0) else t + 1
            best_running = run_score[:, :1] / float(length) ** lp
            worst_fin = torch.where(fin_flag, fin_score.min(-1, keepdim=True).values,
                                    torch.full_like(fin_score, NEG))
            open_ = open_ & (best_running > worst_fin).any(-1, keepdim=True)
            stop = (not bool(open_.any()) or (early is True and bool(fin_flag.all()))
                    or bool(ends.all()))
            nxt = run_seq[:, :, t].reshape(-1)
        nxt, reorder, stop = _share_decision(nxt, reorder, stop, rows, device)
        if stop:
            break
        dec.advance(nxt, reorder)
    if not last:
        return None, None
    length = int(fin_len[:, 0].max())
    return fin_seq[:, 0, :length], fin_lp[:, 0, :length]


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def generate(model, input_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
             attention_mask: Optional[torch.Tensor] = None, *, eos_id: Optional[int] = None,
             pad_id: Optional[int] = None, vocab_size: Optional[int] = None,
             generator: Optional[torch.Generator] = None, **options):
    """Continue each prompt; return token ids [b, s + new] (prompt, left-padded, then the new
    tokens; `pad_id` after EOS), or `(tokens, logprobs[b, new])` when `return_logprobs=True`.

    model: this rank's chunks (list) or one module, wrapped or not.
    input_ids: a [b, s] tensor (with `attention_mask`, 1 = real token, any padding side) or a
        list of token-id lists of any lengths.
    eos_id: stop a sequence when it emits this id (None: run to max_new_tokens).
    pad_id: filler for pads and after EOS (default: eos_id, else 0).
    vocab_size: real vocabulary size; ids from it up to the padded size are never produced.
    generator: torch.Generator for sampling (default: one seeded with `seed`).
    options: the fields of GenerationOptions (max_new_tokens, top_k, top_p, top_p_decay,
        top_p_bound, temperature, num_beams, length_penalty, early_stopping, use_cache,
        lean_decode, decode_cuda_graph, return_logprobs, seed).
    logprobs are those of the model's unmodified distribution (log-softmax of the raw logits,
    before temperature and truncation), 0 after EOS.
    """
    opts = GenerationOptions(**options)
    chunks = _chunks(model)
    device = next(chunks[0].parameters()).device
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    tokens, real = _prepare_batch(input_ids, attention_mask, pad, device)
    batch, s = tokens.shape
    context = unwrap(chunks[0]).max_sequence_length
    require(s <= context, f"the prompt is {s} tokens long but the model's context is {context} "
                           f"positions")
    max_new = context - s + 1 if opts.max_new_tokens is None else \
        min(opts.max_new_tokens, context - s + 1)
    if opts.max_new_tokens is not None and max_new < opts.max_new_tokens:
        warnings.warn(f"max_new_tokens={opts.max_new_tokens} cut to {max_new}: the prompt ({s} "
                      f"tokens) leaves room for {max_new} in the model's context of {context}")
    opts.max_new_tokens = max_new
    if generator is None and opts.do_sample:
        generator = torch.Generator(device=device)
        if opts.seed is not None:
            generator.manual_seed(opts.seed)
        else:
            generator.seed()
    with generation_mode(chunks):
        if opts.num_beams > 1:
            tokens = tokens.repeat_interleave(opts.num_beams, dim=0)
            real = real.repeat_interleave(opts.num_beams, dim=0)
        graph = opts.decode_cuda_graph
        if graph is None:
            ps = _ps()
            graph = device.type == "cuda" and (
                ps is None or ps.get_tensor_model_parallel_world_size() == 1)
        dec = _Decoder(chunks, tokens, real, max_len=s + opts.max_new_tokens,
                       use_cache=opts.use_cache, lean=opts.lean_decode,
                       static=graph and opts.num_beams == 1)
        if opts.num_beams > 1:
            new, logprobs = _beam_loop(dec, opts, batch, eos_id, pad, vocab_size)
        else:
            new, logprobs = _sample_loop(dec, opts, eos_id, pad, vocab_size, generator)
        prompt = tokens[:: opts.num_beams]
    new = _share_from_last_stage(new, 2, torch.long, device)
    result = torch.cat([prompt, new], dim=1)
    if not opts.return_logprobs:
        return result
    logprobs = _share_from_last_stage(logprobs, 2, torch.float32, device)
    return result, logprobs
