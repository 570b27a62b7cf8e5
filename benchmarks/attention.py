"""Attention kernels, forward + backward, side by side on one GPU in one run.

    python benchmarks/attention.py [--batch 8 --heads 20 --seq 1024 --dim 64] [--dtype bf16]

Candidates: causal SDPA (no position bias: the floor); ALiBi as extra q/k head dims through
SDPA's causal kernels (`model.alibi_kernel=augmented`, the default: v keeps head dim d; also v
padded, and single backends forced); FlexAttention ALiBi (`score_mod` + causal block mask,
compiled once; `model.alibi_kernel=flex`); SDPA with a dense ALiBi bias (padding masks, KV-cache
decoding). Prints a table with the card's name; times are medians of CUDA-event timings.

FlexAttention's Triton kernels are also timed under several `kernel_options` (block sizes, warps,
TMA) and with inductor's autotuning (`--autotune`), so the default in
framework/fast/alibi.py (FLEX_KERNEL_OPTIONS) and `model.flex_kernel_options`
can be chosen from measurements. The last line names the fastest ALiBi setting and its ratio to
causal SDPA.
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


def kernel_ms(fn, iters=20):
    """GPU kernel time per call (CUPTI, summed over the call's kernels and copies): the
    attention time itself, without the host's launch gaps that event timing of a short call
    also counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(getattr(e, "device_time", None) or e.cuda_time for e in prof.events()
             if e.device_type == DeviceType.CUDA)
    return us / 1000 / iters


def main():
    from framework.fast.alibi import alibi_bias, alibi_slopes, flex_alibi

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--variants", default="all",
                    help="FlexAttention kernel-option variants: all, none, or a comma list of "
                         "labels from FLEX_VARIANTS")
    ap.add_argument("--layout", default="bhsd", choices=["bhsd", "sbhd"],
                    help="q/k/v memory layout: contiguous [b, n, s, d], or [b, n, s, d] views of "
                         "[s, b, n, d] tensors (what mcore's attention hands the core attention)")
    ap.add_argument("--autotune", action="store_true",
                    help="also time flex_attention compiled with max-autotune (slow to compile)")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    b, n, s, d = args.batch, args.heads, args.seq, args.dim
    if args.layout == "bhsd":
        q, k, v = (torch.randn(b, n, s, d, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
    else:  # leaves in mcore's [s, b, n, d] layout, viewed as [b, n, s, d]
        leaves = [torch.randn(s, b, n, d, device=dev, dtype=dtype, requires_grad=True)
                  for _ in range(3)]
        q, k, v = (t.permute(1, 2, 0, 3) for t in leaves)
    grad = torch.randn(b, n, s, d, device=dev, dtype=dtype)
    slopes = alibi_slopes(n).float().to(dev)
    scale = d ** -0.5
    dense = alibi_bias(slopes, s, s, dev, dtype)

    def flex_causal():
        from framework.fast.alibi import (FLEX_KERNEL_OPTIONS, _flex,
                                                         causal_block_mask)

        return _flex()(q, k, v, block_mask=causal_block_mask(s, s, dev), scale=scale,
                       kernel_options=dict(FLEX_KERNEL_OPTIONS))

    def step(f):
        def run():
            out = f()
            if args.layout == "bhsd":
                out.backward(grad)
                q.grad = k.grad = v.grad = None
            else:  # as in the model: the output goes back to [s, b, n*d]
                out.permute(2, 0, 1, 3).reshape(s, b, n * d).backward(
                    grad.permute(2, 0, 1, 3).reshape(s, b, n * d))
                for t in leaves:
                    t.grad = None
        return run

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from framework.fast.alibi import alibi_augment, alibi_q_columns

    qcols = alibi_q_columns(slopes, scale, d, dtype)

    def augmented(backend=None, pad_v=False):
        # what SDPAttention runs with model.alibi_kernel=augmented (the default): v unpadded
        q2, k2 = alibi_augment(q, k, qcols)
        v2 = F.pad(v, (0, q2.shape[-1] - d)) if pad_v else v
        if backend is None:
            out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale)
        return out[..., :d]

    cands = {
        "causal SDPA (no bias)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        scale=scale),
        "SDPA ALiBi as extra q/k head dims (d+8), v d": lambda: augmented(),
        "  ALiBi extra dims, v padded too": lambda: augmented(pad_v=True),
        "  ALiBi extra dims, v padded, cuDNN only": lambda: augmented(
            SDPBackend.CUDNN_ATTENTION, True),
        "  ALiBi extra dims, v padded, flash only": lambda: augmented(
            SDPBackend.FLASH_ATTENTION, True),
        "  ALiBi extra dims, v d, cuDNN only": lambda: augmented(SDPBackend.CUDNN_ATTENTION),
        "  ALiBi extra dims, v d, mem-efficient only": lambda: augmented(
            SDPBackend.EFFICIENT_ATTENTION),
        "FlexAttention ALiBi (score_mod)": lambda: flex_alibi(q, k, v, slopes, scale),
        "SDPA + dense ALiBi bias": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                          attn_mask=dense,
                                                                          scale=scale),
        "FlexAttention causal, no bias (flex's own floor)": lambda: flex_causal(),
    }
    from framework.fast import cudnn_attention

    if cudnn_attention.available():  # nvidia-cudnn-frontend installed (a Linux x86_64 dependency)
        cands["cuDNN frontend causal (no bias)"] = (
            lambda: cudnn_attention.cudnn_causal_attention(q, k, v, scale))
        cands["cuDNN ALiBi mask (cuDNN's slopes, TP1)"] = (
            lambda: cudnn_attention.cudnn_causal_attention(q, k, v, scale, mode="alibi"))
        cands["cuDNN causal + ALiBi bias tensor (any TP)"] = (
            lambda: cudnn_attention.cudnn_causal_attention(q, k, v, scale, slopes, mode="bias"))
    else:
        print("# cuDNN frontend not importable: its candidates are skipped")
    # FlexAttention ALiBi under other Triton kernel options (merged over FLEX_KERNEL_OPTIONS)
    for label, opts in FLEX_VARIANTS.items():
        if args.variants == "none" or (args.variants != "all" and label not in args.variants):
            continue
        cands[f"Flex ALiBi {label}"] = (lambda o=opts: flex_alibi(q, k, v, slopes, scale, o))
    if args.autotune:
        from torch.nn.attention.flex_attention import flex_attention

        from framework.fast.alibi import FLEX_KERNEL_OPTIONS, causal_block_mask

        tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")

        def autotuned():
            def score_mod(score, b_, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            return tuned(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(s, s, dev),
                         scale=scale, kernel_options=dict(FLEX_KERNEL_OPTIONS))
        cands["Flex ALiBi, inductor max-autotune"] = autotuned
    # correctness first: the ALiBi candidates agree
    with torch.no_grad():
        ref = cands["SDPA + dense ALiBi bias"]().float()
        got = cands["FlexAttention ALiBi (score_mod)"]().float()
        err = (ref - got).abs().max().item()
        err_aug = (ref - cands["SDPA ALiBi as extra q/k head dims (d+8), v d"]().float()).abs().max()
        for name in [c for c in cands if c.startswith("cuDNN")]:
            try:
                dev_ = (ref - cands[name]().float()).abs().max().item()
                print(f"# max |{name} - dense (our slopes)| = {dev_:.2e}")
            except Exception as e:  # the row below reports it too
                print(f"# {name} failed: {type(e).__name__}: {str(e)[:300]}")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  B{b} H{n} S{s} D{d} "
          f"{args.dtype}  fwd+bwd  (max |flex - dense| = {err:.2e}, max |extra dims - dense| = "
          f"{err_aug.item():.2e})")
    # rows are printed as they are measured (a slow autotune at the end cannot lose the table)
    print(f"# layout {args.layout}; 'ms' = CUDA events around each call (host gaps included), "
          "'kernel ms' = the GPU's kernel time per call (profiler)")
    print(f"| {'kernel':<48}| ms     | vs causal SDPA | kernel ms | vs causal SDPA |")
    print(f"|{'-' * 49}|--------|----------------|-----------|----------------|", flush=True)
    times, ktimes = {}, {}
    for name, f in cands.items():
        try:
            times[name] = bench(step(f))
            ktimes[name] = kernel_ms(step(f))
        except Exception as e:  # a kernel option the installed Triton/inductor rejects
            times[name] = ktimes[name] = None
            print(f"| {name:<48}| failed |                |           |                | "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                  flush=True)
            continue
        floor, kfloor = times["causal SDPA (no bias)"], ktimes["causal SDPA (no bias)"]
        print(f"| {name:<48}| {times[name]:6.3f} | {times[name] / floor:13.2f}x | "
              f"{ktimes[name]:9.3f} | {ktimes[name] / kfloor:13.2f}x |", flush=True)
    floor, kfloor = times["causal SDPA (no bias)"], ktimes["causal SDPA (no bias)"]
    for label, tab, base in (("events", times, floor), ("kernel time", ktimes, kfloor)):
        alibi = {n: t for n, t in tab.items() if t is not None and "ALiBi" in n}
        best = min(alibi, key=alibi.get)
        print(f"fastest ALiBi ({label}): {best}: {alibi[best]:.3f} ms = "
              f"{alibi[best] / base:.2f}x causal SDPA")


# Triton kernel options for FlexAttention on Hopper-class GPUs (fwd_/bwd_ prefixes apply to one
# direction only; inductor's defaults for bf16 d=64 on sm90: fwd 128x128, 4 warps, 3 stages;
# bwd 64/128/128/64, 8 warps, 3 stages)
FLEX_VARIANTS = {
    "+USE_TMA": {"USE_TMA": True},
    "fwd 128x64 w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4,
                      "fwd_num_stages": 3},
    "fwd 128x64 w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8,
                      "fwd_num_stages": 3},
    "bwd 32/128/128/32 w4": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                             "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd 64/64/64/64 w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                           "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "PRESCALE_QK": {"PRESCALE_QK": True},
    "bwd 64/128/128/64 w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                             "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd 64/128/128/64 w8 s2": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2},
    "bwd 128/128/128/128 w8": {"bwd_BLOCK_M1": 128, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                               "bwd_BLOCK_N2": 128, "bwd_num_warps": 8, "bwd_num_stages": 2},
    "fwd 128x128 w8 s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8,
                          "fwd_num_stages": 2},
    "BLOCKS_ARE_CONTIGUOUS": {"BLOCKS_ARE_CONTIGUOUS": True},
}


if __name__ == "__main__":
    main()
