"""Safe by default: no pickle from files we did not write, `_target_` only at plugin points,
secrets never written to disk, and no paths from checkpoint metadata that leave their directory.

* `safe_checkpoint_load()` wraps megatron-core's `dist_checkpointing.load`. Inside it every
  `torch.load` runs with `weights_only=True` (mcore's `common.pt` and torch DCP's byte items, which
  torch itself reads with `weights_only=False`), and DCP's `.metadata` file (a plain pickle) is read
  by an unpickler that only admits the metadata classes torch writes there. Storage paths named
  in `.metadata` must stay inside the checkpoint directory. Damaged files raise
  `CheckpointError` (one line) instead of torch's tracebacks. Only
  `framework.training.checkpoint_reader.read_dist` enters it: every checkpoint read goes there.
* `check_plugin_targets(cfg)` refuses `_target_` anywhere except the documented plugin points
  (`PLUGIN_POINTS`), and there only for the allowed module prefixes.
* `mask_secrets(obj)` replaces the values of secret-looking keys (`*_token`, `*_key`,
  `*_secret`, `password`, ...) and every occurrence of a secret environment value
  (`WANDB_API_KEY`, `HF_TOKEN`, `*_TOKEN`, `*_KEY`, `*_SECRET`, ...) with `***`.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

MASK = "***"

# --------------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------------
_SECRET_NAME = re.compile(r"(?i)(^|[_.-])(token|key|secret|password|passwd|credentials?|apikey)$")
_MIN_SECRET_LEN = 4  # shorter env values ("1", "on") would mask unrelated text


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def secret_env_values(environ: Optional[Dict[str, str]] = None) -> List[str]:
    """Values of secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def mask_text(text: str, secrets: Optional[Iterable[str]] = None) -> str:
    for s in (secret_env_values() if secrets is None else secrets):
        if s:
            text = text.replace(s, MASK)
    return text


def mask_secrets(obj: Any, secrets: Optional[Iterable[str]] = None) -> Any:
    """A copy of `obj` (dicts, lists, strings) with secrets masked; the input is not changed.

    Secrets are the values of secret-looking keys, the values of secret-looking environment
    variables, and (in `key=value` strings such as Hydra overrides) values of secret-looking keys.
    """
    found = list(secret_env_values() if secrets is None else secrets)
    found += [str(v) for v in _secret_values_in(obj) if len(str(v)) >= _MIN_SECRET_LEN]
    found = sorted(set(found), key=len, reverse=True)
    return _mask(obj, found)


def _secret_values_in(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_name(k) and isinstance(v, (str, int, float)) and v is not None:
                yield v
            else:
                yield from _secret_values_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _secret_values_in(v)
    elif isinstance(obj, str) and "=" in obj:  # an override `a.b_token=value`
        key, _, val = obj.partition("=")
        if is_secret_name(key.strip().lstrip("+~")) and val:
            yield val


def _mask(obj: Any, secrets: List[str]) -> Any:
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_name(k) and v is not None and not isinstance(v, (dict, list))
                    else _mask(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, secrets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_mask(v, secrets) for v in obj)
    if isinstance(obj, str):
        return mask_text(obj, secrets)
    return obj


def mask_config(cfg) -> Any:
    """An OmegaConf config (or container) as a plain container with secrets masked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return mask_secrets(cfg)


def mask_hydra_output(text: str, overrides: Optional[List[str]] = None) -> str:
    """YAML text written by Hydra (config, hydra config, override list) with secrets masked:
    environment secrets, values of secret-looking keys and of secret-looking overrides."""
    secrets = secret_env_values()
    if overrides:
        secrets += [str(v) for v in _secret_values_in(list(overrides))
                    if len(str(v)) >= _MIN_SECRET_LEN]
    secrets = sorted(set(secrets), key=len, reverse=True)
    return _mask_yaml_text(mask_text(text, secrets))


def mask_hydra_dir(hydra_dir: str, overrides: Optional[List[str]] = None) -> None:
    """Rewrite the files Hydra wrote into `<run dir>/.hydra` with secrets masked."""
    if not os.path.isdir(hydra_dir):
        return
    for name in os.listdir(hydra_dir):
        if not name.endswith(".yaml"):
            continue
        path = os.path.join(hydra_dir, name)
        text = open(path, encoding="utf-8").read()
        masked = mask_hydra_output(text, overrides)
        if masked != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(masked)


_YAML_KV = re.compile(r"^(\s*(?:-\s+)?)([^\s:#'\"]+):[ \t]+(\S.*)$")
_YAML_OVERRIDE = re.compile(r"^(\s*-\s+['\"]?)([+~]*[\w.]+)=(.+?)(['\"]?)$")


def _mask_yaml_text(text: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        body, nl = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        m = _YAML_KV.match(body)
        if m and is_secret_name(m.group(2)):
            body = f"{m.group(1)}{m.group(2)}: '{MASK}'"
        else:
            m = _YAML_OVERRIDE.match(body)
            if m and is_secret_name(m.group(2).lstrip("+~")):
                body = f"{m.group(1)}{m.group(2)}={MASK}{m.group(4)}"
        out.append(body + nl)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# plugin points
# --------------------------------------------------------------------------------------------
# config paths where `_target_` is allowed (a class is instantiated from it), and the module
# prefixes it may name there; more prefixes per run with `<point>._allowed_prefixes_=[pkg.]`.
PLUGIN_POINTS = {"train.step": ("framework.", "examples.")}


def check_plugin_targets(cfg, points: Optional[Dict[str, Tuple[str, ...]]] = None) -> None:
    """Refuse `_target_` outside the plugin points, and targets outside the allowed prefixes."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from framework.config import ConfigError

    points = PLUGIN_POINTS if points is None else points
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(
        cfg, (DictConfig, ListConfig)) else cfg
    for path, node in _walk(tree, ""):
        if not isinstance(node, dict) or "_target_" not in node:
            continue
        target = node["_target_"]
        if target is None:  # an unset plugin point
            continue
        if path not in points:
            where = path or "<root>"
            raise ConfigError(f"{where}._target_={target!r}: `_target_` is only allowed at the "
                              f"plugin points {sorted(points)}; config values cannot name "
                              f"Python objects anywhere else")
        allowed = tuple(node.get("_allowed_prefixes_") or ()) + tuple(points[path])
        if not isinstance(target, str) or not any(target.startswith(p) for p in allowed):
            raise ConfigError(f"{path}._target_={target!r} is outside the allowed plugin "
                              f"prefixes {list(allowed)} (add yours with "
                              f"+{path}._allowed_prefixes_=[my_pkg.])")


def _walk(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------
# paths from files we read
# --------------------------------------------------------------------------------------------
def safe_relpath(name: str, what: str) -> str:
    """`name` if it is a relative path that stays inside its directory, else ConfigError."""
    from framework.config import ConfigError

    s = str(name)
    parts = re.split(r"[\\/]", s)
    if not s or os.path.isabs(s) or s.startswith(("/", "\\")) or ".." in parts or "\x00" in s \
            or re.match(r"^[A-Za-z]:", s):
        raise ConfigError(f"{what}: refusing path {s!r} (absolute or leaving its directory)")
    return s


# --------------------------------------------------------------------------------------------
# checkpoint loading without pickle
# --------------------------------------------------------------------------------------------
def _config_error():
    from framework.config import ConfigError

    return ConfigError


class CheckpointError(_config_error()):
    """A checkpoint that cannot be read as it is (damaged, tampered, not a closed tree): an input
    error, which train.py, generate.py and data_tools.convert report in one line, exit 2."""

    def __init__(self, msg: str) -> None:  # one line, whatever a file name holds
        super().__init__(str(msg).replace("\r", "\\r").replace("\n", "\\n"))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than tensors and plain data."""


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
            except _config_error() as e:
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
