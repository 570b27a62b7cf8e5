"""Secrets never reach disk: `mask_secrets(obj)` replaces the values of secret-looking keys
(`*_token`, `*_key`, `*_secret`, `password`, ...) and every occurrence of a secret environment value
(`WANDB_API_KEY`, `HF_TOKEN`, `*_TOKEN`, `*_KEY`, `*_SECRET`, ...) with `***`; the `mask_hydra_*`
helpers do the same for what Hydra writes.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional

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
