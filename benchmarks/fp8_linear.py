"""One transformer linear, forward + backward, bf16 against FP8 (`train.fp8`), one GPU, one run.

    python benchmarks/fp8_linear.py [--model gpt2_xl] [--tokens 16384] [--torchao] [--compile]

Shapes: the four linears of one layer (QKV, attention projection, fc1, fc2) at --tokens tokens.
Candidates, each timed with CUDA events over 30 iterations after 10 warm-up ones, the weight
gradient accumulated into an fp32 main grad as in training (`model.fused_wgrad`):
* bf16: the three GEMMs as megatron-core runs them with our fused wgrad (x @ w^T, dy @ w,
  main_grad += dy^T @ x through torch.addmm with out_dtype=float32);
* ours, tensorwise and rowwise (framework/fast/fp8.py: amax reductions, Triton casts,
  torch._scaled_mm, main_grad += the fp32 wgrad);
* ours, tensorwise and delayed, with the weight-gradient GEMM writing main_grad (what training
  runs with one micro-batch per step; delayed: no amax pass before each cast);
* with --torchao (torchao installed): torchao's Float8Linear, tensorwise, eager (its casts are
  plain torch ops) and, with --compile, under torch.compile (how torchtitan runs it); its weight
  gradient is a bf16 .grad, not accumulated into a main grad.
Prints a table of ms per layer-linear and the ratio to bf16.

With --parts, also where the FP8 layer's time goes, per shape:
* `kernels`: the GPU kernel time of one forward + backward (torch.profiler, kernels summed),
  against the wall time above: a wall time well above the kernel time means the host (Python,
  launches) is the limit, not the GPU;
* `graphed`: the same step captured in one CUDA graph (no host work per kernel);
* `gemms only`: the three `torch._scaled_mm` calls alone on operands cast once outside the loop
  (the FP8 GEMM floor), with the weight gradient's output in fp32 (as `train.fp8` runs it) and in
  bf16;
* the top kernels of the FP8 step;
* `host`: each piece's host (CPU) time per call, from tiny tensors (64 x 64) whose GPU work is
  negligible, so that the loop is bound by the host: what a layer costs the CPU however fast
  the GPU is.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DIMS = {"gpt2_large": (1280, 20), "gpt2_xl": (1600, 25), "llama_1b": (2048, 16)}


def shapes(model):
    h, _ = DIMS[model]
    return {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, 4 * h), "fc2": (4 * h, h)}


def kernel_ms(fn, iters=10):
    """GPU kernel time per call of fn: the kernels' durations in a torch.profiler trace, summed
    (overlap between streams is counted twice; these steps run on one stream)."""
    import json
    import tempfile
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    per = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            per[e["name"][:90]] += e.get("dur", 0.0) / 1000 / iters
    return sum(per.values()), sorted(per.items(), key=lambda kv: -kv[1])


def graphed(fn):
    """fn captured in one CUDA graph (warmed up on a side stream first, as torch asks)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def gemms_only(x, w, dy, main_grad, wgrad_dtype):
    """The FP8 layer's three GEMMs on operands cast once, outside the timed step."""
    from framework.fast.fp8 import E4M3, E5M2, cast_tensorwise, mm8

    x8, x8t, x_inv = cast_tensorwise(x, E4M3, rows=True, cols=True)
    w8, w8t, w_inv = cast_tensorwise(w, E4M3, rows=True, cols=True)
    dy8, dy8t, dy_inv = cast_tensorwise(dy, E5M2, rows=True, cols=True)

    def step():
        mm8(x8, x_inv, w8, w_inv, torch.bfloat16, fast_accum=True)
        mm8(dy8, dy_inv, w8t, w_inv, torch.bfloat16)
        dw = mm8(dy8t, dy_inv, x8t, x_inv, wgrad_dtype)
        main_grad.add_(dw)
    return step


def host_us(fn, iters=300):
    """Host time per call of fn (tiny GPU work: the loop waits on the CPU, not the GPU)."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def host_table():
    """Host microseconds per call of each piece of the FP8 linear, at 64 x 64 x 64."""
    from framework.fast import fp8

    x = torch.randn(64, 64, device="cuda").bfloat16()
    w = (torch.randn(64, 64, device="cuda") * 0.02).bfloat16()
    dy = (torch.randn(64, 64, device="cuda") * 1e-3).bfloat16()
    main_grad = torch.zeros(64, 64, device="cuda")
    amax = fp8.amax_of(x)
    x8, x8t, inv = fp8.cast(x, amax, fp8.E4M3, None, rows=True, cols=True)
    xx = x.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    ww.main_grad = main_grad

    def apply_raw():
        fp8._Fp8Linear.apply(xx, ww, None, "tensorwise", "column", True, False, False,
                             None, None, False, None, None).backward(dy)
    rows = {
        "bf16 linear fwd+bwd (mcore's three GEMMs)": bf16_step(x, w, dy, main_grad),
        "fp8_linear fwd+bwd (as train.fp8 calls it)": ours_step("tensorwise", x, w, dy,
                                                                main_grad),
        "_Fp8Linear.apply fwd+bwd (no compiler.disable wrapper)": apply_raw,
        "amax_of (Triton partials)": lambda: fp8.amax_of(x),
        "torch amax (vector_norm inf)": lambda: torch.linalg.vector_norm(x, float("inf")),
        "cast, rows + cols (one Triton launch)": lambda: fp8.cast(x, amax, fp8.E4M3, None,
                                                                  rows=True, cols=True),
        "cast_tensorwise (amax + cast)": lambda: fp8.cast_tensorwise(x, fp8.E4M3, rows=True,
                                                                     cols=True),
        "torch._scaled_mm": lambda: fp8.mm8(x8, inv, x8, inv, torch.bfloat16, fast_accum=True),
        "torch.matmul bf16": lambda: torch.matmul(x, w.t()),
        "torch.empty": lambda: torch.empty((64, 64), device="cuda"),
    }
    print("\nHost time per call (us), 64 x 64 tensors (GPU work negligible: the CPU is the limit)")
    print("| piece | host us |")
    print("|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)
    # which Python functions make up the FP8 layer's host time: cProfile of 200 calls
    import cProfile
    import pstats

    step = rows["fp8_linear fwd+bwd (as train.fp8 calls it)"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    prof.disable()
    print("\ncProfile of 200 fp8_linear fwd+bwd calls (64 x 64), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def time_ms(fn, warmup=10, iters=30):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bf16_step(x, w, dy, main_grad):
    def step():
        torch.matmul(x, w.t())
        torch.matmul(dy, w)
        torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)
    return step


def ours_step(recipe, x, w, dy, main_grad, overwrite=False):
    """`train.fp8`'s linear; recipe "delayed" with an amax history of its own (primed by the
    first call; not rolled, which costs nothing per layer); `overwrite`: the weight-gradient
    GEMM writes main_grad (one micro-batch per step) instead of adding its product."""
    from framework.fast.fp8 import Fp8History, fp8_linear

    w = w.detach().requires_grad_()
    w.main_grad = main_grad
    xx = x.detach().requires_grad_()
    meta = None
    if recipe == "delayed":
        holder = type("Layer", (), {})()
        Fp8History([holder], x.device)
        meta = holder.fp8_meta

    def step():
        y = fp8_linear(xx, w, None, recipe, "column", True, False, False, None, meta, overwrite)
        y.backward(dy)
        xx.grad = None
    return step


def torchao_step(x, w, dy, compile_):
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda",
                          dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = Float8Linear.from_float(lin, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    fn = torch.compile(f8) if compile_ else f8
    xx = x.detach().requires_grad_()

    def step():
        fn(xx).backward(dy)
        xx.grad = None
        f8.weight.grad = None
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_xl", choices=sorted(DIMS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--torchao", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also torchao under torch.compile")
    ap.add_argument("--parts", action="store_true",
                    help="also kernel time, CUDA-graphed and GEMM-only rows, top kernels, "
                         "host time")
    ap.add_argument("--host-only", action="store_true", help="only the host-time table")
    a = ap.parse_args()
    if a.host_only:
        return host_table()
    g = torch.Generator(device="cuda").manual_seed(0)
    cands = ["bf16", "ours tensorwise", "ours tensorwise, wgrad written",
             "ours delayed, wgrad written", "ours rowwise"]
    if a.torchao:
        cands += ["torchao tensorwise (eager)"] + (["torchao tensorwise (compile)"]
                                                   if a.compile else [])
    table = {c: {} for c in cands}
    parts = {}
    for name, (k, n) in shapes(a.model).items():
        x = torch.randn(a.tokens, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        dy = (torch.randn(a.tokens, n, device="cuda", generator=g) * 1e-3).bfloat16()
        main_grad = torch.zeros(n, k, device="cuda")
        steps = {"bf16": bf16_step(x, w, dy, main_grad),
                 "ours tensorwise": ours_step("tensorwise", x, w, dy, main_grad),
                 "ours tensorwise, wgrad written": ours_step("tensorwise", x, w, dy, main_grad,
                                                             overwrite=True),
                 "ours delayed, wgrad written": ours_step("delayed", x, w, dy, main_grad,
                                                          overwrite=True),
                 "ours rowwise": ours_step("rowwise", x, w, dy, main_grad)}
        for c in cands:
            if c.startswith("torchao"):
                try:
                    steps[c] = torchao_step(x, w, dy, "compile" in c)
                except Exception as e:  # not installed, or it refused the shape
                    table[c][name] = f"failed: {str(e).splitlines()[0][:80]}"
                    continue
            table[c][name] = time_ms(steps[c])
        print(name, {c: table[c][name] for c in cands}, flush=True)
        if a.parts:
            parts[name] = shape_parts(x, w, dy, main_grad, steps)
    card = torch.cuda.get_device_name(0)
    print(f"\nOne layer's linears, forward + backward, {a.model}, {a.tokens} tokens, one {card}")
    names = list(shapes(a.model))
    print("| candidate | " + " | ".join(f"{n} ms" for n in names) + " | total ms | speed-up vs bf16 |")
    print("|---|" + "---|" * (len(names) + 2))
    base = sum(table["bf16"].values())
    for c in cands:
        vals = table[c]
        ok = all(isinstance(vals.get(n), float) for n in names)
        total = sum(vals[n] for n in names) if ok else None
        cells = [f"{vals[n]:.3f}" if isinstance(vals.get(n), float) else str(vals.get(n))
                 for n in names]
        print(f"| {c} | " + " | ".join(cells) + " | "
              + (f"{total:.3f} | {base / total:.2f}x |" if ok else "n/a | n/a |"))
    if parts:
        print_parts(parts, names, table)
    if a.parts:
        host_table()


def shape_parts(x, w, dy, main_grad, steps):
    """The --parts measurements of one shape (see the module docstring)."""
    out = {}
    for c in ("bf16", "ours tensorwise", "ours tensorwise, wgrad written",
              "ours delayed, wgrad written"):
        out[f"{c}: kernels"], top = kernel_ms(steps[c])
        if c == "ours tensorwise":
            out["top"] = top[:12]
        try:
            out[f"{c}: graphed"] = time_ms(graphed(steps[c]))
        except Exception as e:  # capture refused: say why
            out[f"{c}: graphed"] = f"failed: {str(e).splitlines()[0][:60]}"
    from framework.fast.fp8 import amax_of

    for t, tag in ((x, "x"), (dy, "dy")):  # the whole-tensor amax, two ways
        out[f"amax of {tag}: torch reduction"] = time_ms(
            lambda: torch.linalg.vector_norm(t, float("inf")))
        out[f"amax of {tag}: amax_of (Triton partials)"] = time_ms(lambda: amax_of(t))
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out[f"FP8 GEMMs only, wgrad out {tag}"] = time_ms(
            gemms_only(x, w, dy, main_grad, dt))
    return out


def print_parts(parts, names, table):
    rows = ["bf16: kernels", "bf16: graphed", "ours tensorwise: kernels",
            "ours tensorwise: graphed", "ours tensorwise, wgrad written: kernels",
            "ours tensorwise, wgrad written: graphed", "ours delayed, wgrad written: kernels",
            "ours delayed, wgrad written: graphed", "FP8 GEMMs only, wgrad out fp32",
            "FP8 GEMMs only, wgrad out bf16", "amax of x: torch reduction",
            "amax of x: amax_of (Triton partials)", "amax of dy: torch reduction",
            "amax of dy: amax_of (Triton partials)"]
    print("\nWhere the time goes (ms per layer-linear; wall = the table above, kernels = GPU "
          "kernel time summed under torch.profiler, graphed = one CUDA graph per step)")
    print("| row | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for c in ("bf16", "ours tensorwise", "ours tensorwise, wgrad written",
              "ours delayed, wgrad written"):
        print(f"| {c}: wall | " + " | ".join(f"{table[c][n]:.3f}" for n in names) + " |")
    for r in rows:
        cells = [parts[n][r] for n in names]
        print(f"| {r} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                        for v in cells) + " |")
    for n in names:
        print(f"\ntop kernels, ours tensorwise, {n} (ms per forward + backward):")
        for k, ms in parts[n]["top"]:
            print(f"  {ms:7.3f}  {k}")


if __name__ == "__main__":
    main()
