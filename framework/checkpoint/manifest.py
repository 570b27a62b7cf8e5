"""manifest.json: the size and xxh3_64 checksum of every file of a checkpoint.

* A save writes it inside the staging directory before the commit rename
  (`framework.checkpoint.state.save_checkpoint`): each rank hashes the `.distcp` files it wrote,
  rank 0 gathers the digests, hashes the rest and writes `manifest_document`.
* `verify_checkpoint` checks the files against the checkpoint's `manifest.json` (sizes always,
  xxh3_64 checksums unless `checksums=False`); a mismatch is one line naming the file, the newest
  earlier checkpoint that verifies and how to load it. A checkpoint written before manifests
  existed (no `manifest.json`, no "manifest" key in framework.json) loads unverified.
"""
from __future__ import annotations

import errno
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from framework.checkpoint.reader import (META, _check_entry, _first_line, _is_int,
                                         read_iter_meta)
from framework.errors import CheckpointError

MANIFEST = "manifest.json"  # every file's size and xxh3_64 checksum (written before the commit)
MANIFEST_FORMAT = 1
HASH_NAME = "xxh3_64"
MAX_MANIFEST_BYTES = 64 << 20
# set by the launching process (framework.plan) to the checkpoint whose checksums it verified;
# the workers it launches (they inherit the environment) then check sizes only
VERIFIED_ENV = "FW_VERIFIED_CHECKPOINT"


# --------------------------------------------------------------------------------------------
# manifest.json: sizes and checksums of every file, verified before the files are read
# --------------------------------------------------------------------------------------------
_CHUNK = 8 << 20
_HEX = re.compile(r"[0-9a-f]{16}")
_ITER_NAME = re.compile(r"iter_([0-9]+)")


def file_digest(path: str) -> Tuple[int, str]:
    """(size in bytes, xxh3_64 hex digest) of the file at `path`, read in 8 MiB chunks."""
    import xxhash

    h, size = xxhash.xxh3_64(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def bytes_digest(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_64(data).hexdigest()


def manifest_document(files: Dict[str, Tuple[int, str]]) -> Dict[str, Any]:
    """The JSON object of manifest.json for {relative path: (size, digest)}."""
    return {"format": MANIFEST_FORMAT, "hash": HASH_NAME,
            "files": {rel: {"size": size, "hash": digest}
                      for rel, (size, digest) in sorted(files.items())}}


def read_manifest(path: str, meta: Optional[Dict[str, Any]] = None, *,
                  allow_symlinks: bool = False) -> Optional[Dict[str, Tuple[int, str]]]:
    """{relative path: (size, digest)} from `path`/manifest.json, checked; None for a checkpoint
    written before manifests (no file, and framework.json does not announce one)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.lexists(mpath):
        if meta is not None and meta.get("manifest"):
            raise CheckpointError(f"{mpath} is missing ({META} says the checkpoint has one)")
        return None

    def bad(what: str) -> None:
        raise CheckpointError(f"{mpath} is damaged: {what}")

    _check_entry(mpath, allow_symlinks, want_dir=False)
    if os.path.getsize(mpath) > MAX_MANIFEST_BYTES:
        bad(f"{os.path.getsize(mpath)} bytes")
    try:
        with open(mpath, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:
        bad(f"not valid JSON ({_first_line(e)})")
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        bad("not an object with 'files'")
    if doc.get("format") != MANIFEST_FORMAT or doc.get("hash") != HASH_NAME:
        bad(f"format {doc.get('format')!r} / hash {doc.get('hash')!r}; this version reads "
            f"format {MANIFEST_FORMAT} with {HASH_NAME}")
    files: Dict[str, Tuple[int, str]] = {}
    for rel, entry in doc["files"].items():
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            bad(f"the entry {rel!r} is not a plain path inside the checkpoint")
        if not (isinstance(entry, dict) and _is_int(entry.get("size"))
                and isinstance(entry.get("hash"), str) and _HEX.fullmatch(entry["hash"])):
            bad(f"the entry for {rel!r} is not {{'size': bytes, 'hash': 16 hex digits}}")
        files[rel] = (entry["size"], entry["hash"])
    return files


def _shares(files: Dict[str, Tuple[int, str]], world: int) -> List[List[str]]:
    """The files split over `world` ranks, largest first to the least loaded (deterministic)."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for rel in sorted(files, key=lambda r: (-files[r][0], r)):
        r = loads.index(min(loads))
        out[r].append(rel)
        loads[r] += files[rel][0]
    return out


# files every checkpoint this framework writes has, and the endings of those readers open
CORE_FILES = (".metadata", "common.pt", "framework.json", "metadata.json")
READ_SUFFIXES = (".distcp", ".pt", ".json", ".safetensors", ".bin", ".model")


def manifest_problems(path: str, files: Dict[str, Tuple[int, str]], *, checksums: bool = True,
                      allow_symlinks: bool = False, rank: int = 0, world: int = 1) -> List[str]:
    """What is wrong with the files of the checkpoint at `path` against its manifest: every
    file's presence and size, and (with `checksums`) the digests of this rank's share; the
    files every checkpoint has listed; and no file that a reader would open (one in a
    subdirectory such as tokenizer/, or a top-level checkpoint or JSON file) there unlisted,
    which would be read unchecked (a shard copied in from another iteration with its entry
    removed, a special_tokens_map.json added to the tokenizer). Other files beside them (a
    user's notes) are left alone."""
    problems, sized = [], set()
    for rel in CORE_FILES:
        if rel not in files:
            problems.append(f"{os.path.join(path, MANIFEST)} does not list {rel}, which every "
                            f"checkpoint has")
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if rel != MANIFEST and rel not in files and (
                    "/" in rel or name == ".metadata" or name.endswith(READ_SUFFIXES)):
                problems.append(f"{os.path.join(path, rel)} is not listed in {MANIFEST} (added "
                                f"after the save: a reader would open it unchecked)")
    for rel in sorted(files):
        want = files[rel][0]
        p = os.path.join(path, rel)
        if not os.path.lexists(p):
            problems.append(f"{p} is missing (listed in {MANIFEST})")
            continue
        st = _check_entry(p, allow_symlinks, want_dir=False)
        if st.st_size < want:
            problems.append(f"{p} is truncated: {st.st_size} bytes, {MANIFEST} records {want}")
        elif st.st_size > want:
            problems.append(f"{p} is damaged: {st.st_size} bytes, {MANIFEST} records {want}")
        else:
            sized.add(rel)
    if checksums:
        for rel in _shares(files, world)[rank]:
            if rel not in sized:
                continue
            p = os.path.join(path, rel)
            try:
                _size, digest = file_digest(p)
            except OSError as e:
                problems.append(f"{p} cannot be read ({e.strerror or e})")
                continue
            if digest != files[rel][1]:
                problems.append(f"{p} is damaged: its {HASH_NAME} checksum is {digest}, "
                                f"{MANIFEST} records {files[rel][1]}")
    return problems


def _check_one(path: str, iteration: Optional[int], checksums: bool, allow_symlinks: bool,
               rank: int = 0, world: int = 1,
               meta: Optional[Dict[str, Any]] = None) -> Tuple[List[str], bool]:
    """(problems, has a manifest) of one checkpoint directory."""
    try:
        if meta is None:
            meta = read_iter_meta(path, iteration, allow_symlinks=allow_symlinks)
        files = read_manifest(path, meta, allow_symlinks=allow_symlinks)
        if files is None:
            return [], False
        return manifest_problems(path, files, checksums=checksums, allow_symlinks=allow_symlinks,
                                 rank=rank, world=world), True
    except CheckpointError as e:
        return [str(e)], True
    except OSError as e:
        return [f"{getattr(e, 'filename', None) or path}: {e.strerror or e}"], True


def earlier_good(ckpt_dir: str, before: int, *, checksums: bool = True,
                 allow_symlinks: bool = False) -> Optional[Tuple[int, str, bool]]:
    """(iteration, path, verified) of the newest committed checkpoint in `ckpt_dir` older than
    `before` whose files match its manifest (verified=False: one without a manifest)."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return None
    iters = sorted((int(m.group(1)) for m in map(_ITER_NAME.fullmatch, names) if m),
                   reverse=True)
    for it in iters:
        path = os.path.join(ckpt_dir, f"iter_{it:07d}")
        if it >= before or not os.path.isdir(path):
            continue
        problems, has_manifest = _check_one(path, it, checksums, allow_symlinks)
        if not problems:
            return it, path, has_manifest
    return None


def _dist_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_LEGACY_NOTED: set = set()


def verify_before_launch(path: str, iteration: int, meta: Dict[str, Any], *, verify: bool,
                         allow_symlinks: bool,
                         how_to_load: Optional[Callable[[int, str], str]] = None) -> bool:
    """The plan-time check of train.py and generate.py, one line before any worker starts: a
    self-launch (or one process) checks the checksums here, so its workers check only the sizes;
    under torchrun/SLURM every rank plans, so sizes only here and the ranks share the checksums
    when they load. Returns whether the checksums were checked here."""
    from framework.launch import launched_externally

    full = verify and not launched_externally()
    verify_checkpoint(path, iteration, meta, checksums=full, allow_symlinks=allow_symlinks,
                      how_to_load=how_to_load, search_checksums=verify, collective=False)
    return full


def verify_checkpoint(path: str, iteration: int, meta: Optional[Dict[str, Any]] = None, *,
                      checksums: bool = True, allow_symlinks: bool = False,
                      how_to_load: Optional[Callable[[int, str], str]] = None,
                      search_checksums: Optional[bool] = None, collective: bool = True) -> bool:
    """Check the checkpoint directory `path` (iteration `iteration`) against its manifest.

    Sizes always, checksums unless `checksums=False`. With `collective` and an initialised
    torch.distributed world, every rank calls this: each hashes its share of the bytes, and
    all ranks raise the same error. A mismatch is one CheckpointError line naming the first bad
    file and the newest earlier checkpoint in the same directory that verifies (searched with
    `search_checksums`, default `checksums`), with `how_to_load(iteration, path)`: the option
    that loads it. Returns False (after a one-line note on rank 0) for a checkpoint written
    before manifests, True when verified."""
    rank, world = _dist_world() if collective else (0, 1)
    problems, has_manifest = _check_one(path, iteration, checksums, allow_symlinks, rank, world,
                                        meta)
    if world > 1:
        import torch.distributed as dist

        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (problems, has_manifest))
        problems = sorted({p for ps, _ in gathered for p in ps})
        has_manifest = any(h for _, h in gathered)
    # who speaks: rank 0 of a collective check; of a one-process check under torchrun/SLURM
    # (every rank plans), only the process of global rank 0
    speaks = rank == 0 and (collective or os.environ.get("RANK", "0") == "0")
    if not problems:
        if not has_manifest and speaks and path not in _LEGACY_NOTED \
                and os.environ.get(VERIFIED_ENV) != path:  # the plan has said it
            _LEGACY_NOTED.add(path)
            print(f"note: {path} has no {MANIFEST} (written before checksummed checkpoints); "
                  f"loading it unverified", flush=True)
        return has_manifest
    hint = ""
    if rank == 0:
        ckpt_dir = os.path.dirname(os.path.normpath(path))
        found = earlier_good(ckpt_dir, iteration, allow_symlinks=allow_symlinks,
                             checksums=checksums if search_checksums is None
                             else search_checksums)
        how = how_to_load or (lambda it, p: f"checkpoint.load_iteration={it}")
        if found is None:
            hint = f"no earlier checkpoint in {ckpt_dir} verifies"
        else:
            it, p, verified = found
            what = "verifies" if verified else "has no manifest (written before " \
                "checksummed checkpoints; not verifiable)"
            hint = f"the newest earlier checkpoint that {what} is {p}: load it with " \
                   f"{how(it, p)}"
    if world > 1:
        import torch.distributed as dist

        box = [hint]
        dist.broadcast_object_list(box, src=0)
        hint = box[0]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CheckpointError(f"checkpoint {path} failed verification: {problems[0]}{more}; {hint}")


# --------------------------------------------------------------------------------------------
# writing it (a save)
# --------------------------------------------------------------------------------------------
_OWN_SHARD = re.compile(r"__([0-9]+)_[0-9]+\.distcp")


def hash_own_shards(path: str, rank: int) -> Dict[str, Tuple[int, str]]:
    """{file name: (size, digest)} of the `.distcp` files this rank wrote into `path`."""
    out = {}
    for name in sorted(os.listdir(path)):
        m = _OWN_SHARD.fullmatch(name)
        if m and int(m.group(1)) == rank:
            out[name] = file_digest(os.path.join(path, name))
    return out


def write_manifest(path: str, known: Optional[Dict[str, Tuple[int, str]]] = None) -> int:
    """Write `path`/manifest.json covering every file under `path`; `known` digests (computed
    by the ranks that wrote those files) are used as they are, the rest hashed here. Returns the
    number of bytes covered."""
    known = dict(known or {})
    files: Dict[str, Tuple[int, str]] = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            if rel in known and known[rel][0] == os.path.getsize(full):
                files[rel] = known.pop(rel)
            else:
                files[rel] = file_digest(full)
    if known:  # a rank hashed a file that is not there: the save is not what it wrote
        raise OSError(errno.EIO, f"{len(known)} written files vanished before the commit, "
                                 f"e.g. {sorted(known)[0]}")
    data = json.dumps(manifest_document(files), indent=1).encode()
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return sum(size for size, _ in files.values())


def rewrite_manifest(path: str, changed: str) -> int:
    """Rewrite `path`/manifest.json after the files under `changed` (a directory relative to
    `path`, e.g. "tokenizer") were replaced, before the checkpoint is published: the other files
    keep their recorded digests, those under `changed` are hashed again. Returns the bytes
    covered."""
    old = read_manifest(path) or {}
    keep = {rel: v for rel, v in old.items()
            if rel != changed and not rel.startswith(changed.rstrip("/") + "/")}
    return write_manifest(path, keep)
