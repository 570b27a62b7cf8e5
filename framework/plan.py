"""The plan of a training run: what is decided once, in the launching process, before any worker
starts, and handed to every worker (`RunPlan`): the device and precision, the world size, where
the weights come from (resume, `checkpoint.load` or `checkpoint.load_hf`), the tokenizer and the
vocabulary. `make_plan` also runs every check that needs no worker (framework/preflight.py), so
bad input is one line from the parent and nothing is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from framework.checkpoint.manifest import VERIFIED_ENV, verify_before_launch
from framework.checkpoint.reader import iter_dir, read_meta
from framework.checkpoint.state import check_compatible, load_target
from framework.config import Config
from framework.errors import ConfigError
from framework.fast import cudnn_attention
from framework.fast.fp8 import cast_tiles, device_supports_fp8
from framework.launch import launched_externally, resolve_device
from framework.launch_env import env_rank
from framework.models.build import padded_vocab_size
from framework.models.registry import family
from framework.preflight import check_inputs
from framework.tokenizer import TokenizerSource, choose_tokenizer, vocab_difference


@dataclass
class RunPlan:
    """A training run's decisions, made once (`make_plan`); pickled to self-launched workers."""

    cfg: Config
    device: str  # "cuda" | "cpu"
    world_size: int
    bf16: bool
    resume_iteration: Optional[int]  # the committed iteration of checkpoint.dir resumed, if any
    load_dir: Optional[str]  # where the weights come from: checkpoint.dir (resume) or .load
    load_iteration: Optional[int]  # the committed iteration of load_dir loaded (if load_dir)
    load_hf: Optional[str]  # a Hugging Face model to initialise from (not when resuming)
    tokenizer: TokenizerSource
    vocab_size: int  # model.vocab_size or the tokenizer's
    padded_vocab_size: int

    @property
    def resuming(self) -> bool:
        return self.resume_iteration is not None


def planned_world_size(cfg: Config, device: str) -> int:
    """World size for a self-launch: every visible GPU (or TP x PP x DP if DP is fixed)."""
    if launched_externally():
        return int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"])
    mp = cfg.parallel.model_parallel_size
    if cfg.parallel.data_parallel_size is not None:
        return mp * cfg.parallel.data_parallel_size
    if device == "cuda":
        n = torch.cuda.device_count()
        return (n // mp) * mp if n >= mp else mp
    return mp


def _resume_global_batch(cfg: Config, meta) -> None:
    """A resumed run with train.global_batch_size null keeps the checkpoint's global batch
    where this layout can take it (a multiple of micro-batch x DP), so a restart on another
    number of GPUs continues the same run; the runner notes any other change."""
    stored = meta.get("config", {}).get("train", {}).get("global_batch_size")
    t, dp = cfg.train, cfg.parallel.data_parallel_size
    if isinstance(stored, int) and stored != t.global_batch_size \
            and stored % (t.micro_batch_size * dp) == 0:
        t.global_batch_size = stored
        cfg._check_batch(dp)


def _check_resumed_optimizer(cfg: Config, meta, path: str, allow_symlinks: bool) -> None:
    """A resume restores the checkpoint's scheduler state (its learning-rate schedule and weight
    decay) and optimizer state (its param groups' betas, eps, momentum): settings that differ
    from the checkpoint's would be silently replaced by its values. Refused in one line, unless
    optimizer.override_on_resume applies them (not across optimizer types). Only what the
    checkpoint stores is compared: a converted checkpoint without optimizer or scheduler state
    (data_tools.convert) resumes with this config's values. optimizer.lr_decay_steps is
    compared only when given: null keeps the checkpoint's decay (the runner notes it)."""
    from framework.checkpoint.reader import read_dist
    from framework.config import (RESUMED_OPTIMIZER_FIELDS, SCHEDULED_OPTIMIZER_FIELDS,
                                  UNREAD_BY_OPTIMIZER)

    stored = meta.get("config", {}).get("optimizer")
    if not isinstance(stored, dict):
        return
    o = cfg.optimizer
    has_scheduler = read_dist(path, "common", allow_symlinks=allow_symlinks).get(
        "scheduler") is not None
    has_state = any(k.startswith("optimizer") for k in read_dist(
        path, "metadata", allow_symlinks=allow_symlinks).state_dict_metadata)
    if not (has_scheduler or has_state):
        return
    if has_state and stored.get("optimizer") not in (None, o.optimizer):
        raise ConfigError(f"{path} was trained with optimizer.optimizer={stored['optimizer']} "
                          f"and its optimizer state cannot resume optimizer.optimizer="
                          f"{o.optimizer}: start a new run from its weights (checkpoint.load="
                          f"<dir> with another checkpoint.dir)")
    stored_decay = stored.get("lr_decay_steps") or meta.get("config", {}).get(
        "train", {}).get("max_steps")
    diffs = []
    for f in RESUMED_OPTIMIZER_FIELDS:
        scheduled = f in SCHEDULED_OPTIMIZER_FIELDS
        if f == "optimizer" or f in UNREAD_BY_OPTIMIZER[o.optimizer] or \
                not (has_scheduler if scheduled else has_state):
            continue
        ours, theirs = getattr(o, f), stored.get(f)
        if f == "lr_decay_steps":
            if ours is not None and stored_decay is not None and ours != stored_decay:
                diffs.append((f, stored_decay, ours))
        elif theirs is not None and theirs != ours:
            diffs.append((f, theirs, ours))
    if diffs and not o.override_on_resume:
        shown = "; ".join(f"optimizer.{f}: checkpoint={a!r} config={b!r}" for f, a, b in diffs)
        back = " ".join(f"optimizer.{f}={a!r}" for f, a, _b in diffs)
        raise ConfigError(
            f"{path} holds optimizer and scheduler state with other settings, which a resume "
            f"would keep instead of this config's ({shown}): resume with the checkpoint's values "
            f"({back}), set optimizer.override_on_resume=true to continue with the new ones, or "
            f"start a new run from its weights (checkpoint.load=<dir> with another "
            f"checkpoint.dir)")


def _check_resumed_tokenizer(tokenizer, path: str, cfg: Config) -> None:
    """A resume with tokenizer.path (or vocab/merge files) must give the tokens the ids the
    checkpoint's own tokenizer gave them: the embedding rows are the checkpoint's, and the saves
    of this run would store the new tokenizer beside them."""
    from dataclasses import replace

    from framework.tokenizer import build_tokenizer

    saved = os.path.join(path, "tokenizer")
    if not os.path.isdir(saved):
        return
    try:
        theirs = build_tokenizer(replace(cfg.tokenizer, path=None, vocab_file=None,
                                         merge_file=None), default_dir=saved)
        what = vocab_difference(tokenizer, theirs)
    except Exception as e:  # noqa: BLE001 (a tokenizer class this machine cannot load)
        if env_rank() == 0:
            print(f"note: the checkpoint's tokenizer ({saved}) cannot be read here "
                  f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}), "
                  f"so tokenizer.path is not compared with it", flush=True)
        return
    if what is None:
        return
    given = cfg.tokenizer.path or cfg.tokenizer.vocab_file
    raise ConfigError(f"tokenizer {given} is not the tokenizer of the checkpoint this run resumes "
                      f"({saved}): {what}; resume without tokenizer.path (the checkpoint's is "
                      f"used), or start a new checkpoint.dir")


def _check_vocab_rows(cfg: Config, path: str, vocab: int, padded: int, resuming: bool) -> None:
    """The checkpoint's word embedding must have the rows this config gives it. megatron-core
    loads it with `allow_shape_mismatch`: rows it lacks come back as zeros (their logits, 0,
    enter every softmax) and rows it has beyond the model are cut. A resume is refused;
    `checkpoint.load` (new weights for another vocabulary, e.g. an extended tokenizer) says so."""
    from framework.checkpoint.reader import vocab_rows

    rows = vocab_rows(path)
    if rows is None or rows == padded:
        return
    m = cfg.model
    what = (f"{path} has {rows} vocabulary rows and this config {padded} ({vocab} tokens from "
            f"{'model.vocab_size' if m.vocab_size else 'the tokenizer'}, padded to a multiple of "
            f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} and the TP size)")
    how = "zero-filled" if padded > rows else "cut"
    if resuming:
        raise ConfigError(f"{what}: resuming would load it with {abs(padded - rows)} rows {how}; "
                          f"keep the checkpoint's tokenizer, model.vocab_size and "
                          f"model.make_vocab_size_divisible_by (data_tools.convert reshape changes "
                          f"a checkpoint's layout)")
    if env_rank() == 0:
        print(f"note: {what}: checkpoint.load gives the embedding and output layer "
              f"{abs(padded - rows)} {how} rows", flush=True)


def make_plan(cfg: Config) -> RunPlan:
    """Every decision and check that needs no worker (the world, the device, checkpoints,
    tokenizer, data files, model settings, output directories). Nothing is built."""
    device = resolve_device(cfg.train.device)
    world = planned_world_size(cfg, device)
    auto_batch = cfg.train.global_batch_size is None  # null: micro-batch x DP (resolve_world)
    cfg.resolve_world(world, on_gpu=device == "cuda")
    if device == "cuda" and not launched_externally() and world > torch.cuda.device_count():
        raise ConfigError(f"the layout needs {world} GPUs (TP x PP x DP) but "
                          f"{torch.cuda.device_count()} are visible")
    _check_device_features(cfg, device)
    c = cfg.checkpoint
    links = c.allow_symlinks
    # a bad tracker, a damaged framework.json or a symlink in the checkpoint is an error here
    load_dir, load_it, resuming = load_target(c)
    resume_it = load_it if resuming else None
    if load_dir:
        meta = read_meta(load_dir, load_it, allow_symlinks=links)
        check_compatible(meta, cfg.model, iter_dir(load_dir, load_it))
        if resuming and auto_batch:
            _resume_global_batch(cfg, meta)
        path = iter_dir(load_dir, load_it)
        if verify_before_launch(path, load_it, meta, verify=c.verify, allow_symlinks=links):
            os.environ[VERIFIED_ENV] = path
        if resuming:  # (reads common.pt and the index: after the files are verified)
            _check_resumed_optimizer(cfg, meta, path, links)
    load_hf = c.load_hf if resume_it is None else None
    if load_hf:  # the directory, its files and the architecture, before any worker starts
        from framework.interop import check_hf_source

        check_hf_source(load_hf, cfg.model, allow_pickle=c.allow_pickle)
    parts = family(cfg.model.type).parts()
    load_path = iter_dir(load_dir, load_it) if load_dir else None
    source = choose_tokenizer(
        cfg.tokenizer, checkpoint_iter_dir=load_path,
        hf_dir=load_hf, embedded=parts.embedded_tokenizer if cfg.data.type != "indexed" else None,
        missing="data=indexed needs a tokenizer: set tokenizer.path or tokenizer.vocab_file + "
                "tokenizer.merge_file")
    tokenizer = source.load()
    if resuming and source.saved_dir is None and source.embedded is None:
        _check_resumed_tokenizer(tokenizer, load_path, cfg)
    check_inputs(cfg, tokenizer, device)  # tokenizer, model, data, directories: one line each
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    if load_path:
        _check_vocab_rows(cfg, load_path, vocab, padded, resuming)
    bf16 = (device == "cuda" if cfg.train.bf16 is None else cfg.train.bf16) \
        and not cfg.train.fp16
    return RunPlan(cfg=cfg, device=device, world_size=world, bf16=bf16,
                   resume_iteration=resume_it, load_dir=load_dir, load_iteration=load_it,
                   load_hf=load_hf,
                   tokenizer=source, vocab_size=vocab, padded_vocab_size=padded)


def _check_device_features(cfg: Config, device: str) -> None:
    """Options that need something of the device: the cuDNN frontend, FP8 GEMMs."""
    if cfg.model.cudnn_attention:
        if device != "cuda" or not cudnn_attention.available():
            raise ConfigError("model.cudnn_attention=true needs a CUDA device and the cuDNN "
                              "frontend (nvidia-cudnn-frontend, a Linux x86_64 dependency); "
                              "`model.cudnn_attention=null` uses it where it can and works here")
    if cfg.model.alibi_kernel == "cudnn" and device == "cuda" and not cudnn_attention.available():
        raise ConfigError("model.alibi_kernel=cudnn needs the cuDNN frontend "
                          "(nvidia-cudnn-frontend, a Linux x86_64 dependency), which is not "
                          "installed: training would take another kernel; use alibi_kernel=auto")
    # our Triton kernels asked for by name (a CPU run notes that it goes without them)
    asked = [f for f in ("swiglu_kernel", "qkv_rope_fusion") if getattr(cfg.model, f) is True]
    if asked and device == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ConfigError(f"model.{asked[0]}=true needs Triton on the GPU, which is not "
                              f"installed; `model.{asked[0]}=null` uses megatron-core's kernels")
    if cfg.train.fp8:
        try:  # a benchmark's tile setting for the cast kernels (framework/fast/fp8.py)
            cast_tiles()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ok, why = device_supports_fp8() if device == "cuda" else (False, "it runs on the CPU")
        if not ok:
            raise ConfigError(f"train.fp8={cfg.train.fp8} needs a GPU with FP8 GEMMs (compute "
                              f"capability 8.9+: Ada, Hopper or newer), but {why}; unset "
                              f"train.fp8")
