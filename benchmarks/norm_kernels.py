"""Norm and weight-gradient kernels, side by side on one GPU in one run.

    python benchmarks/norm_kernels.py [--tokens 24576 --hidden 1280 --ffn 5120]

1. LayerNorm and RMSNorm, forward + backward, bf16 input and weights (what `Norm` runs for every
   transformer layer): torch's native kernels against our Triton kernels (framework/fast/norm.py,
   `model.fused_norm`). (torch.compile of the same function was slower than native and is not
   a candidate.)
2. The QKV projection's bias add on its [s, b, 3h] output: torch's broadcast add (mcore) against
   our Triton kernel (framework/fast/bias.py, `model.fused_bias_add`).
3. Weight-gradient accumulation into an fp32 main grad (megatron-core DDP's `main_grad`): a bf16
   wgrad GEMM followed by a separate fp32 add (what mcore does without apex) against one GEMM
   that accumulates into the fp32 main grad (torch.addmm with out_dtype; `model.fused_wgrad`).

Prints a table with the card's name: medians of CUDA-event timings (which include the host's
launch gaps of a short call) and the profiler's GPU kernel time per call. Each candidate's
deviation from a float64 reference is printed next to its time.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.attention import bench, kernel_ms  # noqa: E402
from framework.fast.bias import bias_add  # noqa: E402
from framework.fast.norm import fused_norm  # noqa: E402


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def norms(tokens: int, hidden: int, rows: list) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=g)
    dy = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=g)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).bfloat16()
    b = (0.1 * torch.randn(hidden, device=dev, generator=g)).bfloat16()
    for rms in (False, True):
        name = "RMSNorm" if rms else "LayerNorm"

        def native(x_, w_, b_):
            if rms:
                return F.rms_norm(x_, (hidden,), w_, 1e-5)
            return F.layer_norm(x_, (hidden,), w_, b_, 1e-5)

        def triton_norm(x_, w_, b_):
            return fused_norm(x_, w_, b_, 1e-5, rms)

        def grads(fn, dtype=None):
            xs = x.detach().to(dtype or x.dtype).requires_grad_()
            ws = w.detach().to(dtype or w.dtype).requires_grad_()
            bs = None if rms else b.detach().to(dtype or b.dtype).requires_grad_()
            y = fn(xs, ws, bs)
            y.backward(dy.to(y.dtype))
            return [t.detach() for t in (y, xs.grad, ws.grad) + (() if rms else (bs.grad,))]

        ref = grads(native, torch.float64)
        for label, fn in (("torch native", native), ("Triton (fused_norm)", triton_norm)):
            out = grads(fn)
            dev_str = " ".join(f"{k} {_rel(o, r):.1e}" for k, o, r in
                               zip(("y", "dx", "dw", "db"), out, ref))
            xs = x.detach().requires_grad_()
            ws, bs = w.detach().requires_grad_(), None if rms else b.detach().requires_grad_()

            def run():
                y = fn(xs, ws, bs)
                y.backward(dy)
                xs.grad = ws.grad = None
                if bs is not None:
                    bs.grad = None

            rows.append((f"{name} fwd+bwd [{tokens}, {hidden}]", label, bench(run),
                         kernel_ms(run), dev_str))


def bias(tokens: int, n_out: int, rows: list) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(tokens // 1024, 1024, n_out, device=dev, generator=g).bfloat16()
    b = torch.randn(n_out, device=dev, generator=g).bfloat16()
    ref = x.double() + b.double()
    for label, fn in (("torch broadcast add (mcore)", lambda: x + b),
                      ("Triton (fused_bias_add)", lambda: bias_add(x, b))):
        rows.append((f"bias add [{tokens // 1024}, 1024, {n_out}]", label, bench(fn),
                     kernel_ms(fn), f"y {_rel(fn(), ref):.1e}"))


def wgrad(tokens: int, n_in: int, n_out: int, rows: list) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(tokens, n_in, device=dev, dtype=torch.bfloat16, generator=g)
    dy = torch.randn(tokens, n_out, device=dev, dtype=torch.bfloat16, generator=g)
    start = torch.randn(n_out, n_in, device=dev, generator=g)
    ref = start.double() + dy.double().t() @ x.double()
    main_grad = start.clone()

    def separate():
        main_grad.add_(dy.t() @ x)

    def fused():
        torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)

    for label, fn in (("bf16 GEMM + fp32 add (mcore without apex)", separate),
                      ("GEMM accumulating in fp32 (fused_wgrad)", fused)):
        main_grad.copy_(start)
        fn()
        dev_str = f"main_grad {_rel(main_grad, ref):.1e}"
        rows.append((f"wgrad [{n_out}, {n_in}] over {tokens} tokens", label, bench(fn),
                     kernel_ms(fn), dev_str))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=24 * 1024)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--ffn", type=int, default=5120)
    ap.add_argument("--only", default="norms,bias,wgrad")
    a = ap.parse_args()
    rows = []
    only = a.only.split(",")
    if "norms" in only:
        norms(a.tokens, a.hidden, rows)
    if "bias" in only:
        bias(a.tokens, 3 * a.hidden, rows)
    for n_in, n_out in ((a.hidden, 3 * a.hidden), (a.hidden, a.hidden), (a.hidden, a.ffn),
                        (a.ffn, a.hidden)) if "wgrad" in only else ():
        wgrad(a.tokens, n_in, n_out, rows)
    print(f"\none {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| kernel | candidate | ms (events) | kernel ms | kernel vs first | "
          "rel. deviation from float64 |")
    print("|---|---|---|---|---|---|")
    first = {}
    for what, label, ms, kms, dev_str in rows:
        first.setdefault(what, kms)
        print(f"| {what} | {label} | {ms:.3f} | {kms:.3f} | {kms / first[what]:.2f}x | "
              f"{dev_str} |")


if __name__ == "__main__":
    main()
