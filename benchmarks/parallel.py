"""Multi-GPU layouts of our GPT training, side by side on one machine in one run.

    python benchmarks/parallel.py [--model gpt2_large] [--runs dp1,dp4,guide] [--steps 10]

Each run is the real `train.py` on `data=random` (seeded token ids drawn uniformly over the
model's vocab, as in every speed benchmark here; bf16, AdamW). Reported: s/iteration, tokens/s
per GPU, MFU, peak memory and static memory (params + grads + optimizer state, allocated between
steps) of the logging rank, and derived figures:
* DP scaling efficiency = (tok/s/GPU at DP=d) / (tok/s/GPU at DP=1);
* distributed optimizer bytes/parameter = static memory / parameters per rank, against the
  6 + 12/d expected for bf16 params, fp32 grads and fp32 main params + Adam moments sharded d ways.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "data=random"  # as benchmarks/throughput.py's runs
DIMS = {"gpt2_small": (12, 768), "gpt2_medium": (24, 1024), "gpt2_large": (36, 1280),
        "gpt2_xl": (48, 1600)}
# name: (label, GPUs, micro-batch, global batch, overrides)
RUNS = {
    "dp1": ("DP1 + distributed optimizer", 1, 8, 8,
            ["parallel=dp_distopt", "parallel.data_parallel_size=1"]),
    "dp2": ("DP2 + distributed optimizer", 2, 8, 16,
            ["parallel=dp_distopt", "parallel.data_parallel_size=2"]),
    "dp4": ("DP4 + distributed optimizer", 4, 8, 32,
            ["parallel=dp_distopt", "parallel.data_parallel_size=4"]),
    "guide": ("guide: TP2.PP2 SP, selective recompute, distopt (ours, SDPA)", 4, 24, 48,
              ["parallel=guide", "parallel.data_parallel_size=1"]),
    "guide_local": ("guide layout, mcore local attention", 4, 24, 48,
                    ["parallel=guide", "parallel.data_parallel_size=1",
                     "model.attention_backend=local"]),
    "norecompute": ("1 GPU, no recompute", 1, 16, 16, ["parallel=single",
                                                       "parallel.data_parallel_size=1"]),
    "selective": ("1 GPU, selective recompute (core_attn)", 1, 16, 16,
                  ["parallel=single", "parallel.data_parallel_size=1",
                   "parallel.recompute_granularity=selective"]),
    "sel_layernorm": ("1 GPU, selective recompute (layernorm)", 1, 16, 16,
                      ["parallel=single", "parallel.data_parallel_size=1",
                       "parallel.recompute_granularity=selective",
                       "parallel.recompute_modules=[layernorm]"]),
    "sel_ln_attn": ("1 GPU, selective recompute (layernorm, core_attn)", 1, 16, 16,
                    ["parallel=single", "parallel.data_parallel_size=1",
                     "parallel.recompute_granularity=selective",
                     "parallel.recompute_modules=[layernorm,core_attn]"]),
    "sel_mlp": ("1 GPU, selective recompute (mlp)", 1, 16, 16,
                ["parallel=single", "parallel.data_parallel_size=1",
                 "parallel.recompute_granularity=selective", "parallel.recompute_modules=[mlp]"]),
    "sel_mlp_act": ("1 GPU, selective recompute (mlp_act)", 1, 16, 16,
                    ["parallel=single", "parallel.data_parallel_size=1",
                     "parallel.recompute_granularity=selective",
                     "parallel.recompute_modules=[mlp_act]"]),
    "sel_mlp_act_ln": ("1 GPU, selective recompute (mlp_act, layernorm)", 1, 16, 16,
                       ["parallel=single", "parallel.data_parallel_size=1",
                        "parallel.recompute_granularity=selective",
                        "parallel.recompute_modules=[mlp_act,layernorm]"]),
    "block18": ("1 GPU, full recompute of 18 of 36 layers (block)", 1, 16, 16,
                ["parallel=single", "parallel.data_parallel_size=1",
                 "parallel.recompute_granularity=full", "parallel.recompute_method=block",
                 "parallel.recompute_num_layers=18"]),
    "block12": ("1 GPU, full recompute of 12 of 36 layers (block)", 1, 16, 16,
                ["parallel=single", "parallel.data_parallel_size=1",
                 "parallel.recompute_granularity=full", "parallel.recompute_method=block",
                 "parallel.recompute_num_layers=12"]),
    "full": ("1 GPU, full recompute (uniform, 1 layer)", 1, 16, 16,
             ["parallel=single", "parallel.data_parallel_size=1",
              "parallel.recompute_granularity=full", "parallel.recompute_method=uniform"]),
    # the setting selective recompute was designed for: a core attention that materialises the
    # [s, s] scores (mcore's local spec); flash-style SDPA never holds them, so against SDPA
    # there is little for core_attn recompute to save
    "local_norecompute": ("1 GPU, mcore local attention, no recompute", 1, 16, 16,
                          ["parallel=single", "parallel.data_parallel_size=1",
                           "model.attention_backend=local"]),
    "local_selective": ("1 GPU, mcore local attention, selective recompute (core_attn)", 1, 16,
                        16, ["parallel=single", "parallel.data_parallel_size=1",
                             "model.attention_backend=local",
                             "parallel.recompute_granularity=selective"]),
}


def params_per_rank_gpt(layers, hidden, vocab=50304, seq=1024, tp=1):
    per_layer = 12 * hidden * hidden + 13 * hidden
    return (layers * per_layer + vocab * hidden + seq * hidden + 2 * hidden) / tp


def run(model, name, steps):
    label, ngpu, mb, gbs, extra = RUNS[name]
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"model={model}", DATA,
               f"train.max_steps={steps + 3}", "train.log_interval=1", "train.eval_interval=0",
               f"train.micro_batch_size={mb}", f"train.global_batch_size={gbs}",
               "train.progress_bar=false", "checkpoint.save=false",
               f"checkpoint.dir={d}/ckpt", f"hydra.run.dir={d}/out", *extra]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(ngpu))))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            if os.environ.get("BENCH_FAIL_LOG_DIR"):  # keep the whole output of a failed run
                os.makedirs(os.environ["BENCH_FAIL_LOG_DIR"], exist_ok=True)
                with open(os.path.join(os.environ["BENCH_FAIL_LOG_DIR"], f"{name}.log"), "w") as f:
                    f.write(r.stdout + "\n----- stderr -----\n" + r.stderr)
            tail = (r.stderr + r.stdout).strip().splitlines()
            return label, ngpu, None, ("OOM" if "out of memory" in r.stderr.lower()
                                       else (tail[-1] if tail else "failed"))
        recs = [json.loads(x) for x in open(f"{d}/out/metrics.jsonl") if '"loss"' in x][3:]
    n = len(recs)
    s_it = sum(x["ms_per_iter"] for x in recs) / n / 1000
    return label, ngpu, {
        "s_it": s_it, "median_s_it": sorted(x["ms_per_iter"] for x in recs)[n // 2] / 1000,
        # rate of the mean step time, not the mean of per-step rates (biased by slow steps)
        "tok_s_gpu": gbs * 1024 / s_it / ngpu,
        "mfu": (gbs * 1024 / s_it / ngpu) * (recs[0]["mfu"] or 0)
        / recs[0]["tokens_per_sec_per_gpu"],
        "peak_gb": max(x["mem_gb"] for x in recs),
        "static_gb": recs[-1].get("mem_static_gb"), "mb": mb, "gbs": gbs}, ""


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_large")
    ap.add_argument("--runs", default="dp1,dp4,guide")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    res = {}
    for name in a.runs.split(","):
        res[name] = run(a.model, name, a.steps)
        print(name, res[name], flush=True)
    print(f"\n{a.model}, seq 1024, bf16, AdamW, {torch.cuda.device_count()} x {card}")
    print("| run | GPUs | micro/global batch | s/it (mean) | s/it (median) | tok/s/GPU | MFU | "
          "peak GB | static GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (label, ngpu, r, err) in res.items():
        if r is None:
            print(f"| {label} | {ngpu} | | did not run: {err} | | | | | |")
            continue
        print(f"| {label} | {ngpu} | {r['mb']}/{r['gbs']} | {r['s_it']:.3f} | "
              f"{r['median_s_it']:.3f} | "
              f"{r['tok_s_gpu']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gb']:.1f} | "
              f"{r['static_gb']:.2f} |")
    layers, hidden = DIMS[a.model]
    n_params = params_per_rank_gpt(layers, hidden)
    base = res.get("dp1", (None, None, None))[2]
    for name in ("dp2", "dp4"):
        got = res.get(name, (None, None, None))[2]
        d = int(name[2:])
        if base and got:
            print(f"DP scaling 1->{d}: {100 * got['tok_s_gpu'] / base['tok_s_gpu']:.1f}% "
                  f"efficiency")
            print(f"distributed optimizer, d={d}: {got['static_gb'] * 2**30 / n_params:.2f} "
                  f"bytes/param measured, {6 + 12 / d:.2f} expected (6 + 12/d); "
                  f"d=1: {base['static_gb'] * 2**30 / n_params:.2f} (18 expected)")
    if "norecompute" in res and "selective" in res and res["norecompute"][2] and \
            res["selective"][2]:
        a0, a1 = res["norecompute"][2], res["selective"][2]
        act0, act1 = a0["peak_gb"] - a0["static_gb"], a1["peak_gb"] - a1["static_gb"]
        print(f"selective recompute: activation memory {act1:.1f} vs {act0:.1f} GB "
              f"({100 * (1 - act1 / act0):.0f}% less), time {a1['s_it'] / a0['s_it']:.3f}x")
    if "guide" in res and "guide_local" in res and res["guide"][2] and res["guide_local"][2]:
        print(f"guide layout: ours {res['guide'][2]['s_it']:.3f} s/it, local spec "
              f"{res['guide_local'][2]['s_it']:.3f} s/it: "
              f"{res['guide_local'][2]['s_it'] / res['guide'][2]['s_it']:.2f}x")


if __name__ == "__main__":
    main()
