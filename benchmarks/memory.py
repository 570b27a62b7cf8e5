"""Memory of recompute settings and of the distributed optimizer, side by side in one run.

    python benchmarks/memory.py [--model gpt2_large] [--recompute norecompute,selective,...]
                                [--distopt dp1,dp2,dp4] [--steps 6]

Each run is the real `train.py` on `data=random` (bf16, AdamW), launched by
benchmarks/parallel.py's `run`. Reported per run: peak and static memory (params + grads +
optimizer state, allocated between steps) of the logging rank, and
* activation memory = peak - static, and its change against no recompute, with the step-time
  ratio (the issue's target: >= 50% less at <= 5% slower); `local_*` rows (mcore's local
  attention, which holds the [s, s] scores) compare with `local_norecompute`;
* distributed-optimizer bytes per parameter = static / parameters per rank, against
  6 + 12/d (bf16 params, fp32 grads, fp32 main params and Adam moments sharded d ways).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.parallel import DIMS, RUNS, params_per_rank_gpt, run  # noqa: E402


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_large")
    ap.add_argument("--recompute",
                    default="norecompute,selective,sel_layernorm,sel_mlp,block12,block18,full")
    ap.add_argument("--distopt", default="dp1,dp2,dp4")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    ngpu = torch.cuda.device_count()
    rec = [n for n in a.recompute.split(",") if n]
    dist = [n for n in a.distopt.split(",") if n and RUNS[n][1] <= ngpu]
    res = {}
    for name in rec + dist:
        res[name] = run(a.model, name, a.steps)
        print(name, res[name], flush=True)
    print(f"\n{a.model}, seq 1024, bf16, AdamW, {ngpu} x {card}")
    if rec:
        print("| recompute | micro-batch | s/it | peak GB | static GB | activations GB | "
              "activations vs none | time vs none |")
        print("|---|---|---|---|---|---|---|---|")
        for name in rec:
            # local-attention rows compare with local attention without recompute
            base = res.get("local_norecompute" if name.startswith("local_") else "norecompute",
                           (None, None, None, None))[2]
            label, _, r, err = res[name]
            if r is None:
                print(f"| {label} | | did not run: {err} | | | | | |")
                continue
            act = r["peak_gb"] - r["static_gb"]
            rel = (f"{100 * (act / (base['peak_gb'] - base['static_gb']) - 1):+.0f}%"
                   if base else "n/a")
            tim = f"{r['s_it'] / base['s_it']:.3f}x" if base else "n/a"
            print(f"| {label} | {r['mb']} | {r['s_it']:.3f} | {r['peak_gb']:.2f} | "
                  f"{r['static_gb']:.2f} | {act:.2f} | {rel} | {tim} |")
    if dist:
        layers, hidden = DIMS[a.model]
        n_params = params_per_rank_gpt(layers, hidden)
        print("\n| distributed optimizer | GPUs (d) | static GB | bytes/param | expected 6+12/d |")
        print("|---|---|---|---|---|")
        for name in dist:
            label, d, r, err = res[name]
            if r is None:
                print(f"| {label} | {d} | did not run: {err} | | |")
                continue
            print(f"| {label} | {d} | {r['static_gb']:.2f} | "
                  f"{r['static_gb'] * 2**30 / n_params:.2f} | {6 + 12 / d:.2f} |")


if __name__ == "__main__":
    main()
