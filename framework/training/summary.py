"""What a run tells the user before and after it trains.

* `check_finished(cfg, overrides)`: a checkpoint in `checkpoint.dir` already at or past
  `train.max_steps` means there is nothing to train. At exactly `train.max_steps` (the same
  command run again) that is one line and exit status 0; past it (the command asks for fewer
  steps than were trained) it is a one-line error, exit status 2. Either line names the
  checkpoint, its step and `train.max_steps`, and gives the two ways on: a larger
  `train.max_steps` (continues the run) or another `checkpoint.dir` (a fresh run).
* `print_summary(cfg, overrides)`: the end of a run, read back from the files it wrote (so it
  works for any number of workers): final train and eval loss, where metrics.jsonl, train.log,
  the checkpoint and the tracker files are, and the command that resumes or continues the run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from framework.checkpoint.reader import iter_dir, latest_iteration
from framework.config import wandb_mode_in_effect
from framework.errors import ConfigError
from framework.security.masking import mask_secrets
from framework.training.console import LOG_NAME, echo

if TYPE_CHECKING:  # annotations only
    from framework.config import Config


def show_path(path: str) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def command(overrides: Optional[List[str]], **changes: Any) -> str:
    """`python train.py <overrides>` with `changes` (dotted keys spelled with "__") set, and
    secrets masked."""
    # a one-off choice of the checkpoint to start from: the printed commands continue from the
    # latest one
    items = [o for o in (overrides or [])
             if o.split("=", 1)[0].lstrip("+~") != "checkpoint.load_iteration"]
    for key, value in changes.items():
        key = key.replace("__", ".")
        items = [o for o in items if o.split("=", 1)[0].lstrip("+~") != key]
        items.append(f"{key}={value}")
    items = mask_secrets(items)
    return " ".join(["python train.py", *(shlex.quote(o) for o in items)])


def fresh_dir(ckpt_dir: str) -> str:
    """A sibling of `ckpt_dir` that does not exist yet (`<dir>-2`, `<dir>-3`, ...; `fresh-<n>`
    when the name has characters a Hydra override value would need quoted, such as `=` or `,`)."""
    parent, name = os.path.split(os.path.abspath(ckpt_dir).rstrip(os.sep))
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        name = "fresh"
    n = 2
    while os.path.exists(os.path.join(parent, f"{name}-{n}")):
        n += 1
    return show_path(os.path.join(parent, f"{name}-{n}"))


def check_finished(cfg: "Config", overrides: Optional[List[str]], show: bool = True) -> bool:
    """True (after one line on stdout, if `show`) when `checkpoint.dir` is already at
    `train.max_steps`; raises ConfigError when it is past it; False when there is something to
    train."""
    it = latest_iteration(cfg.checkpoint.dir, allow_symlinks=cfg.checkpoint.allow_symlinks)
    if it is not None and cfg.checkpoint.load_iteration is not None:
        it = cfg.checkpoint.load_iteration  # the run resumes from there
    steps = cfg.train.max_steps
    if it is None or it < steps or (it == 0 and steps == 0):
        return False
    where = f"the checkpoint {show_path(iter_dir(cfg.checkpoint.dir, it))} (step {it})"
    longer = command(overrides, train__max_steps=max(2 * it, it + 1))
    fresh = command(overrides, checkpoint__dir=fresh_dir(cfg.checkpoint.dir))
    ways = f"to train longer: {longer} ; to start a fresh run: {fresh}"
    if it == steps:
        if show:
            echo(f"nothing to train: {where} is already at train.max_steps={steps}; {ways}")
        return True
    raise ConfigError(f"{where} is past train.max_steps={steps}: nothing to train; {ways}")


def _records(path: str) -> List[Dict[str, Any]]:
    out = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def _in_sweep() -> bool:
    from framework.cli import is_multirun

    return is_multirun()


def print_summary(cfg: "Config", overrides: Optional[List[str]]) -> None:
    """The closing lines of a run (see the module docstring)."""
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    recs = _records(metrics)
    train = [r for r in recs if r.get("loss") is not None]
    evals = [r for r in recs if r.get("eval_loss") is not None]
    it = (latest_iteration(cfg.checkpoint.dir, allow_symlinks=cfg.checkpoint.allow_symlinks)
          if cfg.checkpoint.save else None)
    step = max([r["step"] for r in recs if "step" in r] + [it or 0])
    head = f"done: step {step}/{cfg.train.max_steps}"
    if train:
        head += f" | loss {train[-1]['loss']:.4f} (step {train[-1]['step']})"
    last = next((r for r in reversed(recs) if "loss" in r), None)
    if last is not None and last["loss"] is None:  # its log window had no finite loss
        head += (" | no finite loss since " + (f"step {train[-1]['step']}" if train else
                                                 "the start") +
                 f" ({last.get('nan_iters', '?')} non-finite steps in all)")
    if evals:
        head += f" | eval loss {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})"
    lines = [head]
    if recs:
        lines.append(f"  metrics:     {show_path(metrics)}")
    lines.append(f"  log:         {show_path(os.path.join(cfg.run_dir, LOG_NAME))}")
    if it is not None:
        lines.append(f"  checkpoint:  {show_path(iter_dir(cfg.checkpoint.dir, it))}")
    elif not cfg.checkpoint.save:
        lines.append("  checkpoint:  none (checkpoint.save=false)")
    if cfg.logging.tensorboard:
        lines.append(f"  tensorboard: {show_path(os.path.join(cfg.run_dir, 'tensorboard'))}")
    if cfg.logging.wandb:
        mode = wandb_mode_in_effect(cfg.logging)
        lines.append("  wandb:       " + (
            "none (W&B was disabled: " + ("logging.wandb_mode=disabled)" if
                                          cfg.logging.wandb_mode else "WANDB_MODE=disabled)")
            if mode == "disabled" else show_path(os.path.join(cfg.run_dir, "wandb"))))
    # a sweep job's checkpoint directory is named from the sweep's overrides: the single run a
    # printed command starts would name another one (and start afresh), so name it
    pin = {}
    if it is not None and _in_sweep() and not any(
            o.split("=", 1)[0].lstrip("+~") == "checkpoint.dir" for o in overrides or []):
        pin["checkpoint__dir"] = "'" + show_path(cfg.checkpoint.dir).replace("'", "\\'") + "'"
    if it is not None and it < cfg.train.max_steps:
        lines.append(f"  resume:      {command(overrides, **pin)}")
    elif it is not None:
        lines.append(f"  train longer: "
                     f"{command(overrides, **pin, train__max_steps=2 * max(it, 1))}")
    for line in lines:
        echo(line)
