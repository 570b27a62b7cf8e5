"""`patched(obj, name=value, ...)`: set attributes for the duration of a `with` block.

We use it where megatron-core looks a collaborator up at call time and offers no parameter for
it (a norm class, a CUDA-only helper); the original attributes come back on exit, also on error.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def patched(obj: Any, **attrs: Any) -> Iterator[None]:
    saved = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)
