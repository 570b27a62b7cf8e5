"""A long CPU run of a tiny model: do memory, step time and disk use stay flat? (not in CI)

    python benchmarks/soak.py                       # 20,000 steps (about an hour on 2 cores)
    python benchmarks/soak.py --steps 1500          # a short version

Runs `train.py` (one process, CPU) on the embedded corpus with log, eval and save intervals of
100 and `checkpoint.keep_last=3`, samples the resident memory of the process tree (RSS, psutil)
and the checkpoint directory's size every `--sample-s` seconds, and reads each log record's
ms/iter (train steps only: eval and save time are not in it). Prints a Markdown table comparing
the first 1,000 steps with the last 1,000: median step time, median and max RSS, and the disk
high-water mark against what keep_last allows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model=gpt_tiny", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.seq_length=64", "train.micro_batch_size=8",
        "train.global_batch_size=8", "train.device=cpu", "train.progress_bar=false"]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed by retention while we walk
                pass
    return total


class Tail:
    """New complete lines of a growing file."""

    def __init__(self, path: str):
        self.path, self.offset, self.rest = path, 0, ""

    def lines(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        text = self.rest + chunk
        *done, self.rest = text.split("\n")
        return done


def window(values, lo, hi):
    return [v for s, v in values if lo < s <= hi]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--interval", type=int, default=100, help="log, eval and save interval")
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--window", type=int, default=1000, help="steps compared at each end")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.window <= args.interval or args.steps < 2 * args.window:
        ap.error(f"--window={args.window} must exceed --interval={args.interval}, and --steps="
                 f"{args.steps} must be at least twice --window")
    out = args.out or tempfile.mkdtemp(prefix="soak-")
    ck, run = os.path.join(out, "ck"), os.path.join(out, "run")
    shutil.rmtree(ck, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY,
           f"train.max_steps={args.steps}", f"train.log_interval={args.interval}",
           f"train.eval_interval={args.interval}", f"checkpoint.save_interval={args.interval}",
           f"checkpoint.keep_last={args.keep_last}", f"checkpoint.dir={ck}",
           f"hydra.run.dir={run}", f"optimizer.lr_decay_steps={args.steps}"]
    print(" ".join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    ps = psutil.Process(proc.pid)
    tail = Tail(os.path.join(run, "metrics.jsonl"))
    step, rss, disk, times, evals = 0, [], [], [], []
    ckpt_sizes = []  # one committed checkpoint's bytes
    while proc.poll() is None:
        for line in tail.lines():
            rec = json.loads(line)
            step = max(step, rec.get("step", 0))
            if "ms_per_iter" in rec:
                times.append((rec["step"], rec["ms_per_iter"]))
            if "eval_loss" in rec:
                evals.append((rec["step"], rec["eval_loss"]))
        rss.append((step, tree_rss(ps)))
        disk.append((step, dir_bytes(ck)))
        if not ckpt_sizes and os.path.isdir(ck):
            done = sorted(d for d in os.listdir(ck) if d.startswith("iter_")
                          and not d.endswith(".tmp"))
            if len(done) >= 2:
                ckpt_sizes.append(dir_bytes(os.path.join(ck, done[0])))
        time.sleep(args.sample_s)
    err = proc.stderr.read()
    for line in tail.lines():
        rec = json.loads(line)
        if "ms_per_iter" in rec:
            times.append((rec["step"], rec["ms_per_iter"]))
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    wall = time.time() - t0
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        return proc.returncode
    w, n = args.window, args.steps
    # the first log record includes start-up (imports, first-step allocations): leave it out
    first_t = window(times, args.interval, w)
    last_t = window(times, n - w, n)
    first_m = window(rss, 0, w)
    last_m = window(rss, n - w, n)
    kept = sorted(d for d in os.listdir(ck) if d.startswith("iter_"))
    one = ckpt_sizes[0] if ckpt_sizes else 0
    bound = (args.keep_last + 1) * one  # keep_last + the one being written
    med = statistics.median
    mib = 2**20

    def drift(a, b):
        return f"{100 * (b - a) / a:+.1f}%"

    cpu = platform.processor() or platform.machine()
    print(f"\n## Soak: {n} steps, tiny GPT on CPU ({os.cpu_count()} cores, {cpu}), "
          f"{time.strftime('%Y-%m-%d')}, wall {wall / 60:.1f} min")
    print(f"intervals {args.interval} (log, eval, save), keep_last={args.keep_last}, "
          f"{len(rss)} memory samples, {len(times)} log records, {len(evals)} evals\n")
    print(f"| quantity | steps {args.interval + 1}-{w} | steps {n - w + 1}-{n} | drift |")
    print("|---|---|---|---|")
    print(f"| median ms/iter | {med(first_t):.1f} | {med(last_t):.1f} | "
          f"{drift(med(first_t), med(last_t))} |")
    print(f"| median RSS (MiB) | {med(first_m) / mib:.1f} | {med(last_m) / mib:.1f} | "
          f"{drift(med(first_m), med(last_m))} |")
    print(f"| max RSS (MiB) | {max(first_m) / mib:.1f} | {max(last_m) / mib:.1f} | "
          f"{drift(max(first_m), max(last_m))} |")
    print(f"\ncheckpoint dir: high-water {max(v for _, v in disk) / mib:.1f} MiB, at the end "
          f"{dir_bytes(ck) / mib:.1f} MiB in {len(kept)} checkpoints ({', '.join(kept)}); one "
          f"checkpoint {one / mib:.1f} MiB, keep_last+1 = {bound / mib:.1f} MiB")
    print(f"eval loss {evals[0][1]:.3f} at step {evals[0][0]} -> {evals[-1][1]:.3f} at "
          f"{evals[-1][0]}")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    ok = max(v for _, v in disk) <= bound * 1.05 and len(kept) <= args.keep_last
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
