"""Norm and weight-gradient kernels, side by side on one GPU in one run.

    python benchmarks/kernels.py [--tokens 24576 --hidden 1280 --ffn 5120]

1. LayerNorm and RMSNorm, forward + backward, bf16 input and weights (what `Norm` runs for every
   transformer layer): torch's native kernels against the same function compiled by
   torch.compile (Inductor's Triton kernels). On an H100 the compiled one took 3.2x as long, so
   `Norm` keeps the native kernels.
2. Weight-gradient accumulation into an fp32 main grad (megatron-core DDP's `main_grad`): a bf16
   wgrad GEMM followed by a separate fp32 add (what mcore does without apex) against one GEMM
   that accumulates into the fp32 main grad (torch.addmm with out_dtype; `model.fused_wgrad`).

Prints a table with the card's name; times are medians of CUDA-event timings. Each candidate's
deviation from a float64 reference is printed next to its time.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.attention import bench  # noqa: E402


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

        def plain(x_, w_, b_, eps):
            if rms:
                return F.rms_norm(x_, (hidden,), w_, eps)
            return F.layer_norm(x_, (hidden,), w_, b_, eps)

        fused = torch.compile(plain, dynamic=False, fullgraph=True)

        def grads(fn, dtype=None):
            xs = x.detach().to(dtype or x.dtype).requires_grad_()
            ws = w.detach().to(dtype or w.dtype).requires_grad_()
            bs = None if rms else b.detach().to(dtype or b.dtype).requires_grad_()
            y = fn(xs, ws, bs) if fn is not fused else fn(xs, ws, bs, 1e-5)
            y.backward(dy.to(y.dtype))
            return [t.detach() for t in (y, xs.grad, ws.grad) + (() if rms else (bs.grad,))]

        ref = grads(native, torch.float64)
        for label, fn in (("torch native", native), ("torch.compile", fused)):
            out = grads(fn)
            dev_str = " ".join(f"{k} {_rel(o, r):.1e}" for k, o, r in
                               zip(("y", "dx", "dw", "db"), out, ref))
            xs = x.detach().requires_grad_()
            ws, bs = w.detach().requires_grad_(), None if rms else b.detach().requires_grad_()

            def run():
                y = fn(xs, ws, bs) if fn is not fused else fn(xs, ws, bs, 1e-5)
                y.backward(dy)
                xs.grad = ws.grad = None
                if bs is not None:
                    bs.grad = None

            rows.append((f"{name} fwd+bwd [{tokens}, {hidden}]", label, bench(run), dev_str))


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
        rows.append((f"wgrad [{n_out}, {n_in}] over {tokens} tokens", label, bench(fn), dev_str))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=24 * 1024)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--ffn", type=int, default=5120)
    a = ap.parse_args()
    rows = []
    norms(a.tokens, a.hidden, rows)
    for n_in, n_out in ((a.hidden, 3 * a.hidden), (a.hidden, a.hidden), (a.hidden, a.ffn),
                        (a.ffn, a.hidden)):
        wgrad(a.tokens, n_in, n_out, rows)
    print(f"\none {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| kernel | candidate | ms | vs first | rel. deviation from float64 |")
    print("|---|---|---|---|---|")
    first = {}
    for what, label, ms, dev_str in rows:
        first.setdefault(what, ms)
        print(f"| {what} | {label} | {ms:.3f} | {ms / first[what]:.2f}x | {dev_str} |")


if __name__ == "__main__":
    main()
