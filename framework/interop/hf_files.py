"""Hugging Face checkpoint files: read weights safely, write `save_pretrained`'s layout.

Reading prefers safetensors (`model.safetensors`, or shards named by
`model.safetensors.index.json`), opened lazily so each rank reads only the tensors it needs.
PyTorch pickles (`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`) are
refused unless `allow_pickle=True`: unpickling can execute arbitrary code. When allowed they are
read with `torch.load(weights_only=True)`.

Writing produces what `PreTrainedModel.save_pretrained` does: `config.json`, and the weights as
`model.safetensors`, or, above `max_shard_size`, as `model-0000k-of-0000n.safetensors` shards with
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`).
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List

from framework.errors import InteropError

if TYPE_CHECKING:  # torch is imported lazily: refusing bad input needs none of it
    import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isdir(hf_dir):
        raise InteropError(f"{hf_dir} is not a directory (expected a Hugging Face model "
                           f"directory with {CONFIG})")
    if not os.path.isfile(path):
        raise InteropError(f"{hf_dir} has no {CONFIG}; is it a Hugging Face model directory?")
    cfg = _json_file(path)
    if not isinstance(cfg, dict):
        raise InteropError(f"{path} does not hold a JSON object")
    return cfg


def _json_file(path: str) -> Any:
    """The JSON document in `path`; text that is not UTF-8 or not JSON, or nested too deeply to
    parse, is one InteropError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InteropError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InteropError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at "
                           f"{e.start})") from None
    except RecursionError:
        raise InteropError(f"{path}: cannot read it as JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and an integer too long to convert
        raise InteropError(f"{path}: cannot read it as JSON ({str(e).splitlines()[0]})") \
            from None


def _index_files(path: str) -> Dict[str, str]:
    doc = _json_file(path)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and not os.path.isabs(v)
            and ".." not in v.replace("\\", "/").split("/") for k, v in weight_map.items()):
        raise InteropError(f"{path}: not a valid weight index ('weight_map' must map each "
                           f"tensor name to a weight file inside the directory)")
    return dict(weight_map)


class HFWeights:
    """Lazy, read-only access to the tensors of a Hugging Face model directory."""

    def __init__(self, hf_dir: str, *, allow_pickle: bool = False) -> None:
        self.dir = hf_dir
        self._handles: Dict[str, Any] = {}
        self._loaded: Dict[str, Dict[str, "torch.Tensor"]] = {}
        join = lambda name: os.path.join(hf_dir, name)  # noqa: E731
        self._indexed = os.path.isfile(join(SAFE_INDEX)) or (
            allow_pickle and os.path.isfile(join(PICKLE_INDEX)))
        if os.path.isfile(join(SAFE_INDEX)):
            self.format, self._where = "safetensors", _index_files(join(SAFE_INDEX))
        elif os.path.isfile(join(SAFE_SINGLE)):
            self.format = "safetensors"
            self._where = {k: SAFE_SINGLE for k in self._safe(SAFE_SINGLE).keys()}
        elif os.path.isfile(join(PICKLE_INDEX)) or os.path.isfile(join(PICKLE_SINGLE)):
            name = PICKLE_INDEX if os.path.isfile(join(PICKLE_INDEX)) else PICKLE_SINGLE
            if not allow_pickle:
                raise InteropError(
                    f"{hf_dir} holds only PyTorch pickle weights ({name}); loading a pickle can "
                    f"execute arbitrary code, so it is refused. Convert it to safetensors, or "
                    f"pass --allow-pickle (allow_pickle=True) if you trust the file; it is then "
                    f"read with torch.load(weights_only=True)")
            self.format = "pickle"
            self._where = (_index_files(join(name)) if name == PICKLE_INDEX
                           else {k: name for k in self._pickle(name)})
        else:
            raise InteropError(f"{hf_dir} has no model weights ({SAFE_SINGLE}, {SAFE_INDEX}, "
                               f"{PICKLE_SINGLE} or {PICKLE_INDEX})")
        for fname in sorted(set(self._where.values())):
            if not os.path.isfile(join(fname)):
                raise InteropError(f"{hf_dir}: the weight index names {fname}, which is missing")

    def _safe(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[fname] = safe_open(os.path.join(self.dir, fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types on bad headers
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise InteropError(f"{os.path.join(self.dir, fname)}: not a readable safetensors "
                                   f"file ({why})") from None
        return self._handles[fname]

    def _pickle(self, fname: str) -> Dict[str, "torch.Tensor"]:
        if fname not in self._loaded:
            import torch

            path = os.path.join(self.dir, fname)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # UnpicklingError for anything but plain tensors
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InteropError(f"{path}: torch.load(weights_only=True) refused or failed "
                                   f"({first})") from None
            if not isinstance(sd, dict):
                raise InteropError(f"{path} does not hold a state dict")
            self._loaded[fname] = sd
        return self._loaded[fname]

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _from_file(self, name: str, what: str):
        """`what` ("get_tensor" or "get_slice") of `name` in the safetensors file the index
        places it in; InteropError (one line, file and tensor) when the file does not hold it
        or cannot give it."""
        fname = self._where[name]
        handle = self._safe(fname)
        try:
            return getattr(handle, what)(name)
        except Exception as e:  # safetensors' SafetensorError: not in the file, bad data, ...
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            index = "; the weight index places it in this file" if self._indexed else ""
            raise InteropError(f"{os.path.join(self.dir, fname)}: cannot read tensor {name} "
                               f"({why}){index}") from None

    def get(self, name: str) -> "torch.Tensor":
        if name not in self._where:
            raise InteropError(f"{self.dir} has no tensor {name}")
        fname = self._where[name]
        if self.format == "safetensors":
            return self._from_file(name, "get_tensor")
        if name not in self._pickle(fname):
            raise InteropError(f"{os.path.join(self.dir, fname)} has no tensor {name}; the "
                               f"weight index places it in this file")
        return self._pickle(fname)[name]

    def shape(self, name: str) -> tuple:
        """The shape of tensor `name` (from the safetensors header: no data read)."""
        if name not in self._where:
            raise InteropError(f"{self.dir} has no tensor {name}")
        if self.format == "safetensors":
            return tuple(self._from_file(name, "get_slice").get_shape())
        return tuple(self.get(name).shape)

    def describe(self) -> List[tuple]:
        """(name, shape, dtype) of every tensor, in file order."""
        out = []
        for name in self.keys():
            if self.format == "safetensors":
                sl = self._from_file(name, "get_slice")
                dt = str(sl.get_dtype())
                out.append((name, tuple(sl.get_shape()), _SAFE_DTYPES.get(dt, dt)))
            else:
                t = self.get(name)
                out.append((name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
        return out

    def dtype(self) -> "torch.dtype":
        """The floating dtype most of the weights are stored in."""
        import torch

        counts: Dict[str, int] = {}
        for _name, shape, dt in self.describe():
            n = 1
            for s in shape:
                n *= s
            counts[dt] = counts.get(dt, 0) + n
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        floating = {k: v for k, v in counts.items() if k in names}
        return names[max(floating, key=floating.get)] if floating else torch.float32


_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000, '1GiB' -> 2**30, '512' -> 512 bytes (HF's conventions)."""
    m = _SIZE.match(str(text))
    if not m:
        raise InteropError(f"size {text!r} is not like 200MB, 5GB, 1GiB or a number of bytes")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(value * scale)
    if size <= 0:
        raise InteropError(f"size {text!r} must be positive")
    return size


def write_hf_weights(save_dir: str, tensors: Dict[str, "torch.Tensor"], *,
                     max_shard_size: int) -> List[str]:
    """Write `tensors` as save_pretrained does; returns the file names written."""
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_size:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(save_dir, SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(save_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    with open(os.path.join(save_dir, SAFE_INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return names + [SAFE_INDEX]


def write_hf_config(save_dir: str, config: Dict[str, Any]) -> None:
    """config.json through transformers' config class for `model_type` (validates the fields)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    cfg.save_pretrained(save_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "added_tokens.json")


# files of an HF tokenizer directory copied verbatim (byte for byte) by copy_tokenizer_files
TOKENIZER_COPY = TOKENIZER_FILES + ("chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    """Make `dst` hold exactly `src`'s tokenizer files, byte for byte (save_pretrained would
    rewrite tokenizer_config.json: transformers 5 moves the chat template into its own file).
    Returns the names copied; `dst` is left alone when `src` has none."""
    import shutil

    names = [f for f in TOKENIZER_COPY if os.path.isfile(os.path.join(src, f))]
    if not names:
        return []
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for f in names:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return names


def has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in TOKENIZER_FILES)
