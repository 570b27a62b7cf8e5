"""Attention kernels, forward + backward, side by side on one GPU in one run.

    python benchmarks/attention.py [--batch 8 --heads 20 --seq 1024 --dim 64] [--dtype bf16]

Candidates: causal SDPA (no position bias: the floor), FlexAttention ALiBi (`score_mod` + causal
block mask, compiled once; what `SDPAttention` uses on GPU), SDPA with a dense ALiBi bias (what
it uses with dropout, padding masks or KV-cache decoding). Prints a table with the card's name;
times are medians of CUDA-event timings.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(fn, warmup=10, iters=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    from framework.models.attention_variants import alibi_bias, alibi_slopes, flex_alibi

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    b, n, s, d = args.batch, args.heads, args.seq, args.dim
    q, k, v = (torch.randn(b, n, s, d, device=dev, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(b, n, s, d, device=dev, dtype=dtype)
    slopes = alibi_slopes(n).float().to(dev)
    scale = d ** -0.5
    dense = alibi_bias(slopes, s, s, dev, dtype)

    def step(f):
        def run():
            out = f()
            out.backward(grad)
            q.grad = k.grad = v.grad = None
        return run

    cands = {
        "causal SDPA (no bias)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        scale=scale),
        "FlexAttention ALiBi (score_mod)": lambda: flex_alibi(q, k, v, slopes, scale),
        "SDPA + dense ALiBi bias": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                          attn_mask=dense,
                                                                          scale=scale),
    }
    # correctness first: the ALiBi candidates agree
    with torch.no_grad():
        ref = cands["SDPA + dense ALiBi bias"]().float()
        got = cands["FlexAttention ALiBi (score_mod)"]().float()
        err = (ref - got).abs().max().item()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  B{b} H{n} S{s} D{d} "
          f"{args.dtype}  fwd+bwd  (max |flex - dense| = {err:.2e})")
    print(f"| {'kernel':<34}| ms     |")
    print(f"|{'-' * 35}|--------|")
    for name, f in cands.items():
        print(f"| {name:<34}| {bench(step(f)):6.3f} |")


if __name__ == "__main__":
    main()
