"""torchtitan 0.2.2 as a second baseline: its own trainer on a Llama shape, synthetic tokens.

    python benchmarks/torchtitan_baseline.py --model llama3_1b --micro-batch 12 --steps 15
    python benchmarks/torchtitan_baseline.py --model llama3_1b --dry-run   # TOML + command only
    python benchmarks/torchtitan_baseline.py --model llama3_1b --micro-batch 16 --profile-dir P
        # also two profiled steps after the measured ones (torchtitan's own profiler), their
        # kernel table written by benchmarks/profile_summary.py to P/torchtitan_<model>_mb<N>.txt

Writes a torchtitan job TOML (benchmarks/torchtitan_spec.py's `llama3_bench` spec: the shape as
a flavor, synthetic tokens), runs torchtitan's trainer on one GPU (`python -m torchtitan.train
--job.config_file ...` with the one-rank environment torchrun would set: RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT), and parses the trainer's own log lines
(`step: N ... memory: X GiB ... tps: N`). torchtitan logs at step 1 and every
`--log-interval` steps, the host waiting for the GPU at each log; the windows after the first
full one are measured, and tok/s is tokens over their total time (the
harmonic mean of the windows' tps, each window holding the same tokens). Peak memory is
torchtitan's max *reserved* GiB.

Settings, mirrored from ours where torchtitan has the knob: AdamW fused (`--no-fused`: foreach),
lr / betas / eps / weight decay / grad clip / warmup / decay style (linear or cosine: torchtitan
has no constant decay, so that is refused) as given (our conf/optimizer/adam.yaml by default),
decay to min_lr at the last step, fp32 params under autocast bf16 (one GPU: torchtitan's AMP
path), no activation checkpointing, per-TransformerBlock torch.compile plus the compiled loss
(torchtitan's `compile.enable`), seeded uniformly random token ids over the real vocab
(benchmarks/torchtitan_spec.py). Where it has none: its llama3 model has an untied output layer,
and it puts weight decay on every parameter (`OWN_WAY`). The last stdout line is JSON (tok/s,
per-window ms, peak GB, the command that ran, the TOML path, and `settings`: the TOML's key
fields under benchmarks/shapes.py's names, `tt_settings`).

Needs torchtitan 0.2.2 and what it imports beyond the GPU image (benchmarks/device_wheels.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.shapes import SHAPES, get_shape, short_dtype  # noqa: E402
from framework.distributed import free_port  # noqa: E402

OPT_DEFAULTS = dict(lr=1e-3, min_lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                    clip_grad=1.0, lr_warmup_steps=10, lr_decay_style="cosine", fused=True)
TT_SHAPES = [n for n, s in SHAPES.items() if s.family == "llama"]
# our optimizer.lr_decay_style values that torchtitan's lr_scheduler.decay_type also has
TT_DECAY_TYPES = ("linear", "cosine")
# settings torchtitan has its own way (its llama3 model is untied, its AdamW decays every
# parameter): reported beside ours, not counted as a difference
OWN_WAY = ("tied", "no_weight_decay")


def toml_text(cfg: dict) -> str:
    """A TOML document from {table: {key: value}} (str, bool, int, float, list of str)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            r = repr(v)
            return r if any(c in r for c in ".en") else r + ".0"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"no TOML for {type(v).__name__}")

    out = []
    for table, kv in cfg.items():
        out.append(f"[{table}]")
        out += [f"{k} = {val(v)}" for k, v in kv.items()]
        out.append("")
    return "\n".join(out)


PROFILE_WARMUP, PROFILE_ACTIVE = 2, 2


def job_config(model: str, mb: int, steps_total: int, log_interval: int, out_dir: str,
               opt: dict, compile_: bool = True, profile: bool = False) -> dict:
    """torchtitan's job TOML as a dict. `profile`: one more log window after `steps_total`, its
    last PROFILE_ACTIVE steps profiled by torchtitan (after PROFILE_WARMUP profiler warm-up
    steps), so that the measured windows carry no profiler overhead."""
    shape = get_shape(model)
    if opt["lr_decay_style"] not in TT_DECAY_TYPES:
        raise ValueError(f"lr_decay_style={opt['lr_decay_style']!r}: torchtitan_baseline runs "
                         f"{' or '.join(TT_DECAY_TYPES)} only (torchtitan has no constant decay)")
    cfg = {
        "job": {"dump_folder": out_dir,
                "description": f"{model} speed baseline, synthetic tokens"},
        "model": {"name": "llama3_bench", "flavor": model, "hf_assets_path": out_dir},
        "optimizer": {"name": "AdamW", "lr": float(opt["lr"]), "beta1": float(opt["beta1"]),
                      "beta2": float(opt["beta2"]), "eps": float(opt["eps"]),
                      "weight_decay": float(opt["weight_decay"]),
                      "implementation": "fused" if opt["fused"] else "foreach"},
        "lr_scheduler": {"warmup_steps": int(opt["lr_warmup_steps"]),
                         "decay_type": opt["lr_decay_style"],
                         "min_lr_factor": float(opt["min_lr"]) / float(opt["lr"])},
        "training": {"local_batch_size": mb, "seq_len": shape.seq,
                     "max_norm": float(opt["clip_grad"]), "steps": steps_total,
                     "dtype": "float32", "mixed_precision_param": "bfloat16"},
        "parallelism": {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                        "tensor_parallel_degree": 1, "pipeline_parallel_degree": 1},
        "activation_checkpoint": {"mode": "none"},
        "compile": {"enable": bool(compile_), "components": ["model", "loss"]},
        "checkpoint": {"enable": False},
        "metrics": {"log_freq": log_interval, "disable_color_printing": True,
                    "enable_tensorboard": False},
        "experimental": {"custom_import": "benchmarks.torchtitan_spec"},
    }
    if profile:
        if log_interval < PROFILE_WARMUP + PROFILE_ACTIVE:
            raise ValueError(f"--log-interval must be at least {PROFILE_WARMUP + PROFILE_ACTIVE} "
                             f"to profile, got {log_interval}")
        total = steps_total + log_interval
        cfg["training"]["steps"] = total
        cfg["profiling"] = {"enable_profiling": True, "save_traces_folder": "profile_traces",
                            "profile_freq": total, "profiler_warmup": PROFILE_WARMUP,
                            "profiler_active": PROFILE_ACTIVE}
    return cfg


def tt_settings(cfg: dict) -> dict:
    """The settings torchtitan runs with, read back from its job TOML (`job_config`'s dict),
    under benchmarks/shapes.py's field names so that speed_table.py sets them beside ours."""
    from benchmarks.torchtitan_spec import data_setting

    o, sched, t = cfg["optimizer"], cfg["lr_scheduler"], cfg["training"]
    comp = cfg["compile"]
    return {
        "lr": o["lr"], "min_lr": o["lr"] * sched["min_lr_factor"],
        "betas": [o["beta1"], o["beta2"]], "eps": o["eps"], "weight_decay": o["weight_decay"],
        "no_weight_decay": "nothing", "clip_grad": t["max_norm"],
        "lr_warmup_steps": sched["warmup_steps"], "lr_decay_style": sched["decay_type"],
        # no decay_ratio: the decay runs from the end of warmup to the last step
        "lr_decay_steps": t["steps"], "fused": o["implementation"] == "fused",
        # one rank, no gradient accumulation
        "micro_batch": t["local_batch_size"], "global_batch": t["local_batch_size"],
        "seq": t["seq_len"], "max_steps": t["steps"],
        "compile": (f"per block ({', '.join(comp['components'])})" if comp["enable"]
                    else "off"),
        # one GPU: fp32 params (`dtype`) under autocast to mixed_precision_param
        "compute_dtype": short_dtype(t["mixed_precision_param"]),
        "master_dtype": short_dtype(t["dtype"]), "fp8": "none",
        "recompute": cfg["activation_checkpoint"]["mode"], "tied": False,
        "data": data_setting(get_shape(cfg["model"]["flavor"])),
    }


def command(toml_path: str) -> list:
    return [sys.executable, "-m", "torchtitan.train", "--job.config_file", toml_path]


def launch_env(port: int) -> dict:
    """The environment torchrun would give the one rank (torchtitan reads LOCAL_RANK and
    initialises torch.distributed from env://). One process and no launcher: a timeout kills
    the trainer itself, not a launcher that leaves its worker running on the GPU."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naife]+).*?memory:\s*([\d.]+)\s*GiB.*?"
                   r"tps:\s*([\d,]+)")


def parse_log(text: str, mb: int, seq: int, log_interval: int, last_step: int = None):
    """{'tok_s', 'ms_per_iter', 'window_ms', 'peak_gb', 'last_loss'} from the trainer's log:
    the windows ending after the first full one (step > log_interval), up to `last_step` (the
    profiled window after it is not measured)."""
    wins = []
    for line in _ANSI.sub("", text).splitlines():
        m = _STEP.search(line)
        if m:
            step, loss, mem, tps = int(m[1]), float(m[2]), float(m[3]), \
                float(m[4].replace(",", ""))
            wins.append((step, loss, mem, tps))
    meas = [w for w in wins if w[0] > log_interval and (last_step is None or w[0] <= last_step)]
    if not meas:
        raise ValueError(f"no torchtitan step logs after step {log_interval} "
                         f"(found steps {[w[0] for w in wins]})")
    tokens = mb * seq
    ms = [1000.0 * tokens / w[3] for w in meas]
    mean_ms = sum(ms) / len(ms)
    return {"tok_s": tokens / (mean_ms / 1000.0), "ms_per_iter": mean_ms,
            "window_ms": [round(x, 2) for x in ms], "peak_gb": max(w[2] for w in meas),
            "peak_kind": "reserved", "last_loss": meas[-1][1],
            "steps_logged": [w[0] for w in wins]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3_1b", choices=TT_SHAPES)
    ap.add_argument("--micro-batch", type=int, default=12)
    ap.add_argument("--steps", type=int, default=15, help="measured steps (whole windows)")
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    for k, v in OPT_DEFAULTS.items():
        if not isinstance(v, bool):
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--no-fused", action="store_true", help="foreach AdamW instead of fused")
    ap.add_argument("--out-dir", default=None, help="TOML and torchtitan's dump folder "
                    "(default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--profile-dir", default=None,
                    help="profile two steps after the measured ones; the kernel table goes here")
    ap.add_argument("--dry-run", action="store_true",
                    help="write the TOML and print the command; with torchtitan installed also "
                         "parse the TOML with its ConfigManager and check the flavor's size")
    a = ap.parse_args(argv)
    for f in ("micro_batch", "steps", "log_interval"):
        if getattr(a, f) <= 0:
            ap.exit(2, f"error: --{f.replace('_', '-')} must be positive, got {getattr(a, f)}\n")
    if a.lr <= 0:
        ap.exit(2, f"error: --lr must be positive, got {a.lr}\n")
    shape = get_shape(a.model)
    windows = -(-a.steps // a.log_interval)
    total = a.log_interval * (1 + windows)
    out_dir = a.out_dir or tempfile.mkdtemp(prefix="torchtitan_bench_")
    os.makedirs(out_dir, exist_ok=True)
    opt = {k: getattr(a, k) for k in OPT_DEFAULTS if k != "fused"}
    opt["fused"] = not a.no_fused
    try:
        cfg = job_config(a.model, a.micro_batch, total, a.log_interval, out_dir, opt,
                         not a.no_compile, profile=bool(a.profile_dir))
    except ValueError as e:
        ap.exit(2, f"error: {e}\n")
    toml_path = os.path.join(out_dir, f"{a.model}_mb{a.micro_batch}.toml")
    with open(toml_path, "w") as f:
        f.write(toml_text(cfg))
    cmd = command(toml_path)
    launch = launch_env(free_port())
    shown = " ".join([f"{k}={v}" for k, v in launch.items()] + [f"PYTHONPATH={ROOT}:$PYTHONPATH"]
                     + cmd).replace(sys.executable, "python")
    env = dict(os.environ, **launch, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    print(f"torchtitan command: {shown}", flush=True)
    if a.dry_run:
        print(open(toml_path).read())
        info = {"command": shown, "toml": toml_path, "settings": tt_settings(cfg)}
        try:
            import torchtitan  # noqa: F401
        except ImportError:
            info["torchtitan"] = "not installed: TOML not parsed"
        else:
            info.update(check_with_torchtitan(toml_path, shape))
        print(json.dumps(info))
        return 0
    from benchmarks.throughput import failure, run

    # in speed_table.py's process group (its timeout kills this trainer too)
    r = run(cmd, env=env, timeout=a.timeout, new_session=False)
    text = r.stdout + "\n" + r.stderr
    with open(os.path.join(out_dir, "torchtitan.log"), "w") as f:
        f.write(text)
    if r.returncode != 0:
        print(text[-3000:], file=sys.stderr)
        print(f"error: torchtitan exited {r.returncode}: {failure(r)}", file=sys.stderr)
        return 1
    res = parse_log(text, a.micro_batch, shape.seq, a.log_interval, last_step=total)
    res.update(command=shown, toml=toml_path, settings=tt_settings(cfg))
    if a.profile_dir:
        res["profile"] = summarize_trace(out_dir, a.profile_dir,
                                         f"torchtitan_{a.model}_mb{a.micro_batch}.txt")
    print(json.dumps(res))
    return 0


def summarize_trace(out_dir: str, profile_dir: str, name: str) -> str:
    """The kernel table (benchmarks/profile_summary.py) of torchtitan's rank-0 trace under
    `out_dir`, written to profile_dir/name; returns its path."""
    import glob

    from benchmarks.profile_summary import summarize

    traces = sorted(glob.glob(os.path.join(out_dir, "profile_traces", "iteration_*",
                                           "rank0_trace.json")))
    if not traces:
        raise SystemExit(f"error: torchtitan wrote no profile trace under {out_dir}/profile_traces")
    os.makedirs(profile_dir, exist_ok=True)
    path = os.path.join(profile_dir, name)
    summarize(traces[-1], out=path)
    return path


def check_with_torchtitan(toml_path: str, shape) -> dict:
    """Parse the TOML with torchtitan's ConfigManager and build the flavor on the meta device:
    its parameter count must be the shape's with an untied output layer."""
    import torch
    from torchtitan.config import ConfigManager

    from benchmarks import torchtitan_spec

    torchtitan_spec.register()
    cfg = ConfigManager().parse_args(["--job.config_file", toml_path])
    args = torchtitan_spec.flavors()[cfg.model.flavor]
    args.update_from_config(cfg)
    from torchtitan.models.llama3 import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    want = shape.replace(tied=False).params()
    if n != want:
        raise SystemExit(f"error: torchtitan flavor {cfg.model.flavor} has {n} parameters, "
                         f"the shape (untied) {want}")
    return {"torchtitan_params": n, "parsed": {"local_batch_size": cfg.training.local_batch_size,
                                               "seq_len": cfg.training.seq_len,
                                               "steps": cfg.training.steps,
                                               "compile": cfg.compile.enable}}


if __name__ == "__main__":
    sys.exit(main())
