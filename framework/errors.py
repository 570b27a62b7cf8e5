"""The input errors of the framework: each is reported as one line (`error: ...`, exit 2).

A `ConfigError` names the config fields or files involved; the others specialise it for what was
being read. This module imports nothing of the framework, so every layer can raise them.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config problem. Its message is one line that names the fields involved."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read as it is (damaged, tampered, not a closed tree): an input
    error, which train.py, generate.py and data_tools.convert report in one line, exit 2."""

    def __init__(self, msg: str) -> None:  # one line, whatever a file name holds
        super().__init__(str(msg).replace("\r", "\\r").replace("\n", "\\n"))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than tensors and plain data."""


class InteropError(ConfigError):
    """Bad input to a conversion (files, names, shapes, unsupported architecture); one line."""


def require(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def choice(value: Any, allowed: tuple, name: str) -> None:
    """`value` must be one of `allowed`; the error names the field `name`."""
    require(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")
