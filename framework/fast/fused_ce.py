"""Fused, chunked, vocab-parallel output projection + cross-entropy for GPT training.

megatron-core's loss path (`GPTModel._postprocess` -> `ColumnParallelLinear` ->
`vocab_parallel_cross_entropy`) materialises the logits of the whole micro-batch
([s, b, V/tp] in the compute dtype), upcasts them to fp32, keeps the fp32 softmax alive until
the backward pass and runs several full-size elementwise passes over it. At GPT-2 sizes that
is gigabytes per micro-batch.

`LinearCrossEntropy` computes, per token t, ``loss_t = logsumexp(h_t W^T) - (h_t W^T)[label_t]``
without ever holding more than one chunk of logits:

* forward: for each chunk of `chunk_tokens` tokens, logits = h_c @ W^T in the input dtype, then
  in fp32 the row max, the sum of exp relative to it and the target logit (one kernel). Over
  the tensor-parallel group (each rank owns a vocab slice) the max is all-reduced (MAX), the
  sums are rescaled to the global max and all-reduced together with the target logit (SUM).
  It keeps only the per-token log-sum-exp (fp32, 4 bytes a token) for the backward pass.
* backward: for each chunk it recomputes the logits, forms
  ``g = (softmax - onehot) * grad_output`` in fp32 (grad_output is per token, e.g. the loss
  mask over the token count, so the gradient is correct for any upstream gradient), casts it to
  the input dtype and computes ``grad_h[c] = g @ W`` and ``grad_W += g^T @ h_c`` (fp32
  accumulator when there is more than one chunk). Then, like `ColumnParallelLinear`'s input
  gradient, grad_h is all-reduced over TP (or reduce-scattered along s with sequence
  parallelism).

Saved for backward: the hidden states the output layer would keep anyway (the SP shard with
sequence parallelism, re-gathered in backward like mcore does), the weight (a reference), the
labels and one fp32 log-sum-exp per token. Peak extra memory is one chunk of logits and one of
its gradient, in the input dtype (on CUDA, where the elementwise steps are compiled; eager
adds fp32 temporaries of the chunk).

Cost: one extra logits GEMM (recomputation) in backward, 4 GEMMs of N*V*H instead of 3, paid
back by the fused elementwise work and by holding nothing between forward and backward
(`benchmarks/throughput.py` measures it in training; results in benchmarks/RESULTS.md).

`keep_logits` trades that GEMM for memory: the forward computes the micro-batch's logits in one
GEMM and keeps them (N x V/tp in the compute dtype) until backward, which turns them into the
logit gradient in place, chunk by chunk, then runs one input-gradient and one weight-gradient
GEMM over all tokens: the 3 GEMMs of an unfused output layer, at full size (no per-chunk
accumulator pass over the weight gradient), and still no fp32 logits. At the Llama-3.2-1B shape
(vocab 128256) the output layer is a fifth of the model's GEMM work, so the recomputation and
the chunked weight gradient cost several percent of the step (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from framework.errors import ConfigError

# Chunk size target: one chunk's logits, in the compute dtype, take at most this many bytes.
# On CUDA (compiled kernels) that and the chunk's logit gradient, also in the compute dtype, is
# all that is materialised: no fp32 copy. Larger chunks run slightly faster and take more
# memory; this size keeps the chunk small next to the activations.
CHUNK_BYTES = 256 * 1024 * 1024


def default_chunk_tokens(vocab_per_partition: int, itemsize: int = 4) -> int:
    """Tokens per chunk so that one chunk's logits (`itemsize` bytes each) take <= CHUNK_BYTES
    (a multiple of 64, at least 64)."""
    n = CHUNK_BYTES // (itemsize * max(1, vocab_per_partition))
    return max(64, (n // 64) * 64)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    ws = _group_size(group)
    if ws == 1:
        return x
    out = torch.empty((x.shape[0] * ws, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    ws = _group_size(group)
    if ws == 1:
        return x
    assert x.shape[0] % ws == 0, "first dimension must be divisible by the TP size"
    out = torch.empty((x.shape[0] // ws, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _local_targets(labels: torch.Tensor, vocab_start: int, vocab_size: int):
    """Labels -> (index into this rank's vocab slice, 0 where not owned; owned mask)."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_size)
    return torch.where(owned, local, torch.zeros_like(local)), owned


_OUT_DTYPE_ADDMM: Optional[bool] = None  # torch.addmm(..., out_dtype=fp32) works (CUDA, bf16/fp16)


def _accumulate_wgrad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32) += g^T @ h, with g, h in the compute dtype."""
    global _OUT_DTYPE_ADDMM
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
        return
    if g.is_cuda and _OUT_DTYPE_ADDMM is not False:
        try:
            # fp32 output and accumulation straight from the bf16/fp16 GEMM (no rounding of the
            # per-chunk partial to the compute dtype, no extra pass)
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_ADDMM = True
            return
        except torch.OutOfMemoryError:
            raise  # not a missing feature: the run reports it (framework/training/oom.py)
        except (TypeError, RuntimeError):
            _OUT_DTYPE_ADDMM = False
    acc.add_(torch.mm(g.t(), h))


def _chunk_stats(logits: torch.Tensor, local_t: torch.Tensor, owned: torch.Tensor, acc):
    """One chunk's logits [n, V/tp] -> (row max, sum of exp(logit - max), target logit or 0),
    in `acc` (fp32)."""
    lf = logits.to(acc)
    mx = lf.amax(dim=1)
    sum_exp = torch.exp(lf - mx[:, None]).sum(dim=1)
    tgt = lf.gather(1, local_t[:, None]).squeeze(1)
    return mx, sum_exp, torch.where(owned, tgt, torch.zeros_like(tgt))


def _chunk_grad(logits: torch.Tensor, lse: torch.Tensor, local_t: torch.Tensor,
                owned: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """d loss / d logits for one chunk: (softmax - onehot(label)) * grad_output, computed in
    lse's dtype (fp32) and returned in the logits' dtype."""
    p = torch.exp(logits.to(lse.dtype) - lse[:, None])
    col = torch.arange(logits.shape[1], device=logits.device)
    hit = (col[None, :] == local_t[:, None]) & owned[:, None]
    p = torch.where(hit, p - 1, p)
    return (p * go[:, None]).to(logits.dtype)


def _chunk_grad_(logits: torch.Tensor, lse: torch.Tensor, local_t: torch.Tensor,
                 owned: torch.Tensor, go: torch.Tensor) -> None:
    """`_chunk_grad` written over the logits themselves (kept logits: no second buffer)."""
    logits.copy_(_chunk_grad(logits, lse, local_t, owned, go))


# On CUDA the elementwise/reduction steps run through torch.compile: one kernel reads the
# chunk's logits once for the stats, one turns them into the gradient, instead of ~5 full-size
# fp32 passes each. Eager (the same functions) elsewhere or if compilation fails.
COMPILE = os.environ.get("FRAMEWORK_FUSED_CE_COMPILE", "1") != "0"
_EAGER = {"stats": _chunk_stats, "grad": _chunk_grad, "grad_": _chunk_grad_}
_COMPILED: dict = {}


def _kernel(name: str, cuda: bool):
    if not (cuda and COMPILE):
        return _EAGER[name]
    fn = _COMPILED.get(name)
    if fn is None:
        compiled = torch.compile(_EAGER[name], fullgraph=True)

        def fn(*args, _compiled=compiled, _name=name):
            if _COMPILED.get(_name + ".failed"):
                return _EAGER[_name](*args)
            try:
                return _compiled(*args)
            except torch.OutOfMemoryError:
                raise  # not a compiler problem: the run reports it (framework/training/oom.py)
            except Exception as e:  # no triton / compiler problem: stay correct, go eager
                import warnings

                warnings.warn(f"fused cross-entropy: torch.compile of {_name} failed ({e!r}); "
                              f"running it eagerly")
                _COMPILED[_name + ".failed"] = True
                return _EAGER[_name](*args)

        _COMPILED[name] = fn
    return fn


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight^T`` against `labels`, vocab-parallel.

    Args (of `apply`):
        hidden: [s, b, H] (or the sequence-parallel shard [s/tp, b, H]); bf16, fp16 or fp32.
        weight: [V/tp, H], this rank's vocab slice of the output weight (same dtype as hidden).
        labels: [s*b] int64, tokens in (s, b) order (hidden.reshape(-1, H)'s order, after the
            sequence-parallel gather).
        tp_group: the tensor-parallel process group (None: no tensor parallelism).
        sequence_parallel: hidden is sharded along s over tp_group.
        chunk_tokens: tokens per chunk (None: `default_chunk_tokens`).
        keep_logits: compute all logits in one GEMM and keep them for backward (see the
            module's docstring); chunk_tokens then only bounds the backward's temporaries.
            The backward overwrites the kept logits, so the graph takes one backward: a second
            (retain_graph=True) stops with autograd's "modified by an inplace operation".

    Returns: fp32 loss [s*b] in the same token order as labels.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, sequence_parallel, chunk_tokens,
                keep_logits=False):
        tp = _group_size(tp_group)
        sequence_parallel = bool(sequence_parallel) and tp > 1
        total = _all_gather_first_dim(hidden, tp_group) if sequence_parallel else hidden
        H = total.shape[-1]
        h2d = total.reshape(-1, H)
        if not h2d.is_contiguous():
            h2d = h2d.contiguous()
        n_tok = h2d.shape[0]
        assert labels.numel() == n_tok, (tuple(labels.shape), tuple(total.shape))
        assert weight.shape[1] == H and weight.dtype == h2d.dtype, (weight.shape, weight.dtype,
                                                                    h2d.dtype)
        vocab = weight.shape[0]
        # mcore's VocabUtility.vocab_range_from_per_partition_vocab_size: rank r owns
        # [r * V/tp, (r + 1) * V/tp)
        vocab_start = _group_rank(tp_group) * vocab
        chunk = int(chunk_tokens or default_chunk_tokens(vocab, h2d.element_size()))
        kept = None
        labels = labels.reshape(-1)
        local_t, owned = _local_targets(labels, vocab_start, vocab)

        acc = torch.promote_types(h2d.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
        lse = torch.empty(n_tok, dtype=acc, device=h2d.device)
        loss = torch.empty(n_tok, dtype=acc, device=h2d.device)
        stats = _kernel("stats", h2d.is_cuda)
        if keep_logits:  # one GEMM; the stats below still go chunk by chunk over its rows
            kept = torch.mm(h2d, weight.t())
        for start in range(0, n_tok, chunk):
            end = min(start + chunk, n_tok)
            logits = kept[start:end] if kept is not None else torch.mm(h2d[start:end],
                                                                        weight.t())
            mx, sum_exp, tgt = stats(logits, local_t[start:end], owned[start:end], acc)
            del logits
            if tp > 1:
                # this rank's sum of exp is relative to its own max: rescale to the global one
                local_mx = mx.clone()
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
                both = torch.stack([sum_exp * torch.exp(local_mx - mx), tgt])
                dist.all_reduce(both, group=tp_group)
                sum_exp, tgt = both[0], both[1]
            chunk_lse = torch.log(sum_exp).add_(mx)
            lse[start:end] = chunk_lse
            loss[start:end] = chunk_lse - tgt

        ctx.save_for_backward(hidden, weight, local_t, owned, lse,
                              *((kept,) if kept is not None else ()))
        ctx.tp_group = tp_group
        ctx.sequence_parallel = sequence_parallel
        ctx.chunk = chunk
        ctx.total_shape = tuple(total.shape)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors  # unpacked once (a saved-tensor hook may copy each time)
        hidden, weight, local_t, owned, lse = saved[:5]
        kept = saved[5] if len(saved) > 5 else None
        tp_group, chunk = ctx.tp_group, ctx.chunk
        tp = _group_size(tp_group)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = _all_gather_first_dim(hidden, tp_group) if ctx.sequence_parallel else hidden
        H = total.shape[-1]
        h2d = total.reshape(-1, H)
        if not h2d.is_contiguous():
            h2d = h2d.contiguous()
        n_tok = h2d.shape[0]
        dtype = h2d.dtype
        acc = lse.dtype
        go = grad_loss.reshape(-1).to(acc)
        if kept is not None:
            # the kept logits become the logit gradient in place (chunk by chunk: the compiled
            # kernel's temporaries stay one chunk), then one GEMM each for grad_h and grad_w
            grad_ = _kernel("grad_", h2d.is_cuda)
            for start in range(0, n_tok, chunk):
                end = min(start + chunk, n_tok)
                args = (lse[start:end], local_t[start:end], owned[start:end], go[start:end])
                failed = _COMPILED.get("grad_.failed")
                grad_(kept[start:end], *args)
                if _COMPILED.get("grad_.failed") and not failed:
                    # the compiled kernel failed on this chunk, which it may have half written
                    # before the eager rerun: the chunk's logits again, then the eager kernel
                    torch.mm(h2d[start:end], weight.t(), out=kept[start:end])
                    _EAGER["grad_"](kept[start:end], *args)
            chunk = max(n_tok, 1)
        n_chunks = (n_tok + chunk - 1) // chunk

        grad_h = torch.empty_like(h2d) if need_h else None
        grad_w_acc = None
        grad_w = None
        if need_w and (n_chunks > 1 or dtype == acc):
            grad_w_acc = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_kernel = _kernel("grad", h2d.is_cuda)
        for start in range(0, n_tok, chunk):
            end = min(start + chunk, n_tok)
            h_c = h2d[start:end]
            if kept is not None:
                g = kept
            else:
                logits = torch.mm(h_c, weight.t())
                g = grad_kernel(logits, lse[start:end], local_t[start:end], owned[start:end],
                                go[start:end])
                del logits
            if need_h:
                torch.mm(g, weight, out=grad_h[start:end])
            if need_w:
                if grad_w_acc is not None:
                    _accumulate_wgrad(grad_w_acc, g, h_c)
                else:
                    grad_w = torch.mm(g.t(), h_c)
            del g

        if grad_w_acc is not None:
            grad_w = grad_w_acc if weight.dtype == acc else grad_w_acc.to(weight.dtype)
        if need_h:
            grad_h = grad_h.view(ctx.total_shape)
            if ctx.sequence_parallel:
                grad_h = _reduce_scatter_first_dim(grad_h, tp_group)
            elif tp > 1:
                # ColumnParallelLinear's input gradient: each rank holds the part from its vocab
                # slice (mcore: copy_to_tensor_model_parallel_region / allreduce_dgrad)
                dist.all_reduce(grad_h, group=tp_group)
        return grad_h, grad_w, None, None, None, None, None


# keep_logits=None (auto): keep them when they take at most this fraction of the GPU's memory
KEEP_LOGITS_FRACTION = 0.08


def keep_logits_auto(n_tokens: int, vocab_per_partition: int, itemsize: int,
                     device: torch.device) -> bool:
    """The auto choice of `keep_logits`: on a GPU, when one micro-batch's logits (n_tokens x
    V/tp x itemsize) take at most KEEP_LOGITS_FRACTION of its total memory (e.g. an H200 keeps
    the 8.4 GB of Llama-3.2-1B's vocab at 16 x 2048 tokens, an 80 GB card up to 6.4 GB);
    never on CPU."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return n_tokens * vocab_per_partition * itemsize <= KEEP_LOGITS_FRACTION * total


def keeps_logits(keep: Optional[bool], n_tokens: int, vocab_per_partition: int, itemsize: int,
                 device: torch.device) -> bool:
    """`keep_logits` resolved: true/false as given, None by `keep_logits_auto`."""
    if keep is None:
        return keep_logits_auto(n_tokens, vocab_per_partition, itemsize, device)
    return bool(keep)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         tp_group=None, sequence_parallel: bool = False,
                         chunk_tokens: Optional[int] = None,
                         keep_logits: Optional[bool] = False) -> torch.Tensor:
    """mcore's layout: hidden [s, b, H] ([s/tp, b, H] with sequence parallelism), weight
    [V/tp, H], labels [b, s] -> fp32 per-token loss [b, s]. `keep_logits`: see
    `LinearCrossEntropy` (None: `keep_logits_auto`); only where a backward will run."""
    b, s = labels.shape
    labels_sb = labels.t().reshape(-1)
    # (under torch.autocast the kept logits would not be in the weight's dtype: recompute)
    training = (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
                and not torch.is_autocast_enabled(hidden.device.type))
    keep_logits = keeps_logits(keep_logits, labels.numel(), weight.shape[0],
                               weight.element_size(), weight.device)
    loss = LinearCrossEntropy.apply(hidden, weight, labels_sb, tp_group, sequence_parallel,
                                    chunk_tokens, bool(keep_logits and training))
    return loss.view(s, b).t().contiguous()


def __getattr__(name):
    # FusedCEGPTModel is built on first use, so that the function above can be imported (and
    # used, e.g. in spawned test workers) without importing megatron-core's model zoo
    if name == "FusedCEGPTModel":
        cls = _fused_ce_gpt_model()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_ce_gpt_model():
    from megatron.core.models.gpt import GPTModel

    class FusedCEGPTModel(GPTModel):
        """`GPTModel` whose training/eval loss (labels given) runs `LinearCrossEntropy`
        instead of output layer + `vocab_parallel_cross_entropy`. Without labels (generation,
        inference) it is `GPTModel`: it returns the logits. Only the last pipeline stage
        (post_process) computes a loss; the output weight is the tied word-embedding weight
        or the output layer's own."""

        fused_ce_chunk_tokens: Optional[int] = None  # None: default_chunk_tokens(V/tp)
        # keep the micro-batch's logits for backward (None: keep_logits_auto)
        fused_ce_keep_logits: Optional[bool] = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            c = self.config
            bad = [name for name, on in (
                ("multi-token prediction (mtp_num_layers)",
                 c.mtp_num_layers is not None or self.mtp_process),
                ("defer_embedding_wgrad_compute", c.defer_embedding_wgrad_compute),
                ("context parallelism (context_parallel_size > 1)", c.context_parallel_size > 1),
            ) if on]
            if self.post_process and self.output_layer.bias is not None:
                bad.append("an output-layer bias")
            if bad:
                raise ConfigError("model.fused_cross_entropy=true does not support "
                                  + ", ".join(bad))

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
            inference_context = kwargs.get("inference_context")
            if (labels is None or not self.post_process
                    or (inference_context is not None and not self.training)):
                return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                            *args, **kwargs)
            weight = (self.shared_embedding_or_output_weight()
                      if self.share_embeddings_and_output_weights else self.output_layer.weight)
            return linear_cross_entropy(
                hidden_states, weight, labels, tp_group=self.output_layer.tp_group,
                sequence_parallel=self.output_layer.sequence_parallel,
                chunk_tokens=self.fused_ce_chunk_tokens, keep_logits=self.fused_ce_keep_logits)

    FusedCEGPTModel.__module__ = __name__
    FusedCEGPTModel.__qualname__ = "FusedCEGPTModel"
    return FusedCEGPTModel
