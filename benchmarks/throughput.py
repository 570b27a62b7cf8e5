"""Throughput of our training against Hugging Face (+ torch.compile), one GPU, one run.

    python benchmarks/throughput.py [--model gpt2_large] [--dropout 0] [--hf-micro-batches 8,16] \
        [--micro-batches 8,16] [--steps 20]

`--model` is a shape of benchmarks/shapes.py: gpt2_small/medium/large/xl, llama3_1b, llama3_3b,
qwen2_5_1_5b(_untied). Every candidate runs as its own process, one after another, on GPU 0,
with the same model dimensions, sequence length and `--dropout` on both sides. Ours runs the real
`train.py` on `data=random` (seeded token ids drawn uniformly over the model's vocab, as the HF
and torchtitan baselines draw them; the shape spelled out as overrides), logging every 5 steps (a
log step is where the host waits for the GPU, as in users' runs), and reports total tokens over
total time of the log windows after a warm-up window, from its metrics.jsonl. The HF baseline
(benchmarks/hf_baseline.py) times the same windows the same way, with our optimizer settings. The
table gives tok/s, MFU (6 x matmul params + 12 x layers x hidden x seq per token, against 989
TFLOP/s bf16; benchmarks/shapes.py), peak memory and the ratio to the best HF + compile result.
OOM counts as "did not fit". For the like-for-like table (both sides' settings checked equal,
each at its best micro-batch) use benchmarks/speed_table.py.

FP8 against bf16 (train.fp8), no HF runs:

    python benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
        --runs default:16,fp8:16,fp8_rowwise:16 --steps 15
    python benchmarks/throughput.py --model gpt2_large --hf-micro-batches "" \
        --runs default:24,fp8:24 --steps 15
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.shapes import SHAPES, check_dropout, get_shape, ours_overrides  # noqa: E402


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def run(cmd, env=None, timeout=900, new_session=True) -> Ran:
    """Run `cmd` in its own process group; on timeout kill the whole group (compile workers,
    self-launched train.py workers) so the next candidate starts on an idle GPU.
    `new_session=False` (a benchmark already run in its own group by this function): stay in the
    caller's group, so the caller's timeout kills this child too; on our own timeout kill it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT, start_new_session=new_session)
    try:
        out, err = p.communicate(timeout=timeout)
        return Ran(p.returncode, out, err)
    except subprocess.TimeoutExpired:
        if new_session:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
        out, err = p.communicate()
        return Ran(-9, out, err + f"\ntimed out after {timeout:.0f} s", timed_out=True)


def failure(r: Ran) -> str:
    """'OOM' for an out-of-memory failure, else the last lines of the error output."""
    text = r.stderr + r.stdout
    if "out of memory" in text.lower():
        return "OOM"
    if r.timed_out:
        return text.strip().splitlines()[-1]
    return r.stderr[-400:] or r.stdout[-400:]


# the optimizer fields hf_baseline.py takes, by our OptimizerConfig's names
HF_OPT_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "adam_beta1": "--beta1",
                "adam_beta2": "--beta2", "adam_eps": "--eps", "weight_decay": "--weight-decay",
                "clip_grad": "--clip-grad", "lr_warmup_steps": "--lr-warmup-steps",
                "lr_decay_style": "--lr-decay-style"}


def hf_cmd(model, mb, steps, compile_, dropout=0.0, optimizer=None, extra=()):
    """hf_baseline.py's command; `optimizer` = our composed OptimizerConfig to mirror."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "hf_baseline.py"), "--model", model,
           "--micro-batch", str(mb), "--steps", str(steps), "--log-interval", str(LOG),
           "--dropout", f"{dropout:g}"]
    if optimizer is not None:
        for field, flag in HF_OPT_FLAGS.items():
            cmd += [flag, str(getattr(optimizer, field))]
        if not optimizer.fused_step:
            cmd.append("--no-fused")
    return cmd + (["--compile"] if compile_ else []) + list(extra)


def hf(model, mb, steps, compile_, dropout=0.0, optimizer=None, extra=(), timeout=900):
    r = run(hf_cmd(model, mb, steps, compile_, dropout, optimizer, extra), timeout=timeout)
    if r.returncode != 0:
        return None, failure(r)
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


# Our candidates: a label and the train.py overrides that select it.
CANDIDATES = {
    "default": ("ours (default)", []),
    "unfused_ce": ("ours, megatron-core output layer + cross-entropy (fused CE off)",
                   ["model.fused_cross_entropy=false"]),
    "local": ("ours (mcore local attention)", ["model.attention_backend=local"]),
    "mcore_optim": ("ours, mcore's torch-fallback optimizer kernels",
                    ["optimizer.fused_step=false"]),
    "compile": ("ours + torch.compile per layer", ["model.torch_compile=true"]),
    "fused_ce": ("ours + fused chunked linear-CE", ["model.fused_cross_entropy=true"]),
    "keep_logits": ("ours + fused CE keeping the logits for backward "
                    "(model.fused_ce_keep_logits=true)", ["model.fused_ce_keep_logits=true"]),
    "recompute_logits": ("ours, fused CE recomputing the logits in backward "
                         "(model.fused_ce_keep_logits=false)", ["model.fused_ce_keep_logits=false"]),
    "qkv_rope": ("ours + RoPE in the QKV split (model.qkv_rope_fusion=true)",
                 ["model.qkv_rope_fusion=true"]),
    "ce_chunk4k": ("ours, fused CE in chunks of 4096 tokens (model.fused_ce_chunk_tokens=4096)",
                   ["model.fused_ce_chunk_tokens=4096"]),
    "cuda_graph": ("ours + CUDA graphs per layer", ["model.cuda_graph=true"]),
    "unfused_wgrad": ("ours, bf16 wgrad + separate fp32 add (model.fused_wgrad=false)",
                      ["model.fused_wgrad=false"]),
    "torch_kernels": ("ours, torch's LayerNorm and bias add (fused_norm, fused_bias_add off)",
                      ["model.fused_norm=false", "model.fused_bias_add=false"]),
    "torch_norm": ("ours, torch's LayerNorm (model.fused_norm=false)", ["model.fused_norm=false"]),
    "pageable": ("ours, batches in pageable host memory (data.pin_memory=false)",
                 ["data.pin_memory=false"]),
    "sync_steps": ("ours, host reads loss and grad norm every step (train.defer_step_stats=false)",
                   ["train.defer_step_stats=false"]),
    "fast": ("ours + fused CE + CUDA graphs", ["model.fused_cross_entropy=true",
                                              "model.cuda_graph=true"]),
    # position embeddings (issue: attention variants), default kernels otherwise
    "rope": ("ours, RoPE (default: fused Triton kernel)",
             ["model.position_embedding_type=rope"]),
    "alibi": ("ours, ALiBi (default kernel)",
              ["model.position_embedding_type=alibi"]),
    "alibi_flex": ("ours, ALiBi (FlexAttention)", ["model.position_embedding_type=alibi",
                                                   "model.alibi_kernel=flex"]),
    "alibi_cudnn": ("ours, ALiBi (cuDNN fused attention, its ALiBi mask)",
                    ["model.position_embedding_type=alibi", "model.alibi_kernel=cudnn"]),
    "alibi_augmented": ("ours, ALiBi (extra head dims through torch SDPA)",
                        ["model.position_embedding_type=alibi", "model.alibi_kernel=augmented"]),
    "sdpa_attention": ("ours, torch SDPA attention (model.cudnn_attention=false)",
                       ["model.cudnn_attention=false"]),
    "rope_unfused": ("ours, RoPE (megatron-core's unfused kernels)",
                     ["model.position_embedding_type=rope", "model.rope_fusion=false"]),
    # FP8 GEMMs in the transformer layers' linears (train.fp8)
    # (model.cuda_graph=null turns per-layer CUDA graphs on with FP8 on one GPU: the default)
    "fp8": ("ours + FP8 tensorwise (train.fp8=tensorwise; per-layer CUDA graphs, its default)",
            ["train.fp8=tensorwise"]),
    "fp8_delayed": ("ours + FP8 delayed scaling (train.fp8=delayed; per-layer CUDA graphs)",
                    ["train.fp8=delayed"]),
    "fp8_delayed_fused_act": ("ours + FP8 delayed, activation made in fc2's input cast "
                              "(model.fp8_fused_act=true)",
                              ["train.fp8=delayed", "model.fp8_fused_act=true"]),
    "fp8_delayed_fused_act_bwd": ("ours + FP8 delayed, activation made in fc2's input cast and "
                                  "fc1's output gradient cast in its backward "
                                  "(model.fp8_fused_act_backward=true)",
                                  ["train.fp8=delayed", "model.fp8_fused_act=true",
                                   "model.fp8_fused_act_backward=true"]),
    "fp8_best_store_dh": ("ours + FP8 delayed, both fused activation casts, fc1's output "
                          "gradient stored as at code 28a4d32 (FP8_STORE_ACT_GRAD=1; unused)",
                          ["train.fp8=delayed", "model.fp8_fused_act=true",
                           "model.fp8_fused_act_backward=true", "env:FP8_STORE_ACT_GRAD=1"]),
    "fp8_best_before": ("ours + FP8 delayed, both fused activation casts, as at code 28a4d32: "
                        "fc1's output gradient stored, QKV's bias added after its GEMM "
                        "(FP8_STORE_ACT_GRAD=1 FP8_QKV_BIAS_AFTER=1)",
                        ["train.fp8=delayed", "model.fp8_fused_act=true",
                         "model.fp8_fused_act_backward=true", "env:FP8_STORE_ACT_GRAD=1",
                         "env:FP8_QKV_BIAS_AFTER=1"]),
    "fp8_best_fast_bwd": ("ours + FP8 delayed, both fused activation casts, fast accumulation "
                          "in the backward GEMMs (model.fp8_backward_fast_accum=true)",
                          ["train.fp8=delayed", "model.fp8_fused_act=true",
                           "model.fp8_fused_act_backward=true",
                           "model.fp8_backward_fast_accum=true"]),
    "fp8_rowwise": ("ours + FP8 rowwise (train.fp8=rowwise; per-layer CUDA graphs)",
                    ["train.fp8=rowwise"]),
    "fp8_eager": ("ours + FP8 tensorwise, eager (model.cuda_graph=false)",
                  ["train.fp8=tensorwise", "model.cuda_graph=false"]),
}


LOG = 5  # our runs log (and so synchronise the host with the GPU) every LOG steps, as users do
DATA = "data=random"  # our speed runs' data (benchmarks/shapes.py ours_data describes it)


def _safe_name(text: str) -> str:
    """A file name from overrides: letters, digits, '.', '-' and '_' only."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:200]


def ours_overrides_for(model, mb, steps, dropout, extra=(), profile=False, shape=None):
    """train.py overrides of one of our runs (without the run/checkpoint directories)."""
    shape = shape or get_shape(model)
    windows = -(-steps // LOG)
    measured_end = LOG * (1 + windows)
    prof = [f"train.profile.steps=[{measured_end + 3},{measured_end + 4}]"] if profile else []
    # the baselines' data: ids uniform over the model's vocab (not data=mock's fixed cycle of a
    # few ids)
    return [*ours_overrides(shape, dropout), DATA,
            f"train.max_steps={measured_end + (LOG if profile else 0)}",
            f"train.log_interval={LOG}", "train.eval_interval=0",
            f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}",
            "train.progress_bar=false", "checkpoint.save=false", "parallel.data_parallel_size=1",
            *prof, *extra]


def ours(model, mb, steps, extra, profile_dir=None, dropout=0.0, timeout=900, shape=None,
         keep_config=False):
    """Time `steps` steps (rounded up to whole log windows) after one warm-up window, from
    train.py's own per-window step times; profile two more steps when `profile_dir` is set.
    `keep_config`: also return the run's own composed config (its .hydra/config.yaml)."""
    shape = shape or get_shape(model)
    windows = -(-steps // LOG)
    measured_end = LOG * (1 + windows)
    # "env:NAME=VALUE" entries of a candidate set the run's environment (benchmark A/B knobs),
    # the rest are train.py overrides
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    env.update(e[4:].split("=", 1) for e in extra if e.startswith("env:"))
    label = "_".join(extra) or "default"  # (profile file names: the env entries too)
    extra = [e for e in extra if not e.startswith("env:")]
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"),
               *ours_overrides_for(model, mb, steps, dropout, extra, bool(profile_dir), shape),
               f"checkpoint.dir={d}/ckpt", f"hydra.run.dir={d}/out"]
        r = run(cmd, env=env, timeout=timeout)
        if r.returncode != 0:
            return None, failure(r)
        recs = [json.loads(x) for x in open(f"{d}/out/metrics.jsonl") if '"loss"' in x]
        ran_config = None
        if keep_config:
            from omegaconf import OmegaConf

            from framework.config import Config

            # through the schema, as train.py does, so null fields (optimizer.min_lr, ...)
            # resolve to what the run used
            ran_config = OmegaConf.to_object(OmegaConf.merge(
                OmegaConf.structured(Config), OmegaConf.load(f"{d}/out/.hydra/config.yaml")))
        if profile_dir:
            from benchmarks.profile_summary import summarize

            for f in os.listdir(f"{d}/out/profile"):
                name = _safe_name(f"{model}_mb{mb}_{label}")
                summarize(f"{d}/out/profile/{f}", out=os.path.join(profile_dir, name + ".txt"))
    # the windows after the warm-up one and before the profiled one; each record's ms_per_iter is
    # its window's wall time / LOG, so their mean is total time / steps (as the HF baseline
    # measures), not a mean of per-step rates
    recs = [x for x in recs if LOG < x["step"] <= measured_end]
    assert len(recs) == windows, [x["step"] for x in recs]
    ms = sum(x["ms_per_iter"] for x in recs) / len(recs)
    med = sorted(x["ms_per_iter"] for x in recs)[len(recs) // 2]
    res = {"tok_s": mb * shape.seq / (ms / 1000), "ms_per_iter": ms, "median_ms": med,
           "window_ms": [round(x["ms_per_iter"], 2) for x in recs],
           "peak_gb": max(x["mem_gb"] or 0.0 for x in recs), "last_loss": recs[-1]["loss"]}
    if keep_config:
        res["config"] = ran_config
    fused = fused_adam_groups(r.stdout)
    if fused:
        res["fused_adam_groups"] = fused
    return res, ""


def fused_adam_groups(stdout: str):
    """[param groups on torch's fused AdamW kernel, param groups] from train.py's log line (GPU
    runs with optimizer.fused_step), or None where it printed none."""
    m = re.search(r"fused AdamW kernel in (\d+) of (\d+) param groups", stdout)
    return [int(m.group(1)), int(m.group(2))] if m else None


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_large", choices=sorted(SHAPES))
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="residual/embedding and attention dropout, on both sides")
    ap.add_argument("--hf-micro-batches", default="8,16")
    ap.add_argument("--hf-modes", default="eager,compile")
    ap.add_argument("--micro-batches", default="8,16")
    ap.add_argument("--runs", default="",
                    help="explicit candidate:micro-batch list, e.g. default:8,compile:16 "
                         "(overrides --micro-batches/--candidates)")
    ap.add_argument("--candidates", default="default,local",
                    help=f"comma-separated, from {sorted(CANDIDATES)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ours-extra", default="", help="space-separated overrides for train.py")
    ap.add_argument("--profile-dir", default=None,
                    help="also profile two steps of each of our runs; kernel tables go here")
    a = ap.parse_args()
    shape = get_shape(a.model)
    try:
        check_dropout(shape, a.dropout)
    except ValueError as e:
        ap.exit(2, f"error: --dropout: {e}\n")
    fpt = shape.flops_per_token()
    card = torch.cuda.get_device_name(0)
    rows = []
    for mb in [int(x) for x in a.hf_micro_batches.split(",") if x]:
        for mode in [m for m in a.hf_modes.split(",") if m]:
            res, err = hf(a.model, mb, a.steps, mode == "compile", a.dropout)
            rows.append((f"HF {'+ torch.compile' if mode == 'compile' else 'eager'} SDPA", mb,
                         res, err))
            print(rows[-1], flush=True)
    if a.profile_dir:
        os.makedirs(a.profile_dir, exist_ok=True)
    runs = ([(r.split(":")[0], int(r.split(":")[1])) for r in a.runs.split(",") if r] or
            [(c, mb) for mb in [int(x) for x in a.micro_batches.split(",") if x]
             for c in a.candidates.split(",") if c])
    for name, mb in runs:
        label, extra = CANDIDATES[name]
        res, err = ours(a.model, mb, a.steps, extra + a.ours_extra.split(), a.profile_dir,
                        dropout=a.dropout)
        rows.append((label, mb, res, err))
        print(rows[-1], flush=True)
    best = max((r[2]["tok_s"] for r in rows if r[2] and "compile" in r[0]), default=None)
    # ours with the defaults at each micro-batch: the baseline of the last column (the mean
    # where it ran more than once in the call, e.g. first and last to bound its drift)
    runs_at = {}
    for label, mb, res, _ in rows:
        if res and label == CANDIDATES["default"][0]:
            runs_at.setdefault(mb, []).append(res["tok_s"])
    default = {mb: sum(v) / len(v) for mb, v in runs_at.items()}
    print(f"\n{a.model}, seq {shape.seq}, dropout {a.dropout:g} (both sides), bf16, AdamW, "
          f"one {card}")
    print("| candidate | micro-batch | tok/s | MFU | peak GB | vs best HF+compile "
          "| vs ours (default; mean of its runs), same micro-batch |")
    print("|---|---|---|---|---|---|---|")
    for label, mb, res, err in rows:
        if res is None:
            last = err.strip().splitlines()[-1] if err and err.strip() else ""
            print(f"| {label} | {mb} | did not run: {last} | | | | |")
            continue
        mfu = res["tok_s"] * fpt / 989e12
        ratio = f"{res['tok_s'] / best:.2f}x" if best else "n/a"
        vs_default = f"{res['tok_s'] / default[mb]:.3f}x" if mb in default else "n/a"
        print(f"| {label} | {mb} | {res['tok_s']:.0f} | {100 * mfu:.1f}% | "
              f"{res['peak_gb']:.1f} | {ratio} | {vs_default} |")


if __name__ == "__main__":
    main()
