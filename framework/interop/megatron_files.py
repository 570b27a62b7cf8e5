"""Our checkpoints (megatron-core dist_checkpointing, torch_dist) at the level of whole tensors.

A torch_dist checkpoint stores every tensor under its global key and shape, whatever the TP/PP
layout that wrote it; loading reshards. So one process can read every tensor in full
(`load_full`), change what is layout-bound (the vocabulary padding; the per-rank RNG states are
dropped), and write them back unsharded (`write_checkpoint`): the result loads at any layout.
Used by `data_tools.convert reshape` and `--print-checkpoint-structure`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from framework.checkpoint import reader
from framework.checkpoint.commit import commit, stage
from framework.checkpoint.manifest import MANIFEST, verify_checkpoint, write_manifest
from framework.checkpoint.state import sharded_state
from framework.config import ModelConfig, ParallelConfig
from framework.errors import InteropError
from framework.models.build import build_model

RNG_KEY = "rng_state"


def resolve_checkpoint(path: str, *, allow_symlinks: bool = False, verify: Optional[bool] = True
                       ) -> Tuple[str, int, str, Dict[str, Any]]:
    """`path` is a checkpoint directory (with the tracker) or one `iter_XXXXXXX` inside it.
    Returns (checkpoint dir, iteration, iteration dir, metadata), all checked by
    `framework.checkpoint.reader` (closed tree, tracker, framework.json) and its files against
    the manifest (`framework.checkpoint.manifest`; sizes; checksums unless `verify=False`;
    nothing with `verify=None`). A failed check names the earlier checkpoint that verifies, as
    the `--load` that converts it."""
    if not os.path.isdir(path):
        raise InteropError(f"{path} is not a directory")
    if os.path.lexists(os.path.join(path, reader.TRACKER)):
        it = reader.latest_iteration(path, allow_symlinks=allow_symlinks)
        root, iter_path = path, reader.iter_dir(path, it)
        meta = reader.read_meta(path, it, allow_symlinks=allow_symlinks)
    else:
        m = re.fullmatch(r"iter_([0-9]+)", os.path.basename(os.path.normpath(path)))
        if not (os.path.isfile(os.path.join(path, reader.META)) and m):
            raise InteropError(f"{path} is not one of our checkpoints (no {reader.TRACKER}, and "
                               f"not an iter_XXXXXXX directory with {reader.META})")
        it, iter_path = int(m.group(1)), path
        meta = reader.read_iter_meta(path, it, allow_symlinks=allow_symlinks)
        root = os.path.dirname(os.path.normpath(path))
    if verify is not None:
        verify_checkpoint(iter_path, it, meta, checksums=verify, allow_symlinks=allow_symlinks,
                          collective=False, how_to_load=lambda _it, p: f"--load {p}")
    return root, it, iter_path, meta


def sharded_metadata(iter_path: str, *, allow_symlinks: bool = False) -> Dict[str, Any]:
    return reader.read_dist(iter_path, "sharded_metadata", allow_symlinks=allow_symlinks)


def describe(iter_path: str, *, allow_symlinks: bool = False
             ) -> Tuple[List[Tuple[str, tuple, str]], List[str]]:
    """([(tensor key, global shape, dtype)], [object keys]) of a checkpoint, sorted."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    md = sharded_metadata(iter_path, allow_symlinks=allow_symlinks)
    tensors = sorted((v.key, tuple(v.global_shape), str(v.dtype).replace("torch.", ""))
                     for v in md.values() if isinstance(v, ShardedTensor))
    objects = sorted({v.key for v in md.values() if not isinstance(v, ShardedTensor)})
    return tensors, objects


def load_full(iter_path: str, *, allow_symlinks: bool = False
              ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
    """(common state, {key: full tensor}, {object unique key: (ShardedObject, value)}).

    Per-rank RNG states are left out: they belong to the layout that wrote them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    md = sharded_metadata(iter_path, allow_symlinks=allow_symlinks)
    template = {k: v for k, v in md.items()
                if isinstance(v, ShardedTensor) or v.key != RNG_KEY}
    loaded = reader.read_dist(iter_path, "load", dict(template), allow_symlinks=allow_symlinks)
    common = reader.read_dist(iter_path, "common", allow_symlinks=allow_symlinks)
    tensors = {k: loaded[k] for k, v in template.items() if isinstance(v, ShardedTensor)}
    objects = {k: (v, loaded[k]) for k, v in template.items() if not isinstance(v, ShardedTensor)}
    return common, tensors, objects


def build_on_meta(model_cfg: ModelConfig, vocab_rows: int) -> List[torch.nn.Module]:
    """The model at TP1/PP1 on the meta device (no memory, no init cost), for shape checks.
    Needs a one-process megatron parallel state. Llama-3 RoPE scaling is left out: it only
    rescales the rotary frequencies (no parameter, no stored tensor), and it copies them to the
    device of mcore's CPU buffer, which a meta tensor cannot be copied to."""
    cfg = replace(model_cfg, rope_scaling=False) if model_cfg.rope_scaling else model_cfg
    with torch.device("meta"):
        return build_model(cfg, ParallelConfig(), vocab_size=vocab_rows, bf16=False,
                           fp16=False, device=torch.device("meta"), wrap_ddp=False)


def check_model_shapes(iter_path: str, model_cfg: ModelConfig, vocab_rows: int, *,
                       allow_symlinks: bool = False) -> None:
    """The stored tensors are those of the model that framework.json describes: the model is
    built at TP1/PP1 on the meta device (`build_on_meta`) and every tensor's global shape
    compared. Needs a one-process megatron parallel state."""
    chunks = build_on_meta(model_cfg, vocab_rows)
    template = sharded_state(chunks, None, with_optimizer=False, is_loading=True)
    template.pop(RNG_KEY, None)
    reader.check_shapes(iter_path, template,
                        reader.read_dist(iter_path, "metadata", allow_symlinks=allow_symlinks))


def write_checkpoint(ckpt_dir: str, iteration: int, common: Dict[str, Any],
                     tensors: Dict[str, torch.Tensor], objects: Dict[str, Any],
                     meta: Dict[str, Any], tokenizer_dir: Optional[str] = None) -> str:
    """Write unsharded tensors (+ objects, common state) as a committed checkpoint.

    The commit protocol of every checkpoint writer (`framework.checkpoint.commit`), with
    manifest.json written last inside the staging directory. Must run in a single-process
    torch.distributed world.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    tmp = stage(ckpt_dir, iteration)
    sd = dict(common)
    # Where a tensor sits in the nested dict does not matter to the file: loading matches by
    # ShardedTensor key. They go under one top-level entry that load_checkpoint ignores.
    sd["whole_tensors"] = {
        k: ShardedTensor.from_rank_offsets(k, t.contiguous(), replica_id=0)
        for k, t in tensors.items()}
    sd["whole_objects"] = {
        k: ShardedObject(o.key, value, o.global_shape, o.global_offset, replica_id=0)
        for k, (o, value) in objects.items()}
    with reader.cpu_safe():
        dist_checkpointing.save(sd, tmp)
    with open(os.path.join(tmp, reader.META), "w") as f:
        json.dump({**meta, "manifest": MANIFEST}, f, indent=1, default=str)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    write_manifest(tmp)  # last file inside: it covers all the others
    return commit(tmp, ckpt_dir, iteration)


def resize_vocab_rows(t: torch.Tensor, rows: int, vocab_size: int, key: str) -> torch.Tensor:
    """Pad (zeros) or cut the vocabulary rows of `t` to `rows`; never cuts a real token."""
    if rows < vocab_size:
        raise InteropError(f"{key}: {rows} rows cannot hold the vocabulary of {vocab_size}")
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def is_vocab_key(key: str, vocab_names: List[str]) -> bool:
    """`embedding.word_embeddings.weight`, and optimizer states of it such as
    `optimizer.state.exp_avg.embedding.word_embeddings.weight`."""
    return any(key == n or key.endswith("." + n) for n in vocab_names)
