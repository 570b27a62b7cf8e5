"""The one way checkpoint files are read.

Every reader of a checkpoint goes through this module: resume (`framework.checkpoint.state.
load_checkpoint`), generate.py and `framework.inference.load_for_inference`, and every
`data_tools.convert` subcommand (`framework.interop.megatron_files`). Nothing else in the code base calls
megatron-core's `dist_checkpointing.load*`, torch DCP's `read_metadata` or `torch.load` on a
checkpoint file (tests/test_checkpoint_safety.py checks the source tree for it).

* `latest_iteration` reads the tracker: a regular file holding ASCII digits, nothing else.
* `iteration_path` names a committed `iter_XXXXXXX` directory and checks that the checkpoint is
  a closed tree (`check_closed_tree`): no symlink inside it, nothing but regular files and
  directories (a FIFO would block the reader forever), the iteration directory and the tracker
  not symlinks. `allow_symlinks=True` (checkpoint.allow_symlinks / generate.py allow_symlinks /
  convert --allow-symlinks) follows symlinks for a tree the user trusts.
* `read_meta` parses `framework.json` and checks the fields every reader relies on, including
  the stored model config (typed like the config it came from).
* `read_dist` is the gate for the files that hold pickles (`.metadata`, `common.pt`, the DCP
  byte items in `.distcp`), whatever is read from them (a load into a model, mcore's sharded
  metadata, the common state, DCP's index). It checks the tree, `metadata.json`, the
  `.metadata` index against the files it names (sizes: a truncated `.distcp` is found here)
  and, when loading into a model, every stored tensor's shape against the model built from the
  config (a `framework.json` that disagrees with the tensors); then it runs megatron-core's
  reader inside `framework.security.unpickling.safe_checkpoint_load` (no pickled code runs).
  Whatever goes wrong comes out as one `CheckpointError` line naming the checkpoint.

The files are checked against the checkpoint's `manifest.json` first, by
`framework.checkpoint.manifest.verify_checkpoint`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from framework.config import ModelConfig
from framework.errors import CheckpointError, ConfigError
from framework.patching import patched
from framework.security.unpickling import safe_checkpoint_load

TRACKER = "latest_checkpointed_iteration.txt"
META = "framework.json"
DIST_CONFIG = "metadata.json"  # megatron-core's: which backend wrote the checkpoint
DCP_METADATA = ".metadata"  # torch DCP's index of the .distcp files (a pickle)
COMMON = "common.pt"  # megatron-core's non-sharded state (a torch.save pickle)
MAX_TRACKER_BYTES = 64
MAX_META_BYTES = 64 << 20  # framework.json holds the config; anything this large is not ours
SYMLINK_HINT = ("a checkpoint must be a closed tree; if you trust it, allow symlinks with "
                "checkpoint.allow_symlinks=true (train.py), allow_symlinks=true (generate.py) or "
                "--allow-symlinks (data_tools.convert)")


def iter_dir(ckpt_dir: str, iteration: int) -> str:
    return os.path.join(ckpt_dir, f"iter_{iteration:07d}")


# --------------------------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_entry(path: str, allow_symlinks: bool,
                 want_dir: Optional[bool] = None) -> os.stat_result:
    """lstat `path`; refuse a symlink (unless allowed) and anything but files and directories."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not allow_symlinks:
            raise CheckpointError(f"{path} is a symlink (to {os.readlink(path)}); refusing it: "
                                  f"{SYMLINK_HINT}")
        try:
            st = os.stat(path)
        except OSError:
            raise CheckpointError(f"{path} is a broken symlink (to {os.readlink(path)})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise CheckpointError(f"{path} is {_kind(st.st_mode)}; a checkpoint holds only regular "
                              f"files and directories")
    if want_dir is not None and stat.S_ISDIR(st.st_mode) != want_dir:
        raise CheckpointError(f"{path} is {'not ' if want_dir else ''}a directory")
    return st


def check_closed_tree(path: str, *, allow_symlinks: bool = False) -> None:
    """Refuse symlinks (unless allowed), FIFOs, sockets and devices anywhere under `path`."""
    seen = set()
    for root, dirs, files in os.walk(path, followlinks=allow_symlinks):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, only possible with allow_symlinks
            dirs[:] = []
            continue
        seen.add(real)
        for name in dirs + files:
            _check_entry(os.path.join(root, name), allow_symlinks)


# --------------------------------------------------------------------------------------------
# tracker and framework.json
# --------------------------------------------------------------------------------------------
def latest_iteration(ckpt_dir: Optional[str], *, allow_symlinks: bool = False) -> Optional[int]:
    """The committed iteration named by the tracker, or None when there is none."""
    if not ckpt_dir:
        return None
    path = os.path.join(ckpt_dir, TRACKER)
    if not os.path.lexists(path):
        return None
    _check_entry(path, allow_symlinks, want_dir=False)
    with open(path, "rb") as f:
        raw = f.read(MAX_TRACKER_BYTES + 1)
    m = re.fullmatch(rb"\s*([0-9]{1,10})\s*", raw)  # ASCII digits only: '١٢'.isdigit() is True
    if m is None:
        shown = raw[:40].decode("utf-8", "backslashreplace")
        have = committed_iterations(ckpt_dir)
        fix = f"; the newest committed iteration is {have[-1]}: to go on from there, write " \
              f"{have[-1]} into it" if have else ""
        raise CheckpointError(f"{path}: tracker does not hold an iteration number "
                              f"({shown!r}){fix}")
    it = int(m.group(1))
    try:
        iteration_path(ckpt_dir, it, allow_symlinks=allow_symlinks, tracker=path)
    except CheckpointError as e:
        final = iter_dir(ckpt_dir, it)
        if os.path.isfile(os.path.join(final, META)):  # there, but not a closed tree: as it is
            raise
        for staged in (f"{final}.tmp", f"{final}.tmp-replaced"):  # a commit killed mid-rename
            if not os.path.exists(final) and os.path.isfile(os.path.join(staged, META)):
                raise CheckpointError(f"{e}; a save of it was killed between two renames and "
                                      f"left it complete in {staged}: move that to {final}") \
                    from None
        older = [i for i in committed_iterations(ckpt_dir) if i < it]
        if not older:
            raise
        raise CheckpointError(f"{e}; the newest committed iteration before it is {older[-1]}: "
                              f"to go on from there, write {older[-1]} into {path}") from None
    return it


def committed_iterations(ckpt_dir: Optional[str]) -> List[int]:
    """The iterations with a committed directory (`iter_N` holding framework.json) in
    `ckpt_dir`, sorted, whatever the tracker says."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r"iter_([0-9]{7,10})", name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, META)):
            out.append(int(m.group(1)))
    return sorted(out)


def uncommitted_iteration_names(ckpt_dir: Optional[str]) -> List[str]:
    """Entries of `ckpt_dir` named as a checkpoint iteration (`iter_N`, as `iter_dir` spells it)
    that are not committed checkpoints (no framework.json): a user's folder or file, or another
    tool's checkpoint, which a save of that iteration would replace. Sorted."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r"iter_([0-9]{7,10})", name)
        if m and name == os.path.basename(iter_dir(ckpt_dir, int(m.group(1)))) and \
                not os.path.isfile(os.path.join(ckpt_dir, name, META)):
            out.append(name)
    return sorted(out)


def iteration_path(ckpt_dir: str, iteration: int, *, allow_symlinks: bool = False,
                   tracker: Optional[str] = None) -> str:
    """The directory of committed `iteration`, checked to be a closed tree."""
    path = iter_dir(ckpt_dir, iteration)
    if not os.path.lexists(path) or not os.path.isfile(os.path.join(path, META)):
        where = f"{tracker} names iteration {iteration}, but" if tracker else \
            f"iteration {iteration}:"
        raise CheckpointError(f"{where} {path} is missing or incomplete (no {META})")
    _check_entry(path, allow_symlinks, want_dir=True)
    check_closed_tree(path, allow_symlinks=allow_symlinks)
    return path


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def read_meta(ckpt_dir: str, iteration: Optional[int] = None, *,
              allow_symlinks: bool = False) -> Dict[str, Any]:
    """framework.json of `iteration` (default: the tracker's), checked."""
    it = latest_iteration(ckpt_dir, allow_symlinks=allow_symlinks) if iteration is None \
        else iteration
    if it is None:
        raise CheckpointError(f"{ckpt_dir}: no committed checkpoint (no {TRACKER})")
    return read_iter_meta(iteration_path(ckpt_dir, it, allow_symlinks=allow_symlinks), it,
                          allow_symlinks=allow_symlinks)


def read_iter_meta(path: str, iteration: Optional[int], *,
                   allow_symlinks: bool = False) -> Dict[str, Any]:
    """framework.json inside the iteration directory `path`, checked (the tree too)."""
    check_closed_tree(path, allow_symlinks=allow_symlinks)
    meta_path = os.path.join(path, META)
    _check_entry(meta_path, allow_symlinks, want_dir=False)
    if os.path.getsize(meta_path) > MAX_META_BYTES:
        raise CheckpointError(f"{meta_path} is {os.path.getsize(meta_path)} bytes; ours are a "
                              f"few kB (not a checkpoint written by this framework)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, int-size errors are ValueErrors
        raise CheckpointError(f"{meta_path} is not valid JSON ({_first_line(e)})") from None
    check_meta(meta, meta_path, iteration)
    return meta


def check_meta(meta: Any, where: str, iteration: Optional[int] = None) -> None:
    """The fields of framework.json that readers use: types and ranges, and config.model."""
    def bad(what: str) -> None:
        raise CheckpointError(f"{where}: {what} (a damaged or foreign {META})")

    if not isinstance(meta, dict):
        bad(f"holds a JSON {type(meta).__name__}, not an object")
    if not _is_int(meta.get("iteration")):
        bad(f"'iteration' is {meta.get('iteration')!r}, not a non-negative integer")
    if iteration is not None and meta["iteration"] != iteration:
        bad(f"'iteration' is {meta['iteration']} but the directory is iteration {iteration}")
    for key in ("consumed_samples", "skipped_iters", "nan_iters"):
        if (key in meta or key == "consumed_samples") and not _is_int(meta.get(key)):
            bad(f"'{key}' is {meta.get(key)!r}, not a non-negative integer")
    layout = meta.get("layout")
    if layout is not None and not (isinstance(layout, dict)
                                   and all(_is_int(v, 1) for v in layout.values())):
        bad(f"'layout' is {layout!r}, not null or an object of positive integers")
    config = meta.get("config")
    if not isinstance(config, dict):
        bad("'config' is missing or not an object")
    for group in ("model", "parallel", "data", "checkpoint", "train", "optimizer", "tokenizer",
                  "logging"):
        if group in config and not isinstance(config[group], dict):
            bad(f"'config.{group}' is not an object")
    if "model" not in config:
        bad("'config.model' is missing")
    parallel = config.get("parallel", {})
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if key in parallel and not _is_int(parallel[key], 1):
            bad(f"'config.parallel.{key}' is {parallel[key]!r}, not a positive integer")
    if not isinstance(parallel.get("distributed_backend", ""), str):
        bad("'config.parallel.distributed_backend' is not a string")
    if not isinstance(config.get("data", {}).get("type", ""), (str, type(None))):
        bad("'config.data.type' is not a string")
    stored_model_config(meta, where)


def recorded_window(meta: Dict[str, Any]) -> Dict[str, Any]:
    """model.sliding_window / sliding_window_layers for a checkpoint whose config.model predates
    them: read from its recorded Hugging Face source (`hf_source.config`, written by
    data_tools.convert hf-to-megatron). Such an import (Mistral v0.1, windowed Qwen) capped
    model.seq_length at the window instead of recording it; it is still the windowed model.
    {} where the fields are stored, or no windowed source is recorded."""
    stored = meta.get("config", {}).get("model")
    source = meta.get("hf_source")
    if (not isinstance(stored, dict) or "sliding_window" in stored
            or not isinstance(source, dict) or not isinstance(source.get("config"), dict)):
        return {}
    from framework.errors import InteropError
    from framework.models.gpt.hf_llama import sliding_window_fields

    try:
        fields = sliding_window_fields(source["config"])
    except InteropError:
        return {}
    return fields if fields.get("sliding_window") else {}


def stored_model_config(meta: Dict[str, Any], where: str = "the checkpoint"):
    """The ModelConfig in framework.json, typed and validated like a config from train.py (with
    `recorded_window` for an import that predates model.sliding_window)."""
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    stored = meta.get("config", {}).get("model")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: {META} has no config.model")
    stored = {**stored, **recorded_window(meta)}
    # a checkpoint saved while this flag was accepted trained without it (megatron-core's layer
    # never read it): load it as what it is, the pre-LN default
    stored.pop("apply_residual_connection_post_layernorm", None)
    known = {f.name for f in fields(ModelConfig)}
    try:
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                               {k: v for k, v in stored.items() if k in known})
        return OmegaConf.to_object(node)
    except (ConfigError, OmegaConfBaseException, TypeError, ValueError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else e
        raise CheckpointError(f"{where}: config.model is not valid "
                              f"({_first_line(cause)})") from None


# --------------------------------------------------------------------------------------------
# the dist checkpoint files (pickles): one gate
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_safe() -> Iterator[None]:
    """Let mcore's torch_dist save/load run on a CPU-only torch build.

    mcore 0.16's dist_checkpointing puts two small status tensors on
    `torch.cuda.current_device()` and calls `torch.cuda.synchronize()` after host copies, which
    raise without CUDA. For the duration of the call those two functions point at the CPU. On a
    machine with CUDA nothing is changed.
    """
    if torch.cuda.is_available():
        yield
        return
    with patched(torch.cuda, synchronize=lambda *a, **k: None, current_device=lambda: "cpu"):
        yield


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    text = lines[0] if lines else ""
    text = f"{type(e).__name__}: {text}" if not isinstance(e, CheckpointError) else text
    return text if len(text) <= limit else text[:limit] + "..."


def _root_cause(e: BaseException) -> BaseException:
    """The exception behind torch DCP's per-rank wrapper (CheckpointException.failures)."""
    for _ in range(10):
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            e = first[0] if isinstance(first, tuple) else first
        elif isinstance(e.__cause__, CheckpointError):
            return e.__cause__
        else:
            return e
    return e


def _check_dist_config(path: str, allow_symlinks: bool) -> None:
    cfg_path = os.path.join(path, DIST_CONFIG)
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{path} is not a megatron-core dist checkpoint (no {DIST_CONFIG})")
    _check_entry(cfg_path, allow_symlinks, want_dir=False)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.loads(f.read(1 << 16))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(cfg, dict) or cfg.get("sharded_backend") != "torch_dist" \
            or cfg.get("common_backend") != "torch":
        shown = {k: cfg.get(k) for k in ("sharded_backend", "common_backend")} \
            if isinstance(cfg, dict) else cfg
        raise CheckpointError(f"{cfg_path}: {shown!r} is not the torch_dist / torch format "
                              f"this framework writes and reads")
    for name in (DCP_METADATA, COMMON):
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            raise CheckpointError(f"{path}: {name} is missing (an incomplete checkpoint)")
        _check_entry(file, allow_symlinks, want_dir=False)


def _read_dcp_metadata(path: str):
    """torch DCP's `.metadata` of the checkpoint at `path`, through the restricted unpickler,
    checked against the files it names (present, regular, long enough)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    with safe_checkpoint_load():
        md = FileSystemReader(path).read_metadata()
    sizes: Dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = info.relative_path
        if rel not in sizes:
            file = os.path.join(path, rel)
            if not os.path.lexists(file):
                raise CheckpointError(f"{file} is missing (named in {DCP_METADATA})")
            sizes[rel] = os.path.getsize(file)
        need = int(info.offset) + int(info.length)
        if sizes[rel] < need:
            raise CheckpointError(f"{os.path.join(path, rel)} is truncated: {sizes[rel]} bytes, "
                                  f"{DCP_METADATA} places data up to byte {need}")
    for key, tmd in md.state_dict_metadata.items():
        if not hasattr(tmd, "chunks"):
            continue  # a byte item
        size, stored = tuple(tmd.size), 0
        for c in tmd.chunks:
            if len(c.offsets) != len(size) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(c.offsets, c.sizes, size)):
                raise CheckpointError(f"{os.path.join(path, DCP_METADATA)}: a stored piece of "
                                      f"{key} lies outside its shape {list(size)}")
            stored += math.prod(c.sizes)
        if stored < math.prod(size):  # pieces never overlap less than the whole
            raise CheckpointError(f"{os.path.join(path, DCP_METADATA)}: {key} is declared "
                                  f"{list(size)} but its stored pieces hold {stored} of "
                                  f"{math.prod(size)} elements")
    return md


def vocab_rows(path: str) -> Optional[int]:
    """The (padded) vocabulary rows of the word embedding stored in the checkpoint at `path`
    (None where it holds no word embedding). megatron-core loads that tensor with
    `allow_shape_mismatch`, zero-filling or cutting rows, so a changed vocabulary must be caught
    before loading."""
    md = _read_dcp_metadata(path)
    for key, tmd in md.state_dict_metadata.items():
        if key.endswith("word_embeddings.weight") and not key.startswith("optimizer") \
                and hasattr(tmd, "size"):
            return int(tmd.size[0])
    return None


def check_shapes(path: str, template: Dict[str, Any], md) -> None:
    """Every tensor the model wants is stored, with the same global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = md.state_dict_metadata
    missing, wrong = [], []
    for v in nested_values(template):
        if not isinstance(v, ShardedTensor) or v.allow_shape_mismatch:
            continue
        have = stored.get(v.key)
        if have is None or not hasattr(have, "size"):
            missing.append(v.key)
        elif tuple(have.size) != tuple(v.global_shape):
            wrong.append(f"{v.key} is {list(have.size)} in the files, "
                         f"{list(v.global_shape)} in the model")
    if wrong or missing:
        parts = wrong[:3] + ([f"{len(missing)} tensors missing, e.g. {missing[0]}"]
                             if missing else [])
        more = f" (+{len(wrong) - 3} more shape mismatches)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{path} does not hold the model (and optimizer) described by "
                              f"its {META} and the config: " + "; ".join(parts) + more)


def read_dist(path: str, op: str, template: Optional[Dict[str, Any]] = None, *,
              allow_symlinks: bool = False) -> Any:
    """Read the dist checkpoint in the iteration directory `path`; the only caller of
    megatron-core's readers. `op`: "load" (into `template`, a sharded state dict),
    "sharded_metadata" (mcore's view: keys, shapes, dtypes), "common" (common.pt) or
    "metadata" (torch DCP's checked `.metadata` index)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from torch.distributed.checkpoint.api import CheckpointException

    readers: Dict[str, Callable[[], Any]] = {
        "load": lambda: dist_checkpointing.load(template, path),
        "sharded_metadata": lambda: load_sharded_metadata(path),
        "common": lambda: dist_checkpointing.load_common_state_dict(path),
    }
    try:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is not a directory")
        check_closed_tree(path, allow_symlinks=allow_symlinks)
        _check_dist_config(path, allow_symlinks)
        md = _read_dcp_metadata(path)
        if op == "metadata":
            return md
        if op == "load":
            check_shapes(path, template, md)
        with cpu_safe(), safe_checkpoint_load(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch DCP's deprecation notes
            out = readers[op]()
        if op == "common" and not isinstance(out, dict):
            raise CheckpointError(f"{os.path.join(path, COMMON)} holds a "
                                  f"{type(out).__name__}, not a state dict")
        return out
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # many kinds on damaged files: one line
        # (torch DCP's CheckpointException is a BaseException wrapping each rank's error)
        cause = _root_cause(e)
        if isinstance(cause, CheckpointError):  # raised by our guard deep inside torch
            msg = str(cause) if path in str(cause) else f"{path}: {cause}"
            raise type(cause)(msg) from None
        if isinstance(cause, OSError) and getattr(cause, "filename", None):
            msg = f"{cause.filename}: {cause.strerror or cause}"
        else:
            msg = _first_line(cause)
        raise CheckpointError(f"{path}: cannot read the checkpoint ({msg})") from e
