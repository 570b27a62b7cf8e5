"""The model families, registered once: `model.type` -> `ModelSpec`.

Adding a family is one folder, `framework/models/<family>/` (its `__init__.py` defines `SPEC`),
plus its name in the import line and its `SPEC` in the tuple below. `register` adds one at run
time (a plugin, a test).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from framework.errors import ConfigError
from framework.models import bert, gpt, t5
from framework.models.spec import ModelSpec

FAMILIES: Dict[str, ModelSpec] = {spec.name: spec for spec in (gpt.SPEC, bert.SPEC, t5.SPEC)}


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a family at run time; returns it."""
    FAMILIES[spec.name] = spec
    return spec


def names() -> List[str]:
    return sorted(FAMILIES)


def family(name: Optional[str]) -> ModelSpec:
    """The spec of `model.type` `name`; a one-line ConfigError lists the registered ones."""
    if name not in FAMILIES:
        raise ConfigError(f"model.type={name!r} is not one of {names()}")
    return FAMILIES[name]


def with_capability(flag: str) -> List[str]:
    """The families whose spec has `flag` set (e.g. "fp8", "generation")."""
    return [n for n in names() if getattr(FAMILIES[n], flag)]


def hf_owner(hf_model_type: Optional[str]) -> Optional[Tuple[ModelSpec, str]]:
    """(the family that maps Hugging Face `hf_model_type`, that type), or None. Reads the specs
    only: nothing heavy is imported."""
    for n in names():
        if hf_model_type in FAMILIES[n].hf_types:
            return FAMILIES[n], hf_model_type
    return None


def hf_types() -> List[str]:
    return sorted(t for spec in FAMILIES.values() for t in spec.hf_types)
