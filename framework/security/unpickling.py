"""Checkpoints read without running pickled code, and no paths from checkpoint metadata that leave
their directory.

`safe_checkpoint_load()` wraps megatron-core's `dist_checkpointing.load`. Inside it every
`torch.load` runs with `weights_only=True` (mcore's `common.pt` and torch DCP's byte items, which
torch itself reads with `weights_only=False`), and DCP's `.metadata` file (a plain pickle) is read
by an unpickler that only admits the metadata classes torch writes there. Storage paths named in
`.metadata` must stay inside the checkpoint directory. Damaged files raise `CheckpointError` (one
line) instead of torch's tracebacks. Only `framework.checkpoint.reader.read_dist` enters it: every
checkpoint read goes there.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re

from framework.errors import CheckpointError, ConfigError, UnsafeCheckpointError

# --------------------------------------------------------------------------------------------
# paths from files we read
# --------------------------------------------------------------------------------------------
def safe_relpath(name: str, what: str) -> str:
    """`name` if it is a relative path that stays inside its directory, else ConfigError."""
    s = str(name)
    parts = re.split(r"[\\/]", s)
    if not s or os.path.isabs(s) or s.startswith(("/", "\\")) or ".." in parts or "\x00" in s \
            or re.match(r"^[A-Za-z]:", s):
        raise ConfigError(f"{what}: refusing path {s!r} (absolute or leaving its directory)")
    return s


# --------------------------------------------------------------------------------------------
# checkpoint loading without pickle
# --------------------------------------------------------------------------------------------
# what torch's DCP FileSystemWriter pickles into `.metadata` (torch 2.4 - 2.13)
_DCP_META_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if name in _DCP_META_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint's metadata never "
            f"contains; refusing to unpickle it")


def _restricted_pickle_load(file, **_kw):
    from torch.distributed.checkpoint.metadata import Metadata

    name = getattr(file, "name", None) or "checkpoint .metadata"
    try:
        meta = _MetadataUnpickler(file).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{name}: {e}") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, RecursionError) as e:  # damaged bytes
        raise CheckpointError(f"{name} is not readable DCP metadata, damaged or truncated "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{name} holds a {type(meta).__name__}, not DCP metadata")
    for info in (getattr(meta, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            try:
                safe_relpath(rel, f"{name} storage path")
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
    return meta


class _PickleShim:
    """Stands in for the `pickle` module inside torch's DCP filesystem reader."""

    def __init__(self, real):
        self._real = real

    def load(self, file, **kw):
        return _restricted_pickle_load(file, **kw)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _safe_globals() -> list:
    """Types our checkpoints store besides tensors: numpy's RNG state."""
    import numpy as np

    out = [np.ndarray, np.dtype, np.core.multiarray._reconstruct] if hasattr(np, "core") else []
    try:
        from numpy._core.multiarray import _reconstruct

        out.append(_reconstruct)
    except ImportError:  # numpy < 2
        pass
    for name in ("UInt32DType", "UInt64DType", "Int64DType", "Float64DType", "Float32DType"):
        t = getattr(getattr(np, "dtypes", None), name, None)
        if t is not None:
            out.append(t)
    return out


@contextlib.contextmanager
def safe_checkpoint_load():
    """Within: torch.load is weights_only=True, DCP `.metadata` goes through a restricted
    unpickler. A refused payload raises UnsafeCheckpointError (nothing of it runs)."""
    import torch
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_load = torch.load

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else (
            getattr(f, "name", None) or "a record in a .distcp file")
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            code = next((l for l in lines if "GLOBAL" in l or "Unsupported global" in l), None)
            if code is None:  # not a refused class: damaged bytes
                why = next((l for l in lines if "Unsupported operand" in l),
                           lines[-1] if lines else "")
                raise CheckpointError(f"{name} is damaged or truncated (not a readable torch "
                                      f"file: {why[:200]})") from None
            raise UnsafeCheckpointError(
                f"{name}: refused to load (it holds objects other than tensors and plain "
                f"data, which could run code when unpickled; {code[:200]})") from None
        except (RuntimeError, EOFError, ValueError) as e:  # zip / storage errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{name} cannot be read ({first[:200]})") from None

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe = _safe_globals()
    real_pickle = dcp_fs.pickle
    torch.load = weights_only_load
    dcp_fs.pickle = _PickleShim(real_pickle)
    try:
        with torch.serialization.safe_globals(safe):
            yield
    finally:
        torch.load = real_load
        dcp_fs.pickle = real_pickle
