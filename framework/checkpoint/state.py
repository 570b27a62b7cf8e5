"""What a checkpoint holds, and saving / loading it: megatron-core `dist_checkpointing`
(torch_dist) of the model chunks, the optimizer and every rank's RNG, plus `framework.json`.

Layout of `checkpoint.dir`:
    iter_0000100/                   one committed checkpoint (mcore dist checkpoint)
        framework.json              iteration, consumed samples, resolved config, package versions
        tokenizer/                  the tokenizer, so generate.py and resumes need no argument
        manifest.json               every other file's size and xxh3_64 checksum
    latest_checkpointed_iteration.txt   Megatron's tracker name; written last, by rename

A save is written into a staging directory and committed by `framework.checkpoint.commit`
(fsync, rename, then the tracker): a kill at any point leaves the previous checkpoint as the
latest. The manifest (`framework.checkpoint.manifest`) is written inside the staging directory
before the rename, so every committed checkpoint has one: each rank hashes the `.distcp` files
it wrote (`__<rank>_*.distcp`, still in its page cache), rank 0 gathers those digests, hashes
the rest (`.metadata`, `common.pt`, framework.json, the tokenizer) and writes the manifest.
Loading verifies it (`framework.checkpoint.manifest.verify_checkpoint`). A save that fails with
an OSError (a full disk, a quota) removes the staging directory and raises one
CheckpointSaveError line on every rank; the tracker still names the previous checkpoint.
Because the format is mcore's sharded format, a checkpoint loads at any TP/PP/DP layout.
Reading (tracker, framework.json, the dist checkpoint) happens in `framework.checkpoint.reader`,
the one safe path every reader shares.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from framework.checkpoint.commit import commit, stage, staging_dir
from framework.checkpoint.manifest import (MANIFEST, hash_own_shards, verify_checkpoint,
                                           write_manifest)
from framework.checkpoint.reader import (META, TRACKER, committed_iterations, cpu_safe, iter_dir,
                                         iteration_path, latest_iteration, read_dist, read_meta,
                                         recorded_window, stored_model_config,
                                         uncommitted_iteration_names)
from framework.config import ModelConfig
from framework.distributed import rng_state, set_rng_state
from framework.errors import CheckpointError, ConfigError
from framework.models.wrappers import unwrap


class CheckpointSaveError(ConfigError):
    """A save failed (e.g. disk full); reported as one line, the previous checkpoint intact."""


ARCH_FIELDS = ("type", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
               "ffn_hidden_size", "kv_channels", "max_position_embeddings", "normalization",
               "activation", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
               "position_embedding_type", "share_embeddings_and_output_weights",
               "add_binary_head", "encoder_num_layers", "relative_attention_num_buckets",
               "sliding_window", "sliding_window_layers")
# fields a checkpoint written before they existed does not store, with the value it had
ARCH_DEFAULTS = {"qk_layernorm": False, "sliding_window": None, "sliding_window_layers": None}


def _arch_value(model: Dict[str, Any], f: str) -> Any:
    """A field as the built model sees it: null head dim / query groups resolved, q/k/v biases
    on wherever every linear has a bias. (Extra tensors of a checkpoint are skipped by the
    loader, so a field that adds parameters, such as qk_layernorm, must be compared.)"""
    v = model.get(f, ARCH_DEFAULTS.get(f))
    heads = model.get("num_attention_heads")
    if f == "kv_channels" and v is None and heads:
        return model.get("hidden_size", 0) // heads
    if f == "num_query_groups" and v is None:
        return heads
    if f == "add_qkv_bias":
        return bool(v or model.get("add_bias_linear"))
    return v


def check_compatible(meta: Dict[str, Any], model_cfg: ModelConfig, where: str) -> None:
    """Refuse a checkpoint whose architecture differs from the config, listing the fields."""
    raw = {**meta.get("config", {}).get("model", {}), **recorded_window(meta)}
    # the stored fields as typed values (a "4" where 4 belongs compares, not a TypeError),
    # only those it records (an older checkpoint's missing ones take ARCH_DEFAULTS)
    typed = vars(stored_model_config(meta, where))
    stored = {k: typed.get(k, v) for k, v in raw.items()}
    ours = {f: getattr(model_cfg, f) for f in ARCH_FIELDS + ("hidden_size",)}
    diffs = [f"model.{f}: checkpoint={_arch_value(stored, f)!r} config={_arch_value(ours, f)!r}"
             for f in ARCH_FIELDS if (f in stored or f in ARCH_DEFAULTS)
             and _arch_value(stored, f) != _arch_value(ours, f)]
    if diffs:
        raise ConfigError(f"{where} does not match the model config: " + "; ".join(diffs))


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _rank_state(model: List[torch.nn.Module]) -> Dict[str, Any]:
    """What each rank keeps of its own: the RNG states, and with `train.fp8=delayed` its chunks'
    FP8 amax histories (a resumed run then scales like the uninterrupted one; loaded at the same
    layout only, like the RNG; elsewhere the histories start from the first casts again)."""
    state = rng_state()
    hist = [getattr(unwrap(m), "fp8_history", None) for m in model]
    if any(h is not None for h in hist):
        state["fp8_amax"] = [None if h is None else h.state() for h in hist]
    return state


def _load_fp8_histories(model: List[torch.nn.Module], saved: Any) -> None:
    """Restore `_rank_state`'s FP8 amax histories where this run has them (train.fp8=delayed)
    and they fit; a run without them (FP8 off, another recipe) ignores them."""
    if not isinstance(saved, list):
        return
    for i, m in enumerate(model):
        h = getattr(unwrap(m), "fp8_history", None)
        t = saved[i] if i < len(saved) else None
        if h is not None and not h.load(t) and _rank() == 0:
            print(f"note: the checkpoint's FP8 amax histories do not fit model chunk {i} (another "
                  f"model or layout); they start again from the first casts", flush=True)


def sharded_state(model: List[torch.nn.Module], optimizer, with_optimizer: bool,
                  is_loading: bool) -> Dict[str, Any]:
    """The dist-checkpointing state dict of model chunks (and optimizer) and every rank's RNG;
    also the template a load fills (`is_loading`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd: Dict[str, Any] = {}
    for i, m in enumerate(model):
        sd[_model_key(i, len(model))] = unwrap(m).sharded_state_dict()
    if with_optimizer and optimizer is not None:
        # keep chunks apart: virtual-pipeline chunks reuse local key names
        model_sd = {k: sd[k] for k in (_model_key(i, len(model)) for i in range(len(model)))}
        # 'fully_reshardable': the distributed optimizer's state is stored per parameter, so a
        # checkpoint (optimizer included) reloads at any TP/PP/DP layout.
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    pp, tp, dpr = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                   ps.get_data_parallel_rank())
    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    sd["rng_state"] = ShardedObject("rng_state", None if is_loading else _rank_state(model),
                                    shape, (pp, tp, dpr), replica_id=0)
    return sd


_RESULTS_MANAGER: list = []  # the writer-results manager started here (a reference keeps it up)


def _manager_ignores_stop_signals(parent: int) -> None:
    """Initializer of that manager process: ignore the stop signals a whole process group gets
    (the trainer saves a checkpoint on them), and exit once the parent process is gone."""
    import signal
    import threading
    import time

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()


def _signal_safe_writer_results() -> None:
    """mcore's torch_dist writer sends its results through a `multiprocessing` Manager queue
    that it starts on the first save and keeps. A stop signal sent to the whole process group
    (Ctrl-C in a terminal, `timeout`, SLURM's scancel or preemption) also kills that manager
    process, and the emergency save that the signal asks for then fails ("Broken pipe")
    whenever a checkpoint was saved before. So that queue's manager is started here, immune to
    those signals and gone with its parent."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", True) is not None:
        return  # ours is running, mcore's already exists, or this mcore has no such queue
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_manager_ignores_stop_signals, initargs=(os.getpid(),))
    _RESULTS_MANAGER.append(manager)
    fa._results_queue = manager.Queue()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def oserror_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: itself, a cause or context, or inside torch DCP's per-rank
    wrapper (mcore's writer processes send theirs back as the cause of a RuntimeError)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                todo += list(f) if isinstance(f, tuple) else [f]
    # an error that crossed a process boundary as text only: "[Errno 28] No space left ..."
    m = re.search(r"\[Errno (\d+)\] ([^:'\]]+)", str(e))
    return OSError(int(m.group(1)), m.group(2).strip()) if m else None


def _save_error(e: BaseException, final: str, ckpt_dir: str) -> "CheckpointSaveError":
    os_err = oserror_in(e)
    what = (os_err.strerror or str(os_err)) if os_err is not None else _first_line(e)
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        what += f": the disk holding {ckpt_dir} is full; free space there (or set " \
                f"checkpoint.keep_last) and rerun to resume"
    return CheckpointSaveError(f"saving checkpoint {final} failed ({what}); the previous "
                               f"checkpoint in {ckpt_dir} is untouched and still the latest")


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def save_checkpoint(ckpt_dir: str, iteration: int, model, optimizer, scheduler, *,
                    consumed_samples: int, config: Dict[str, Any], tokenizer=None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    from megatron.core import dist_checkpointing

    final = iter_dir(ckpt_dir, iteration)
    tmp = staging_dir(ckpt_dir, iteration)
    rank = _rank()
    if rank == 0:
        try:
            stage(ckpt_dir, iteration)  # (removes what a killed save left behind)
            failed = None
        except OSError as e:
            failed = str(_save_error(e, final, ckpt_dir))
    else:
        failed = None
    failed = _agree(failed)
    if failed:
        raise CheckpointSaveError(failed)
    sd = sharded_state(model, optimizer, with_optimizer=True, is_loading=False)
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sd["iteration"] = iteration
    sd["consumed_samples"] = consumed_samples
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _signal_safe_writer_results()
        with cpu_safe():
            dist_checkpointing.save(sd, tmp)
    # a full disk arrives wrapped: mcore's writer processes send the OSError back as the cause of
    # a RuntimeError, which torch DCP wraps in a CheckpointException (a BaseException)
    except (Exception, CheckpointException) as e:
        if oserror_in(e) is None:
            raise
        # every rank gets the error: torch DCP gathers each rank's write result
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(e, final, ckpt_dir) from None
    _barrier()
    # each rank hashes what it wrote (a failure travels with the digests, so no rank waits)
    try:
        own: Any = hash_own_shards(tmp, rank)
    except OSError as e:
        own = str(_save_error(e, final, ckpt_dir))
    parts = _gather(own)
    failed = None
    if rank == 0:
        try:
            bad = [p for p in parts if isinstance(p, str)]
            if bad:
                raise CheckpointSaveError(bad[0])
            known = {k: v for p in parts for k, v in p.items()}
            meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "config": config, "versions": package_versions(),
                    "layout": current_layout(), "manifest": MANIFEST, **(extra or {})}
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=1, default=str)
            if tokenizer is not None:
                tokenizer.save(os.path.join(tmp, "tokenizer"))
            write_manifest(tmp, known)  # last file inside: it covers all the others
            commit(tmp, ckpt_dir, iteration)
        except (OSError, CheckpointSaveError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failed = str(e) if isinstance(e, CheckpointSaveError) \
                else str(_save_error(e, final, ckpt_dir))
    failed = _agree(failed)
    if failed:
        raise CheckpointSaveError(failed)
    return final


def _gather(obj: Any) -> List[Any]:
    """Every rank's `obj` on rank 0 (others get [])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _agree(failed: Optional[str]) -> Optional[str]:
    """Rank 0's outcome (None, or the one-line error) on every rank; a barrier too."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    box = [failed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _committed_at(ckpt_dir: str, iteration: int) -> float:
    """When `iteration`'s framework.json was written (its commit), or 0."""
    try:
        return os.path.getmtime(os.path.join(iter_dir(ckpt_dir, iteration), META))
    except OSError:
        return 0.0


def load_target(c, allow_symlinks: Optional[bool] = None
                ) -> Tuple[Optional[str], Optional[int], bool]:
    """(directory, iteration, resuming) of the checkpoint a run with checkpoint config `c` loads:
    `c.dir`'s latest when it has one (a resume), else `c.load`'s, else (None, None, False).
    `c.load_iteration` picks another committed iteration of that directory."""
    links = c.allow_symlinks if allow_symlinks is None else allow_symlinks
    if c.dir and os.path.isfile(os.path.join(c.dir, META)):
        parent, name = os.path.split(os.path.normpath(c.dir))
        raise ConfigError(
            f"checkpoint.dir={c.dir} is one committed checkpoint ({name}), not a directory of "
            f"them: a run there would start afresh and save into it; to resume it, give "
            f"checkpoint.dir={parent}, or to start from it, checkpoint.load={parent} "
            f"checkpoint.load_iteration=<its iteration> with a new checkpoint.dir")
    resume_it = latest_iteration(c.dir, allow_symlinks=links)
    # an `iter_N` entry that is not a checkpoint, where a save of this run may land (beyond
    # the resumed iteration): a save of that iteration would replace it without a word
    foreign = [n for n in uncommitted_iteration_names(c.dir) if int(n[5:]) > (resume_it or 0)] \
        if c.save else []
    if foreign:
        raise ConfigError(
            f"checkpoint.dir={c.dir} holds {', '.join(foreign[:3])}"
            f"{' and more' if len(foreign) > 3 else ''}, named as this run's checkpoints are but "
            f"not one of them (no {META}): a save of that iteration would replace it; move it "
            f"out of checkpoint.dir, or give another checkpoint.dir")
    if resume_it is None and c.save:
        have = committed_iterations(c.dir)
        if have:  # the run would start afresh and replace them as it saves
            raise ConfigError(
                f"checkpoint.dir={c.dir} holds committed checkpoints (iterations "
                f"{', '.join(map(str, have[-3:]))}{' and earlier' if len(have) > 3 else ''}) but "
                f"no {TRACKER}, so this run would start afresh and replace them: to resume the "
                f"newest, write {have[-1]} into {os.path.join(c.dir, TRACKER)}; to start "
                f"afresh, give another checkpoint.dir")
    resuming = resume_it is not None
    load_dir = c.dir if resuming else c.load
    want = c.load_iteration
    # committed after the tracker's (what a kill between a commit's rename and its tracker
    # write leaves); a newer-numbered one committed before it is a run's own earlier branch
    # (it went on from checkpoint.load_iteration), whose later saves replace it as documented
    newer = [i for i in committed_iterations(c.dir) if i > resume_it
             and _committed_at(c.dir, i) > _committed_at(c.dir, resume_it)] \
        if resuming and c.save and want is None else []
    if newer:
        tracker = os.path.join(c.dir, TRACKER)
        raise ConfigError(
            f"checkpoint.dir={c.dir}: {tracker} names iteration {resume_it}, but iteration "
            f"{newer[-1]} is committed there too, and this run's saves would replace it: to "
            f"resume from {newer[-1]}, write {newer[-1]} into {tracker}; to go on from "
            f"{resume_it} and replace the newer ones, add checkpoint.load_iteration={resume_it}")
    if not load_dir:
        if want is not None:
            raise ConfigError(f"checkpoint.load_iteration={want}: there is no checkpoint to load "
                              f"(checkpoint.dir has none yet and checkpoint.load is unset)")
        return None, None, False
    it = resume_it if resuming else (
        latest_iteration(load_dir, allow_symlinks=links) if want is None else want)
    if it is None:
        parent, name = os.path.split(os.path.normpath(load_dir))
        m = re.fullmatch(r"iter_([0-9]+)", name)
        hint = f"; for that iteration of {parent}, give checkpoint.load={parent} " \
               f"checkpoint.load_iteration={int(m.group(1))}" \
            if m and int(m.group(1)) in committed_iterations(parent) else ""
        raise ConfigError(f"checkpoint.load={load_dir} has no committed checkpoint "
                          f"(no {load_dir}/{TRACKER}){hint}")
    if want is not None:
        it = want
        where = "checkpoint.dir" if resuming else "checkpoint.load"
        if not os.path.isfile(os.path.join(iter_dir(load_dir, it), META)):
            raise ConfigError(f"checkpoint.load_iteration={it}: {iter_dir(load_dir, it)} is not "
                              f"a committed checkpoint of {where}={load_dir} (no {META})")
        iteration_path(load_dir, it, allow_symlinks=links)
    return load_dir, it, resuming


def load_checkpoint(ckpt_dir: str, model, optimizer, scheduler, *, model_cfg: ModelConfig,
                    iteration: Optional[int] = None, with_optimizer: bool = True,
                    allow_symlinks: bool = False, verify: Optional[bool] = True,
                    how_to_load: Optional[Callable[[int, str], str]] = None) -> Dict[str, Any]:
    """Load model (and optimizer, scheduler, RNG) state. Returns the stored metadata.

    Reads through `framework.checkpoint.reader` (no pickled code runs; a damaged, tampered or
    mismatching checkpoint is one CheckpointError line); symlinks inside the checkpoint are
    refused unless `allow_symlinks`. The files are first checked against the manifest: sizes,
    and checksums unless `verify=False` (`verify=None`: the caller has verified them). Every
    rank calls this (the ranks share the hashing). `how_to_load(iteration, path)` names the
    option that loads another iteration, for the error line (default: train.py's
    checkpoint.load_iteration)."""
    it = latest_iteration(ckpt_dir, allow_symlinks=allow_symlinks) if iteration is None \
        else iteration
    if it is None:
        raise ConfigError(f"checkpoint directory {ckpt_dir} has no committed checkpoint "
                          f"(no {TRACKER})")
    meta = read_meta(ckpt_dir, it, allow_symlinks=allow_symlinks)
    check_compatible(meta, model_cfg, iter_dir(ckpt_dir, it))
    path = iter_dir(ckpt_dir, it)
    if verify is not None:
        verify_checkpoint(path, it, meta, checksums=verify, allow_symlinks=allow_symlinks,
                          how_to_load=how_to_load)
    template = sharded_state(model, optimizer, with_optimizer=with_optimizer, is_loading=True)
    same_layout = meta.get("layout") == current_layout()
    if not same_layout:
        template.pop("rng_state")
    if not with_optimizer:
        template.pop("rng_state", None)
    fresh_optimizer = with_optimizer and optimizer is not None and \
        not _optimizer_state_stored(template, path, allow_symlinks)
    if with_optimizer and optimizer is not None and not fresh_optimizer and \
            _drop_unstored_moments(template["optimizer"], path, allow_symlinks) and _rank() == 0:
        print(f"note: {path} holds no Adam moments (every step before it was skipped, e.g. "
              f"fp16 loss-scale overflows); they start fresh, the rest of the optimizer state "
              f"is loaded", flush=True)
    if fresh_optimizer:
        # saved before the optimizer's first step (train.max_steps=0, or every step skipped):
        # Adam's moments did not exist yet, and a fresh optimizer is exactly that state
        template.pop("optimizer")
        if _rank() == 0:
            print(f"note: {path} holds no optimizer state (saved before the first optimizer "
                  f"step); the optimizer starts fresh", flush=True)
    state = read_dist(path, "load", template, allow_symlinks=allow_symlinks)
    try:
        _apply_state(state, model, optimizer, scheduler, with_optimizer, fresh_optimizer)
    except Exception as e:  # plain data that is not what we stored (a tampered common.pt)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: the stored state does not fit the model and optimizer "
                              f"({type(e).__name__}: {first})") from e
    meta["restored_rng"] = "rng_state" in state
    return meta


def _optimizer_state_stored(template: Dict[str, Any], path: str, allow_symlinks: bool) -> bool:
    """Does the checkpoint hold any of the optimizer tensors the template asks for?"""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    keys = [v.key for v in nested_values(template.get("optimizer") or {})
            if isinstance(v, ShardedTensor)]
    if not keys:
        return True
    stored = read_dist(path, "metadata", allow_symlinks=allow_symlinks).state_dict_metadata
    return any(k in stored for k in keys)


def _drop_unstored_moments(opt_template: Any, path: str, allow_symlinks: bool) -> bool:
    """Empty each per-parameter `state` of `opt_template` (a torch optimizer state dict inside
    megatron-core's sharded optimizer template) when the checkpoint stores none of its tensors.

    A mixed-precision optimizer saves its fp32 main params and loss scaler from the start, but
    Adam's moments only exist after the first optimizer step that was not skipped: an fp16 run
    stopped while the loss scale is still backing off has the first and not the second. Loading
    an empty `state` leaves Adam to create its moments lazily at its first real step, as the
    uninterrupted run did. A `state` with only some of its tensors stored is left as it is (the
    shape check then names what is missing). Returns whether anything was dropped."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = None
    dropped = False

    def walk(d: Any) -> None:
        nonlocal stored, dropped
        if isinstance(d, dict):
            st = d.get("state")
            if "param_groups" in d and isinstance(st, dict) and st:
                keys = [v.key for v in nested_values(st) if isinstance(v, ShardedTensor)]
                if keys:
                    if stored is None:
                        stored = read_dist(path, "metadata",
                                           allow_symlinks=allow_symlinks).state_dict_metadata
                    if not any(k in stored for k in keys):
                        d["state"] = {}
                        dropped = True
                        return
            for v in d.values():
                walk(v)
        elif isinstance(d, (list, tuple)):
            for v in d:
                walk(v)

    walk(opt_template)
    return dropped


def _apply_state(state: Dict[str, Any], model, optimizer, scheduler, with_optimizer: bool,
                 fresh_optimizer: bool = False) -> None:
    for i, m in enumerate(model):
        unwrap(m).load_state_dict(state[_model_key(i, len(model))], strict=True)
    if (not with_optimizer or fresh_optimizer) and optimizer is not None:
        # mixed-precision optimizers copied their fp32 main params from the model when built;
        # without this their first step would write the old (random) weights back
        optimizer.reload_model_params()
    if with_optimizer and optimizer is not None:
        if not fresh_optimizer:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    if "rng_state" in state and state["rng_state"] is not None:
        set_rng_state(state["rng_state"])
        _load_fp8_histories(model, state["rng_state"].get("fp8_amax"))


def current_layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "megatron-core", "hydra-core", "omegaconf", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out

