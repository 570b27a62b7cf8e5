"""`_target_` only at plugin points: `check_plugin_targets(cfg)` refuses `_target_` anywhere except
the documented plugin points (`PLUGIN_POINTS`), and there only for the allowed module prefixes.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

from framework.errors import ConfigError

# --------------------------------------------------------------------------------------------
# plugin points
# --------------------------------------------------------------------------------------------
# config paths where `_target_` is allowed (a class is instantiated from it), and the module
# prefixes it may name there; more prefixes per run with `<point>._allowed_prefixes_=[pkg.]`.
PLUGIN_POINTS = {"train.step": ("framework.", "examples.")}


def check_plugin_targets(cfg, points: Optional[Dict[str, Tuple[str, ...]]] = None) -> None:
    """Refuse `_target_` outside the plugin points, and targets outside the allowed prefixes."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

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
