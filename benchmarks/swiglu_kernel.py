"""SwiGLU forward + backward, megatron-core's fused kernel against ours (`model.swiglu_kernel`),
one GPU, one run.

    python benchmarks/swiglu_kernel.py [--ffn 8192] [--tokens 24576,32768]

fc1's output x [tokens, 2 * ffn] in bf16, dy [tokens, ffn]; each candidate timed with CUDA events
over 30 iterations after 10 warm-up ones (forward, then backward through autograd). Also the
GB/s of the minimum traffic (forward: read x, write y; backward: read x and dy, write dx),
each candidate's max abs error against the fp32 reference (torch's swiglu on x and dy cast to
fp32) and its max relative error against float64.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fp8_linear import time_ms  # noqa: E402


def main():
    import triton
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from framework.fast.swiglu import swiglu, swiglu_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--tokens", default="24576,32768")
    a = ap.parse_args()
    cands = {"megatron-core fused SwiGLU": lambda x: bias_swiglu_impl(x, None, False, False),
             "ours (framework/fast/swiglu.py)": swiglu}
    card = torch.cuda.get_device_name(0)
    print(f"SwiGLU forward + backward, bf16, ffn {a.ffn}, one {card}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print("| tokens | candidate | fwd ms | fwd+bwd ms | vs megatron-core | fwd+bwd GB/s | "
          "max abs err vs fp32 y / dx | max rel err vs fp64 y / dx |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for tokens in [int(t) for t in a.tokens.split(",")]:
        x = (torch.randn(tokens, 2 * a.ffn, device="cuda", generator=g) * 2).bfloat16()
        dy = torch.randn(tokens, a.ffn, device="cuda", generator=g).bfloat16()
        xs = x[:512].double().requires_grad_()  # errors on a slice (float64 is slow)
        ref = swiglu_ref(xs)
        ref.backward(dy[:512].double())
        x32 = x[:512].float().requires_grad_()
        ref32 = swiglu_ref(x32)
        ref32.backward(dy[:512].float())
        gbytes = (x.numel() * 2 * 3 + dy.numel() * 2 * 2) / 1e9  # x: read twice, dx; y, dy
        base = None
        for name, fn in cands.items():
            xx = x.detach().requires_grad_()

            def fwd():
                return fn(xx)

            def step():
                fn(xx).backward(dy)
                xx.grad = None
            f_ms, s_ms = time_ms(fwd), time_ms(step)
            base = base or s_ms
            xe = x[:512].detach().requires_grad_()
            ye = fn(xe)
            ye.backward(dy[:512])
            err_y = float((ye.double() - ref).abs().max() / ref.abs().max())
            err_dx = float((xe.grad.double() - xs.grad).abs().max() / xs.grad.abs().max())
            abs_y = float((ye.float() - ref32).abs().max())
            abs_dx = float((xe.grad.float() - x32.grad).abs().max())
            print(f"| {tokens} | {name} | {f_ms:.3f} | {s_ms:.3f} | {base / s_ms:.2f}x | "
                  f"{gbytes / s_ms * 1e3:.0f} | {abs_y:.1e} / {abs_dx:.1e} | "
                  f"{err_y:.1e} / {err_dx:.1e} |", flush=True)


if __name__ == "__main__":
    main()
