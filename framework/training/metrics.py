"""Throughput, MFU, the log line, metrics.jsonl and optional trackers (W&B, TensorBoard).

MFU divides the model family's FLOPs per token (`ModelSpec.flops_per_token`; for a dense layer
stack `framework.models.spec.dense_flops_per_token`: 6 x the weights a token multiplies + 12 x
layers x attention width x sequence, which is Megatron's 72 l h^2 (1 + s/6h + V/12lh) for GPT-2
shapes and also counts SwiGLU and GQA right; forward + backward, no recompute counted) by the
card's dense bf16 peak (`PEAK_TFLOPS`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from framework.config import wandb_mode_in_effect
from framework.models.registry import family
from framework.models.spec import flops_per_token  # noqa: F401  (the dense formula, re-exported)
from framework.security.masking import mask_secrets, mask_text
from framework.training.console import echo

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_flops_per_token(model_cfg, vocab: int) -> float:
    """Model FLOPs per (input) token of the model family, forward and backward."""
    return family(model_cfg.type).flops_per_token(model_cfg, vocab)


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover
        return 0.0


class MetricsLogger:
    """Writes metrics.jsonl and the trackers; prints the log line. Only the logging rank has one."""

    def __init__(self, run_dir: str, logging_cfg, config_dict: Dict[str, Any],
                 resume_id_dir: Optional[str] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.wandb = None
        self.tb = None
        if logging_cfg.wandb:
            self.wandb = _start_wandb(logging_cfg, config_dict, run_dir, resume_id_dir)
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            # the run's config, as text, masked like every string sent to a tracker
            self.tb.add_text("config", "```\n" + json.dumps(mask_secrets(config_dict), indent=1,
                                                             default=str) + "\n```", 0)

    def log(self, record: Dict[str, Any]) -> None:
        record = mask_secrets(record)  # strings in a record (none today) never carry secrets
        # NaN and inf (a window of skipped steps) as null: json.dumps would write NaN, which is
        # not JSON (jq and most readers refuse the file); the trackers get the floats
        self.file.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v)
                                    else v for k, v in record.items()}, allow_nan=False) + "\n")
        self.file.flush()
        step = record.get("step")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every sink; a non-zero `exit_code` marks the W&B run failed."""
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
        if self.tb is not None:
            self.tb.close()


def valid_wandb_id(run_id: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id))


def _start_wandb(cfg, config_dict, run_dir, id_dir):
    import wandb

    id_file = os.path.join(id_dir, "wandb_run_id.txt") if id_dir else None
    run_id = _read_run_id(id_file) if id_file else None
    mode = wandb_mode_in_effect(cfg)
    import sys

    # Everything W&B stores or sends is masked by value: the command line (its run metadata),
    # the config, and the run name, tags and notes, from the config or from W&B's own
    # environment variables (which are hidden from it while it starts).
    env = {k: os.environ.pop(k) for k in ("WANDB_NAME", "WANDB_NOTES", "WANDB_TAGS")
           if k in os.environ}
    name = cfg.wandb_name or env.get("WANDB_NAME")
    notes = cfg.wandb_notes or env.get("WANDB_NOTES")
    tags = list(cfg.wandb_tags) or [t for t in env.get("WANDB_TAGS", "").split(",") if t]
    argv, sys.argv = sys.argv, [sys.argv[0]] + mask_secrets(sys.argv[1:])
    try:
        run = wandb.init(project=mask_text(cfg.wandb_project),
                         name=mask_text(name) if name else None,
                         notes=mask_text(notes) if notes else None,
                         tags=[mask_text(t) for t in tags] or None,
                         config=mask_secrets(config_dict), dir=run_dir, mode=mode, id=run_id,
                         resume="allow")
    finally:
        sys.argv = argv
        os.environ.update(env)
    if id_file:
        _write_run_id(id_file, run.id)
    return run


def _read_run_id(id_file: str) -> Optional[str]:
    """The W&B run id kept in `id_file` beside the checkpoints, or None (with a warning when
    there is something else there: a symlink, a directory or FIFO, text that is not an id)."""
    import stat

    try:
        st = os.lstat(id_file)
    except FileNotFoundError:
        return None
    except OSError as e:
        echo(f"warning: ignoring {id_file} ({e.strerror or e}); starting a new W&B run")
        return None
    if not stat.S_ISREG(st.st_mode):
        echo(f"warning: ignoring {id_file}: not a regular file (a symlink, directory or other "
             f"special file); starting a new W&B run")
        return None
    try:
        with open(id_file, "rb") as f:
            run_id = f.read(256).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        run_id = ""
    if not valid_wandb_id(run_id):  # it names a directory W&B creates: no paths
        echo(f"warning: ignoring {id_file}: {run_id[:40]!r} is not a W&B run id; "
             f"starting a new W&B run")
        return None
    return run_id


def _write_run_id(id_file: str, run_id: str) -> None:
    """Keep `run_id` in `id_file` through a new file renamed over it: never written through a
    symlink that was put there; a directory there is left alone, with a warning."""
    d = os.path.dirname(id_file)
    try:
        os.makedirs(d, exist_ok=True)
        if os.path.isdir(id_file) and not os.path.islink(id_file):
            raise IsADirectoryError(21, "a directory is in its place")
        tmp = f"{id_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(run_id)
        os.replace(tmp, id_file)
    except OSError as e:
        echo(f"warning: could not keep the W&B run id in {id_file} ({e.strerror or e}); a "
             f"resumed run will start a new W&B run")


def format_line(r: Dict[str, Any], max_steps: int, on_gpu: bool = True) -> str:
    """The log line. Rates are per GPU on GPUs (tok/s/gpu, TFLOP/s/gpu, MFU); on a CPU they are
    the whole job's (tok/s, GFLOP/s: the processes share the cores) and there is no MFU."""
    if on_gpu:
        rates = [f"{r['tokens_per_sec_per_gpu']:.0f} tok/s/gpu",
                 f"{r['tflops_per_gpu']:.1f} TFLOP/s/gpu",
                 f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU n/a"]
    else:
        rates = [f"{r['tokens_per_sec']:.0f} tok/s", f"{1000 * r['tflops']:.2f} GFLOP/s"]
    parts = [
        f"iter {r['step']:>6d}/{max_steps}",
        f"samples {r['consumed_samples']}",
        f"{r['ms_per_iter']:.1f} ms/it",
        *rates,
        f"lr {r['lr']:.3e}",
        f"loss {r['loss']:.4f}",
        f"grad_norm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad_norm n/a",
        f"skipped {r['skipped_iters']}",
        f"nan {r['nan_iters']}",
        f"mem {r['mem_gb']:.2f} GB",
    ]
    if r.get("loss_scale") is not None:
        parts.append(f"loss_scale {r['loss_scale']:.0f}")
    return " | ".join(parts)


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
