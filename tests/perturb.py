"""Perturb every parameter of a model before comparing two code paths on it.

Why: megatron-core and Hugging Face both initialise biases to zero and norm weights to one. On
such a model a path that drops a bias, drops a norm weight, swaps two biases or adds a bias twice
computes exactly the same numbers as a correct one, so a parity test passes whatever the code
does. The default decode path once dropped the QKV bias of every decode step (lean decode read
`skip_bias_add`, which `BiasAddLinear` sets while adding the bias itself) and every test passed;
on real GPT-2 weights greedy tokens differed from Hugging Face's.

`perturb_(module)` gives every bias N(0, bias_std), every norm weight 1 + N(0, norm_std) and every
other weight a small relative jitter (an absolute one where an entry is exactly zero), in place and deterministically from `seed`. It works on our
megatron-core models (any TP/PP chunk: each rank perturbs its own shards; pass the TP rank into
`seed` where shards must differ) and on Hugging Face models alike, so a test can perturb the HF
reference and then import it.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

BIAS_STD = 0.3
NORM_STD = 0.1
WEIGHT_JITTER = 0.05


_TIED_STREAM = 0x7ED0000  # offset of the tied-embedding noise stream's seed


def _zero_fill(w: torch.Tensor, noise: torch.Tensor, weight_jitter: float) -> torch.Tensor:
    """fp32 values for the entries of `w` that are exactly zero (HF's padding rows: a relative
    jitter leaves them zero, so a converter that dropped them would still match): an absolute
    jitter on the scale of the tensor's other entries. Callers keep their own formula elsewhere."""
    wf = w.float()
    nonzero = wf[wf != 0]
    scale = float(nonzero.abs().mean()) if nonzero.numel() else 0.02
    return noise * (scale * weight_jitter)


def _is_norm_weight(name: str, p: torch.Tensor) -> bool:
    """1-D weights are norm (or scale) weights in every model we compare: linear and embedding
    weights are 2-D (T5's relative position bias table too)."""
    return p.dim() == 1 and not name.endswith("bias")


@torch.no_grad()
def perturb_(modules: Union[torch.nn.Module, Iterable[torch.nn.Module]], seed: int = 0,
             bias_std: float = BIAS_STD, norm_std: float = NORM_STD,
             weight_jitter: float = WEIGHT_JITTER) -> None:
    """Perturb every parameter of `modules` (one module or a list of model chunks) in place."""
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for chunk in modules:
        for name, p in chunk.named_parameters():
            if id(p) in seen:  # tied weights: perturb once
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if getattr(p, "shared_embedding", False):
                # The two copies of a tied embedding under PP live on different ranks, each of
                # which calls perturb_ on its own chunk, where the draw above depends on what else
                # the chunk holds. Draw their noise from a stream of its own, so both copies
                # stay equal (TP shards still differ through the TP rank in `seed`).
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(
                    _TIED_STREAM + seed), dtype=torch.float32)
            noise = noise.to(p.device)
            if name.endswith("bias"):
                p.copy_((noise * bias_std).to(p.dtype))
            elif _is_norm_weight(name, p):
                p.copy_((1.0 + noise * norm_std).to(p.dtype))
            else:
                p.add_((p.float() * noise * weight_jitter).to(p.dtype))
                zero = p == 0
                if bool(zero.any()):
                    p.copy_(torch.where(zero, _zero_fill(p, noise, weight_jitter).to(p.dtype), p))


def assert_perturbed(modules: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> None:
    """Guard for tests: no bias is all-zero and no norm weight is all-one."""
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    for chunk in modules:
        for name, p in chunk.named_parameters():
            if name.endswith("bias"):
                assert p.abs().max() > 0, f"{name} is still zero"
            elif _is_norm_weight(name, p):
                assert (p - 1).abs().max() > 0, f"{name} is still one"


def _perturbed(key: str, t: torch.Tensor, gen: torch.Generator, bias_std: float,
               norm_std: float, weight_jitter: float) -> torch.Tensor:
    """One checkpoint tensor as `perturb_` would leave it (optimizer state and integer tensors
    unchanged), named by its checkpoint key."""
    if key.startswith("optimizer") or not t.is_floating_point():
        return t
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    if key.endswith("bias"):
        new = noise * bias_std
    elif _is_norm_weight(key, t):
        new = 1.0 + noise * norm_std
    else:
        new = t.float() * (1.0 + noise * weight_jitter)
        zero = t == 0
        if bool(zero.any()):
            new = torch.where(zero, _zero_fill(t, noise, weight_jitter), new)
    return new.to(t.dtype)


def perturb_checkpoint(ckpt_dir: str, seed: int = 0, bias_std: float = BIAS_STD,
                       norm_std: float = NORM_STD, weight_jitter: float = WEIGHT_JITTER) -> None:
    """Rewrite the latest checkpoint in `ckpt_dir` (one of ours, e.g. the seed checkpoint that
    `train.max_steps=0` saves) with its model tensors perturbed as `perturb_` does, so runs that
    start from it with `checkpoint.load=` (every layout, every fast path) start from non-trivial
    biases and norm weights. Optimizer state is kept as it is (`checkpoint.load=` does not read
    it). Tensors are named by their checkpoint keys, which hold the module path."""
    from data_tools.convert import single_process_world
    from framework.interop import megatron_files as mf
    from framework import checkpoint as ckpt

    import os
    import shutil
    import tempfile

    it = ckpt.latest_iteration(ckpt_dir)
    assert it is not None, f"{ckpt_dir} has no committed checkpoint"
    meta = ckpt.read_meta(ckpt_dir, it)
    gen = torch.Generator().manual_seed(seed)
    keep = tempfile.mkdtemp()
    tok = os.path.join(ckpt.iter_dir(ckpt_dir, it), "tokenizer")
    tok_copy = None
    if os.path.isdir(tok):  # the rewrite replaces the iteration directory: keep the tokenizer
        tok_copy = os.path.join(keep, "tokenizer")
        shutil.copytree(tok, tok_copy)
    with single_process_world():
        common, tensors, objects = mf.load_full(ckpt.iter_dir(ckpt_dir, it))
        out = {}
        for key in sorted(tensors):
            t = tensors[key]
            out[key] = _perturbed(key, t, gen, bias_std, norm_std, weight_jitter)
        mf.write_checkpoint(ckpt_dir, it, common, out, objects, meta, tokenizer_dir=tok_copy)
    shutil.rmtree(keep)


def perturb_checkpoint_resumable(ckpt_dir: str, seed: int = 0, bias_std: float = BIAS_STD,
                                 norm_std: float = NORM_STD,
                                 weight_jitter: float = WEIGHT_JITTER) -> None:
    """`perturb_checkpoint` for a checkpoint that is to be resumed (the same `checkpoint.dir`),
    not only loaded with `checkpoint.load=`: the model tensors are perturbed alike, and the
    per-rank RNG states are kept. (`perturb_checkpoint` drops them, as every whole-tensor
    rewrite does, but keeps the checkpoint's layout in framework.json, so a resume at that layout
    asks for them and fails: "Missing key in checkpoint state_dict: rng_state/...".) For a
    checkpoint saved before the first optimizer step (`train.max_steps=0`), or one whose
    optimizer holds no copy of the weights (fp32 training): fp32 main params stored under
    `optimizer.` keys are kept as they are, and a resume would load those instead."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from data_tools.convert import single_process_world
    from framework import checkpoint as ckpt
    from framework.checkpoint import reader
    from framework.interop import megatron_files as mf

    import os
    import shutil
    import tempfile

    it = ckpt.latest_iteration(ckpt_dir)
    assert it is not None, f"{ckpt_dir} has no committed checkpoint"
    meta = ckpt.read_meta(ckpt_dir, it)
    path = ckpt.iter_dir(ckpt_dir, it)
    gen = torch.Generator().manual_seed(seed)
    keep = tempfile.mkdtemp()
    tok_copy = None
    if os.path.isdir(os.path.join(path, "tokenizer")):  # the rewrite replaces the directory
        tok_copy = os.path.join(keep, "tokenizer")
        shutil.copytree(os.path.join(path, "tokenizer"), tok_copy)
    with single_process_world():
        md = mf.sharded_metadata(path)
        loaded = reader.read_dist(path, "load", dict(md))  # the RNG states too
        common = reader.read_dist(path, "common")
        out, objects = {}, {}
        for k in sorted(md):
            v = md[k]
            if not isinstance(v, ShardedTensor):
                objects[k] = (v, loaded[k])
                continue
            t = loaded[k]
            out[k] = _perturbed(k, t, gen, bias_std, norm_std, weight_jitter)
        assert any(o.key == mf.RNG_KEY for o, _ in objects.values()), \
            f"{path} holds no RNG state to keep"
        mf.write_checkpoint(ckpt_dir, it, common, out, objects, meta, tokenizer_dir=tok_copy)
    shutil.rmtree(keep)
