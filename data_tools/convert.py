"""Convert checkpoints between Hugging Face and our megatron-core format, or change their layout.

    python -m data_tools.convert hf-to-megatron --load HF_DIR --save CKPT_DIR \\
        [--target-tp N] [--target-pp M] [--target-dtype bf16|fp16|fp32] \\
        [--make-vocab-size-divisible-by K] [--allow-pickle] [--tokenizer NAME_OR_DIR]
    python -m data_tools.convert megatron-to-hf --load CKPT_DIR --save HF_DIR \\
        [--max-shard-size 5GB] [--tokenizer NAME_OR_DIR] [--target-dtype ...]
    python -m data_tools.convert reshape --load CKPT_DIR --save CKPT_DIR \\
        --target-tp N --target-pp M [--with-optimizer] [--make-vocab-size-divisible-by K]

Every command also takes --print-checkpoint-structure (tensor names, shapes and dtypes of the
input, and of the output when --save is given) and --overwrite (with --save). megatron-to-hf and
reshape, which read our checkpoints, take --allow-symlinks and --no-verify; hf-to-megatron
refuses them (an HF directory has no manifest, and its symlinks, as in the hub cache, are
followed). reshape --with-optimizer needs a checkpoint that holds optimizer state.

* hf-to-megatron writes iteration 0 of a checkpoint that `train.py checkpoint.load=CKPT_DIR`
  (and generate.py) load at TP=N, PP=M: the model is built at TP1/PP1 in this one process, the
  HF weights copied in, and the result saved with megatron-core's torch_dist format, which
  reshards at load time. The vocabulary is padded for TP=N (framework.models.padded_vocab_size).
* megatron-to-hf loads a checkpoint of any layout at TP1/PP1 and writes `save_pretrained`'s
  layout: config.json, safetensors weights (sharded with model.safetensors.index.json above
  --max-shard-size), and the tokenizer saved with the checkpoint (or --tokenizer).
* reshape rewrites a checkpoint for TP=N, PP=M: vocabulary padding for TP=N, the layout recorded
  in its config, optimizer state kept with --with-optimizer (else the weights only). Per-rank
  RNG states are dropped.

HF weights are read from safetensors; PyTorch pickles (.bin) are refused unless --allow-pickle
(unpickling can execute code; they are then read with torch.load(weights_only=True)). Outputs
are safetensors only. --save must be empty or absent unless --overwrite; the output is built in
a staging directory beside it and moved into place only when complete. Bad input prints one line
on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict
from typing import Iterator, List, Optional

from data_tools import EXIT_INTERRUPTED, interrupted_line, mark_published, start_run
from framework.locking import hold_if_a_run_lock
from framework.paths import inside, unwritable_dir

EXIT_BAD_INPUT = 2
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class InputError(Exception):
    """Bad command-line input; one line."""


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from data_tools.preprocess import DefaultsHelp

    p = argparse.ArgumentParser(prog="python -m data_tools.convert",
                                description="Convert HF <-> megatron checkpoints, or reshape.",
                                formatter_class=DefaultsHelp)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, ours: bool = True):
        """`ours`: --load is one of our checkpoints. --allow-symlinks and --no-verify are about
        those (closed tree, manifest.json); an HF directory has neither (the hub cache is made
        of symlinks, followed as always), so hf-to-megatron hides them and `run` refuses them."""
        sp.add_argument("--load", required=True, help="input directory")
        sp.add_argument("--save", help="output directory (must be empty unless --overwrite)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --save directory")
        sp.add_argument("--print-checkpoint-structure", action="store_true",
                        help="print tensor names, shapes and dtypes of input (and output)")
        sp.add_argument("--allow-symlinks", action="store_true",
                        help="follow symlinks inside an input checkpoint (refused by default: "
                             "a checkpoint must be a closed tree)" if ours else argparse.SUPPRESS)
        sp.add_argument("--no-verify", dest="verify", action="store_false",
                        help="our checkpoints: check file sizes against manifest.json but not "
                             "the checksums (faster for huge checkpoints; misses bit flips)"
                             if ours else argparse.SUPPRESS)

    h = sub.add_parser("hf-to-megatron", help="HF model directory -> our checkpoint",
                       formatter_class=DefaultsHelp)
    common(h, ours=False)
    h.add_argument("--target-tp", type=int, default=1,
                   help="tensor-parallel size the checkpoint is padded and recorded for (it "
                        "loads at any TP)")
    h.add_argument("--target-pp", type=int, default=1,
                   help="pipeline-parallel size recorded in the checkpoint (it loads at any PP)")
    h.add_argument("--target-dtype", choices=sorted(DTYPES),
                   help="dtype of the saved weights (default: the HF weights' dtype)")
    h.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of lcm(this, --target-tp)")
    h.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin pickles (read with weights_only=True)")
    h.add_argument("--tokenizer", help="tokenizer to save with the checkpoint (default: the "
                                       "one in --load, if any)")

    m = sub.add_parser("megatron-to-hf", help="our checkpoint -> HF save_pretrained layout",
                       formatter_class=DefaultsHelp)
    common(m)
    m.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file before the weights are sharded, e.g. 200MB")
    m.add_argument("--tokenizer", help="tokenizer to write (default: the checkpoint's own)")
    m.add_argument("--target-dtype", choices=sorted(DTYPES),
                   help="dtype of the written weights (default: the checkpoint's dtype)")
    m.add_argument("--hf-model-type",
                   help="HF model_type to write, e.g. mistral (default: the type the checkpoint "
                        "was imported from, else the one family whose shape it has)")

    r = sub.add_parser("reshape", help="our checkpoint -> our checkpoint for another TP/PP",
                       formatter_class=DefaultsHelp)
    common(r)
    r.add_argument("--target-tp", type=int, required=True,
                   help="tensor-parallel size of the output checkpoint")
    r.add_argument("--target-pp", type=int, required=True,
                   help="pipeline-parallel size of the output checkpoint")
    r.add_argument("--with-optimizer", action="store_true",
                   help="keep optimizer and scheduler state (default: weights only)")
    r.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of lcm(this, --target-tp) (default: the "
                        "checkpoint's own)")
    return p


# --------------------------------------------------------------------------------------------
# output directory: staging + publish
# --------------------------------------------------------------------------------------------
def _cannot_write(save: str, why: str) -> InputError:
    return InputError(f"--save={save}: cannot write there ({why})")


def check_save_dir(save: str, load: str, overwrite: bool) -> None:
    """Refuse (before any work) an output that would clobber data or the input, or that cannot
    be written: the output is staged in --save's parent (or its nearest existing ancestor, where
    the parent is made) and then renamed into place, so that directory must take a new one."""
    if not save.strip():
        raise InputError("--save is empty: name the output directory")
    if inside(save, load) or inside(load, save):
        raise InputError(f"--save {save} and --load {load} overlap; choose another --save")
    if os.path.islink(save):  # publishing would replace the link, not fill its target
        raise InputError(f"--save={save} is a symbolic link; name the directory itself "
                         f"({os.path.realpath(save)})")
    if os.path.realpath(save) == os.getcwd():  # a directory in use cannot be renamed away
        raise InputError(f"--save={save} is the current directory; name a new directory, "
                         f"e.g. --save=converted")
    if os.path.exists(save):
        if not os.path.isdir(save):
            raise InputError(f"--save {save} exists and is not a directory")
        if os.listdir(save) and not overwrite:
            raise InputError(f"--save {save} is not empty; pass --overwrite to replace its "
                             f"contents (it was left untouched)")
    problem = unwritable_dir(os.path.dirname(os.path.abspath(save)))
    if problem:
        raise _cannot_write(save, problem)


@contextlib.contextmanager
def staging_dir(save: str) -> Iterator[str]:
    """A fresh directory beside `save`; removed unless `publish` moved it into place."""
    parent = os.path.dirname(os.path.abspath(save)) or "."
    try:  # check_save_dir tried this; name --save, not the staging directory, if it now fails
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save))}.tmp-",
                               dir=parent)
    except OSError as e:
        raise _cannot_write(save, e.strerror or str(e)) from None
    try:
        yield tmp
    except Exception as e:  # noqa: BLE001 (only a full disk is reworded; the rest re-raised)
        full = _disk_full(e, parent)
        if full:
            raise _cannot_write(save, f"{full}; the partial output was removed and --save was "
                                      f"not touched") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(e: BaseException, parent: str) -> Optional[str]:
    """Why writing under `parent` failed, where the disk or quota is full; None otherwise. The
    OSError may sit behind other errors (`checkpoint.state.oserror_in`: the checkpoint writer's,
    torch DCP's); torch.save and safetensors report a full disk as errors of their own, so a
    failure is also read as a full disk when the device has (almost) no space left after it."""
    import errno

    from framework.checkpoint.state import oserror_in

    os_err = oserror_in(e)
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device" if os_err.errno == errno.ENOSPC else \
            "disk quota exceeded"
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return None
    return f"no space left on the device ({free / 2**20:.0f} MiB free)" if free < 64 * 2**20 \
        else None


def publish(tmp: str, save: str) -> None:
    """Move the finished staging directory to `save`, replacing what is there."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(tmp):  # mkdtemp and some writers use owner-only modes
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    old = None
    try:
        if os.path.exists(save):
            old = f"{os.path.abspath(save)}.old-{os.getpid()}"
            os.replace(save, old)
        os.replace(tmp, save)
    except BaseException:  # (an interrupt between the two renames, say) put the old one back
        if old is not None and os.path.exists(old) and not os.path.exists(save):
            os.replace(old, save)
        raise
    mark_published()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# one-process torch.distributed world (dist_checkpointing and model building need one)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from framework.distributed import free_port

    made_pg = made_mp = False
    if not dist.is_initialized():
        port = free_port()
        # the models live on the CPU; with CUDA present, mcore's checkpointing still puts small
        # status tensors on the GPU, which the NCCL half of the backend carries
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        made_pg = True
    elif dist.get_world_size() != 1:
        raise InputError("the converter runs in one process; do not launch it with torchrun")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
        made_mp = True
    torch.manual_seed(0)
    try:
        yield
    finally:
        if made_mp:
            ps.destroy_model_parallel()
        if made_pg:
            dist.destroy_process_group()


def _torch_dtype(name: Optional[str]):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# structure printing
# --------------------------------------------------------------------------------------------
def print_hf_structure(hf_dir: str, allow_pickle: bool) -> None:
    from framework.interop.hf_files import HFWeights, read_hf_config

    cfg = read_hf_config(hf_dir)
    w = HFWeights(hf_dir, allow_pickle=allow_pickle)
    rows = w.describe()
    print(f"== Hugging Face checkpoint {hf_dir} (model_type={cfg.get('model_type')}, "
          f"{w.format}, {len(rows)} tensors)")
    for name, shape, dtype in rows:
        print(f"  {name:70s} {str(list(shape)):22s} {dtype}")


def print_megatron_structure(path: str, allow_symlinks: bool = False,
                             verify: bool = True) -> None:
    from framework.checkpoint.reader import read_dist
    from framework.interop.megatron_files import describe, resolve_checkpoint

    _root, it, iter_path, meta = resolve_checkpoint(path, allow_symlinks=allow_symlinks,
                                                    verify=verify)
    tensors, objects = describe(iter_path, allow_symlinks=allow_symlinks)
    common = read_dist(iter_path, "common", allow_symlinks=allow_symlinks)
    model = meta.get("config", {}).get("model", {})
    print(f"== megatron checkpoint {iter_path} (iteration {it}, consumed_samples "
          f"{meta.get('consumed_samples')}, saved at layout {meta.get('layout')}, model "
          f"{model.get('name')}/{model.get('type')}, {len(tensors)} tensors, "
          f"{len(objects)} objects; common state: {', '.join(sorted(map(str, common)))})")
    for key, shape, dtype in tensors:
        print(f"  {key:70s} {str(list(shape)):22s} {dtype}")
    for key in objects:
        print(f"  {key:70s} (object)")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def _load_tokenizer(path: str):
    from framework.config import TokenizerConfig
    from framework.tokenizer import build_tokenizer

    return build_tokenizer(TokenizerConfig(path=path))


def hf_to_megatron(args) -> None:
    from framework import interop
    from framework.interop.hf_files import HFWeights, has_tokenizer, read_hf_config

    # the cheap refusals first: unsupported type, pickles (before torch / megatron imports)
    hf_cfg = read_hf_config(args.load)
    interop.check_supported(hf_cfg.get("model_type"))
    weights = HFWeights(args.load, allow_pickle=args.allow_pickle)

    import torch

    from framework.checkpoint import save_checkpoint
    from framework.config import MAX_VOCAB_MULTIPLE, Config, ParallelConfig
    from framework.models.build import build_model, padded_vocab_size

    fam = interop.family(hf_cfg.get("model_type"))

    if not 1 <= args.make_vocab_size_divisible_by <= MAX_VOCAB_MULTIPLE:
        raise InputError(f"--make-vocab-size-divisible-by must be in [1, {MAX_VOCAB_MULTIPLE}]")
    model_cfg = interop.with_hf_tensors(fam, interop.hf_config_to_model_config(
        hf_cfg, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by), weights)
    tp, pp = args.target_tp, args.target_pp
    parallel = ParallelConfig(name=f"tp{tp}_pp{pp}", tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp)
    config = Config(model=model_cfg, parallel=parallel)  # validates heads % TP, layers % PP
    tok_path = args.tokenizer or (args.load if has_tokenizer(args.load) else None)
    tokenizer = _load_tokenizer(tok_path) if tok_path else None
    if args.tokenizer and has_tokenizer(args.load):
        _refuse_moved_ids(args.tokenizer, tokenizer, args.load,
                          f"the Hugging Face model's own ({args.load})")
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary is {model_cfg.vocab_size}")
    dtype = _torch_dtype(args.target_dtype) or weights.dtype()
    padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
    if args.save is None:
        return
    with single_process_world():
        # every tensor's shape against config.json on a meta-device model, before the model is
        # built (and initialised) at full size
        interop.check_hf_shapes(weights, fam, model_cfg, padded)
        with staging_dir(args.save) as tmp:
            chunks = build_model(model_cfg, ParallelConfig(), vocab_size=padded, bf16=False,
                                 fp16=False, device=torch.device("cpu"), wrap_ddp=False)
            info = interop.load_hf_into_model(args.load, chunks, model_cfg,
                                              allow_pickle=args.allow_pickle)
            for c in chunks:
                c.to(dtype)
            save_checkpoint(tmp, 0, chunks, None, None, consumed_samples=0,
                            config=asdict(config), tokenizer=tokenizer,
                            extra={"hf_source": {"model_type": fam.HF_MODEL_TYPE,
                                                 "path": os.path.abspath(args.load),
                                                 "format": info["format"], "config": hf_cfg}})
            if tok_path and os.path.isdir(tok_path):  # the HF files as they are (chat template)
                from framework.checkpoint import iter_dir
                from framework.checkpoint.manifest import rewrite_manifest
                from framework.interop.hf_files import copy_tokenizer_files

                if copy_tokenizer_files(tok_path, os.path.join(iter_dir(tmp, 0), "tokenizer")):
                    # the manifest must cover the copied files, not those tokenizer.save wrote
                    rewrite_manifest(iter_dir(tmp, 0), "tokenizer")
            publish(tmp, args.save)
    print(f"wrote {args.save}: {fam.HF_MODEL_TYPE} -> model.type={model_cfg.type}, "
          f"{info['tensors']} tensors, {_dtype_name(dtype)}, vocab {model_cfg.vocab_size} "
          f"padded to {padded} for TP={tp} (make_vocab_size_divisible_by="
          f"{model_cfg.make_vocab_size_divisible_by}), layout TP={tp} PP={pp}"
          f"{'' if tokenizer else ', no tokenizer'}")


def _export_vocab_size(model_cfg, tokenizer) -> int:
    if model_cfg.vocab_size is not None:
        return model_cfg.vocab_size
    if tokenizer is not None:
        return tokenizer.vocab_size
    raise InputError("the checkpoint's config has no model.vocab_size and it has no saved "
                     "tokenizer; pass --tokenizer to give the vocabulary")


def _check_export_tokenizer(name: str, tokenizer, model_cfg, saved_tok: str,
                            padded: int) -> None:
    """--tokenizer fits the checkpoint's vocabulary (before any model is built): not more
    tokens than model.vocab_size (its ids would have no trained row), the size of the
    checkpoint's own tokenizer when the vocabulary is the tokenizer's, within the stored rows."""
    n = tokenizer.vocab_size
    if model_cfg.vocab_size is not None and n > model_cfg.vocab_size:
        raise InputError(f"--tokenizer {name} has {n} tokens but the checkpoint's vocabulary "
                         f"is {model_cfg.vocab_size} (model.vocab_size)")
    if model_cfg.vocab_size is None and os.path.isdir(saved_tok):
        own = _load_tokenizer(saved_tok).vocab_size
        if n != own:
            raise InputError(f"--tokenizer {name} has {n} tokens but the checkpoint was "
                             f"trained with a tokenizer of {own} (its tokenizer/); leave "
                             f"--tokenizer out to export that one")
    if n > padded:
        raise InputError(f"--tokenizer {name} has {n} tokens but the checkpoint's vocabulary "
                         f"tensors have {padded} rows")
    if os.path.isdir(saved_tok):
        _refuse_moved_ids(name, tokenizer, saved_tok, "the checkpoint's own (its tokenizer/)")


def _refuse_moved_ids(name: str, tokenizer, own_dir: str, own_name: str) -> None:
    """--tokenizer must give the tokens the model was trained on the ids it trained them with:
    one that moves them (a permuted vocabulary of the same size) writes a model that reads and
    writes other text. A vocabulary that only adds tokens passes (the size checks bound it)."""
    from framework.tokenizer import vocab_difference

    try:
        moved = vocab_difference(tokenizer, _load_tokenizer(own_dir), moved_only=True)
    except Exception:  # noqa: BLE001 (a tokenizer without a vocabulary to compare)
        return
    if moved is not None:
        raise InputError(f"--tokenizer {name} gives the model's tokens other ids than "
                         f"{own_name}: {moved.replace('in the checkpoint', 'there')}; leave "
                         f"--tokenizer out to use that one")


def megatron_to_hf(args) -> None:
    import torch

    from framework import interop
    from framework.checkpoint import load_checkpoint, stored_model_config
    from framework.config import ParallelConfig
    from framework.interop.hf_files import parse_size
    from framework.interop.megatron_files import describe, resolve_checkpoint
    from framework.models.build import build_model
    from framework.models.wrappers import unwrap

    max_shard = parse_size(args.max_shard_size)
    links = args.allow_symlinks
    root, it, iter_path, meta = resolve_checkpoint(args.load, allow_symlinks=links,
                                                   verify=args.verify)
    model_cfg = stored_model_config(meta, iter_path)
    source = meta.get("hf_source") or {}
    fam = interop.family_for_model(model_cfg, args.hf_model_type or source.get("model_type"))
    if args.hf_model_type and args.hf_model_type != source.get("model_type"):
        source = {}  # the recorded HF config belongs to another model type
    saved_tok = os.path.join(iter_path, "tokenizer")
    tok_path = args.tokenizer or (saved_tok if os.path.isdir(saved_tok) else None)
    tokenizer = _load_tokenizer(tok_path) if tok_path else None
    vocab = _export_vocab_size(model_cfg, tokenizer)
    names = interop.vocab_tensor_names(model_cfg)
    stored = {key: (shape, dt)
              for key, shape, dt in describe(iter_path, allow_symlinks=links)[0]}
    found = [n for n in names if n in stored]
    if not found:
        raise InputError(f"{iter_path}: no vocabulary tensor ({', '.join(names)}) stored")
    padded, stored_dtype = stored[found[0]][0][0], getattr(torch, stored[found[0]][1])
    if args.tokenizer:
        _check_export_tokenizer(args.tokenizer, tokenizer, model_cfg, saved_tok, padded)
    dtype = _torch_dtype(args.target_dtype) or stored_dtype
    hf_cfg = fam.model_config_to_hf_config(model_cfg, vocab_size=vocab,
                                           base=source.get("config"))
    hf_cfg["dtype"] = _dtype_name(dtype)
    if not source.get("config") and tokenizer is not None:
        hf_cfg["bos_token_id"], hf_cfg["eos_token_id"] = tokenizer.bos, tokenizer.eod
        if tokenizer.pad != tokenizer.eod:
            hf_cfg["pad_token_id"] = tokenizer.pad
    if args.save is None:
        return
    with staging_dir(args.save) as tmp, single_process_world():
        chunks = build_model(model_cfg, ParallelConfig(), vocab_size=padded, bf16=False,
                             fp16=False, device=torch.device("cpu"), wrap_ddp=False)
        load_checkpoint(root, chunks, None, None, model_cfg=model_cfg, iteration=it,
                        with_optimizer=False, allow_symlinks=links,
                        verify=None)  # resolve_checkpoint verified the files
        state = unwrap(chunks[0]).state_dict()
        tensors = interop.hf_state_dict_from_megatron(state, model_cfg, vocab_size=vocab,
                                                      dtype=dtype,
                                                      hf_model_type=fam.HF_MODEL_TYPE)
        files = interop.save_hf_checkpoint(tmp, tensors, hf_cfg, max_shard_size=max_shard)
        if args.tokenizer:
            tokenizer.save(tmp)
        elif tok_path:
            for name in sorted(os.listdir(tok_path)):
                if os.path.isfile(os.path.join(tok_path, name)):
                    shutil.copy2(os.path.join(tok_path, name), os.path.join(tmp, name))
        publish(tmp, args.save)
    print(f"wrote {args.save}: {fam.HF_MODEL_TYPE} ({fam.HF_ARCHITECTURE}), {len(tensors)} "
          f"tensors in {len([f for f in files if f.endswith('.safetensors')])} safetensors "
          f"file(s), {_dtype_name(dtype)}, vocab {vocab} (padding {padded - vocab} rows "
          f"stripped){'' if tok_path else ', no tokenizer (none saved; pass --tokenizer)'}")


MODEL_SPACE_OPTIMIZER_FORMATS = (None, "fully_sharded_model_space", "fully_reshardable")


def _check_optimizer_state(iter_path: str, stored_keys: List[str], links: bool) -> None:
    """--with-optimizer: the checkpoint holds optimizer state (its common state, or optimizer.*
    tensors / objects; a checkpoint saved before the first step has the first only), in a format
    that reshards. Before anything is written."""
    from framework.checkpoint.reader import read_dist

    common = read_dist(iter_path, "common", allow_symlinks=links)
    opt = common.get("optimizer") if isinstance(common, dict) else None
    if opt is None and not any(k.startswith("optimizer.") for k in stored_keys):
        raise InputError(f"--with-optimizer: {iter_path} holds no optimizer state (a checkpoint "
                         f"written by hf-to-megatron, or by a reshape without --with-optimizer, "
                         f"has the weights only); reshape without --with-optimizer")
    opt_format = opt.get("param_state_sharding_type") if isinstance(opt, dict) else None
    if opt_format not in MODEL_SPACE_OPTIMIZER_FORMATS:
        raise InputError(f"{iter_path}: distributed-optimizer state in the "
                         f"{opt_format!r} format is bound to its layout; save it with "
                         f"distrib_optim_sharding_type=fully_sharded_model_space, or "
                         f"reshape without --with-optimizer")


def reshape(args) -> None:
    from framework import interop
    from framework.checkpoint import package_versions, stored_model_config
    from framework.config import Config, ParallelConfig
    from framework.interop.megatron_files import (check_model_shapes, describe, is_vocab_key,
                                                  load_full, resize_vocab_rows,
                                                  resolve_checkpoint, write_checkpoint)
    from framework.models.build import padded_vocab_size

    links = args.allow_symlinks
    _root, it, iter_path, meta = resolve_checkpoint(args.load, allow_symlinks=links,
                                                    verify=args.verify)
    model_cfg = stored_model_config(meta, iter_path)
    if args.make_vocab_size_divisible_by is not None:
        from framework.config import MAX_VOCAB_MULTIPLE

        if not 1 <= args.make_vocab_size_divisible_by <= MAX_VOCAB_MULTIPLE:
            raise InputError(f"--make-vocab-size-divisible-by must be in "
                             f"[1, {MAX_VOCAB_MULTIPLE}]")
        from dataclasses import replace

        model_cfg = replace(model_cfg,
                            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    tp, pp = args.target_tp, args.target_pp
    stored = meta.get("config", {})
    parallel = ParallelConfig(name=f"tp{tp}_pp{pp}", tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp)
    Config(model=model_cfg, parallel=parallel)  # validates the target layout for this model
    saved_tok = os.path.join(iter_path, "tokenizer")
    vocab = model_cfg.vocab_size
    if vocab is None:
        if not os.path.isdir(saved_tok):
            raise InputError(f"{iter_path}: config has no model.vocab_size and no tokenizer "
                             f"is saved; cannot tell real rows from padding")
        vocab = _load_tokenizer(saved_tok).vocab_size
    names = interop.vocab_tensor_names(model_cfg)
    padded = padded_vocab_size(vocab, model_cfg.make_vocab_size_divisible_by, tp)
    stored_tensors, stored_objects = describe(iter_path, allow_symlinks=links)
    stored_rows = {key: shape[0] for key, shape, _dt in stored_tensors}
    found = [n for n in names if n in stored_rows]
    if not found:
        raise InputError(f"{iter_path}: no vocabulary tensor ({', '.join(names)}) stored")
    if args.with_optimizer:
        _check_optimizer_state(iter_path, [k for k, _s, _d in stored_tensors] + stored_objects,
                               links)
    if args.save is None:
        return
    with staging_dir(args.save) as tmp, single_process_world():
        # framework.json must describe the stored tensors, or the output would not load
        check_model_shapes(iter_path, model_cfg, stored_rows[found[0]], allow_symlinks=links)
        common, tensors, objects = load_full(iter_path, allow_symlinks=links)
        if not args.with_optimizer:
            common = {k: v for k, v in common.items() if k not in ("optimizer", "scheduler")}
            tensors = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
            objects = {k: v for k, v in objects.items() if not v[0].key.startswith("optimizer.")}
        resized = []
        for key in list(tensors):
            if is_vocab_key(key, names) and tensors[key].shape[0] != padded:
                resized.append(f"{key} {tensors[key].shape[0]}->{padded}")
                tensors[key] = resize_vocab_rows(tensors[key], padded, vocab, key)
        config = dict(stored)
        config["model"] = asdict(model_cfg)
        config["parallel"] = {**stored.get("parallel", {}), **asdict(parallel)}
        new_meta = {k: v for k, v in meta.items() if k not in ("layout", "config", "versions")}
        new_meta.update(config=config, versions=package_versions(), layout=None,
                        reshaped_from=meta.get("layout"),
                        with_optimizer=bool(args.with_optimizer))
        write_checkpoint(tmp, it, common, tensors, objects, new_meta,
                         tokenizer_dir=saved_tok if os.path.isdir(saved_tok) else None)
        publish(tmp, args.save)
    print(f"wrote {args.save}: iteration {it} for TP={tp} PP={pp}, {len(tensors)} tensors"
          f"{' with optimizer state' if args.with_optimizer else ' (weights only)'}; vocab "
          f"{vocab} padded to {padded}" + (f" ({len(resized)} tensors resized)" if resized
                                           else ""))


COMMANDS = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf,
            "reshape": reshape}


# options about what is read (the rest describe the output, which needs --save)
INPUT_OPTIONS = ("command", "load", "print_checkpoint_structure", "allow_symlinks", "verify",
                 "allow_pickle")


def run(args) -> None:
    if args.save is None and not args.print_checkpoint_structure:
        raise InputError("--save is required (or pass --print-checkpoint-structure alone to "
                         "inspect --load)")
    if args.save is None:  # inspecting --load: every option about the output is without effect
        # (a required option, reshape's --target-tp/--target-pp, is given whatever the intent)
        sub = next(a for a in build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        defaults = {a.dest: a.default for a in sub._actions if not a.required}
        unused = [key for key, value in vars(args).items()
                  if key in defaults and key not in INPUT_OPTIONS and value != defaults[key]]
        if unused:
            names = ", ".join("--" + key.replace("_", "-") for key in sorted(unused))
            raise InputError(f"{names} {'describes' if len(unused) == 1 else 'describe'} the "
                             f"output, and --save is not given (inspecting --load writes "
                             f"nothing); drop {'it' if len(unused) == 1 else 'them'} or give "
                             f"--save")
    if args.command == "hf-to-megatron":
        for given, option in ((args.allow_symlinks, "--allow-symlinks"),
                              (not args.verify, "--no-verify")):
            if given:
                raise InputError(f"{option} is for our checkpoints (megatron-to-hf, reshape); "
                                 f"hf-to-megatron reads a Hugging Face directory, which has no "
                                 f"manifest to verify and whose symlinks are always followed")
    if not os.path.isdir(args.load):
        raise InputError(f"--load {args.load} is not a directory")
    if args.command == "hf-to-megatron" and args.allow_pickle:
        from framework.interop.hf_files import SAFE_INDEX, SAFE_SINGLE

        safe = [n for n in (SAFE_INDEX, SAFE_SINGLE) if os.path.isfile(os.path.join(args.load, n))]
        if safe:
            raise InputError(f"--allow-pickle has no effect: --load {args.load} has safetensors "
                             f"weights ({safe[0]}), which are read instead of any pickle; drop it")
    for option in ("target_tp", "target_pp"):
        value = getattr(args, option, 1)
        if value < 1:
            raise InputError(f"--{option.replace('_', '-')} {value} must be >= 1")
    if args.save is not None:
        check_save_dir(args.save, args.load, args.overwrite)
    hf_input = args.command == "hf-to-megatron"
    if args.print_checkpoint_structure:
        if hf_input:
            print_hf_structure(args.load, args.allow_pickle)
        else:
            print_megatron_structure(args.load, args.allow_symlinks, args.verify)
    # a training run saving into --save holds its run lock: refused; else held until the end,
    # so that no run starts saving there while the conversion replaces it
    release = hold_if_a_run_lock(args.save) \
        if args.save is not None and os.path.isdir(args.save) else None
    try:
        COMMANDS[args.command](args)
    finally:
        if release is not None:
            release()
    if args.print_checkpoint_structure and args.save is not None:
        if args.command == "megatron-to-hf":
            print_hf_structure(args.save, False)
        else:
            print_megatron_structure(args.save)


def _quiet() -> None:
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers loads


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from framework.config import ConfigError

    _quiet()
    start_run()
    try:
        run(args)
    except KeyboardInterrupt as stop:
        print(interrupted_line(stop), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr,
              flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
