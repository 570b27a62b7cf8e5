"""RoPE on the fused QKV output, forward + backward, one GPU, one run: megatron-core's split
(query heads copied out, gradients concatenated back) followed by its unfused RoPE or by our
`fused_rope` (today's default, `model.rope_fusion`), against `fused_qkv_rope`
(`model.qkv_rope_fusion`), which rotates q and k as it splits them.

    python benchmarks/qkv_rope_kernel.py [--shapes llama3_1b,qwen2_5_1_5b,llama3_3b]
        [--micro-batch 16] [--seq 2048] [--rows 16,64]

The fused QKV output mixed [seq, micro-batch, groups, (q per group + 2) * head dim] in bf16, the
gradients of q, k, v random; each candidate timed with CUDA events over 30 iterations after 10
warm-up ones (forward; forward then backward through autograd). `--rows`: (seq, batch, head)
rows per program of the rotation kernel, each value a row of its own for both Triton
candidates. Also the GB/s of the least traffic one can do (forward: read q and k and v, write
them; backward: read their gradients, write mixed's), and whether each candidate's outputs and
mixed gradient equal `fused_rope`'s bit for bit.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fp8_linear import time_ms  # noqa: E402

# (groups, query heads per group, head dim) of the attention of each shape, TP1
SHAPES = {"llama3_1b": (8, 4, 64), "qwen2_5_1_5b": (2, 6, 128), "llama3_3b": (8, 3, 128)}


def split(mixed, qpg, d):
    s, b, g, _ = mixed.shape
    q, k, v = torch.split(mixed, [qpg * d, d, d], dim=3)
    return q.reshape(s, b, g * qpg, d), k, v


def main():
    import triton
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from framework.fast import rope

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", default=str(rope.ROWS))
    a = ap.parse_args()
    rows_list = [int(x) for x in a.rows.split(",")]
    bad = [r for r in rows_list if r < 1 or r & (r - 1)]
    if bad:
        sys.exit(f"--rows {a.rows}: {bad} not a power of two (tl.arange's block)")
    card = torch.cuda.get_device_name(0)
    print(f"RoPE on the fused QKV output, forward + backward, bf16, micro-batch {a.micro_batch}, "
          f"seq {a.seq}, one {card}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | candidate | rows/program | fwd ms | fwd+bwd ms | vs mcore split + fused_rope "
          "| fwd+bwd GB/s | equal to split + fused_rope |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows_default = rope.ROWS
    for name in a.shapes.split(","):
        groups, qpg, d = SHAPES[name]
        s, b = a.seq, a.micro_batch
        inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
        ang = torch.outer(torch.arange(s, device="cuda").float(), inv)
        freqs = torch.cat([ang, ang], -1)[:, None, None, :]
        mixed = torch.randn(s, b, groups, (qpg + 2) * d, device="cuda", generator=g).bfloat16()
        outs = split(mixed, qpg, d)
        # in the layout SDPA's backward hands them over: [b, n, s, d] storage seen as [s, b, n, d]
        grads = [torch.randn(t.shape[1], t.shape[2], t.shape[0], t.shape[3], device="cuda",
                             generator=g).bfloat16().permute(2, 0, 1, 3) for t in outs]
        gbytes = 2 * 2 * mixed.numel() * 2 / 1e9  # forward and backward: read + write, bf16
        cands = [("mcore split + unfused RoPE", None, lambda m: (
                    lambda q, k, v: (_apply_rotary_pos_emb_bshd(q, freqs),
                                     _apply_rotary_pos_emb_bshd(k, freqs), v))(*split(m, qpg, d)))]
        for r in rows_list:
            cands.append(("mcore split + fused_rope (default)", r, lambda m: (
                lambda q, k, v: (rope.fused_rope(q, freqs), rope.fused_rope(k, freqs), v))(
                    *split(m, qpg, d))))
            cands.append(("fused_qkv_rope (model.qkv_rope_fusion)", r,
                          lambda m: rope.fused_qkv_rope(m, freqs, freqs, qpg)))
        rope.ROWS = rows_default
        m_ref = mixed.clone().requires_grad_()
        want = cands[1][2](m_ref)
        torch.autograd.backward(list(want), grads)
        results = []
        for label, rows, fn in cands:
            rope.ROWS = rows or rows_default
            mm = mixed.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    return fn(mm)

            def step():
                torch.autograd.backward(list(fn(mm)), grads)
                mm.grad = None
            f_ms, s_ms = time_ms(fwd), time_ms(step)
            me = mixed.clone().requires_grad_()
            got = fn(me)
            torch.autograd.backward(list(got), grads)
            same = all(torch.equal(x, y) for x, y in zip(got, want)) and \
                torch.equal(me.grad, m_ref.grad)
            results.append((label, rows, f_ms, s_ms, same))
        defaults = [r for r in results if "default" in r[0]]
        base = next((r[3] for r in defaults if r[1] == rows_default), defaults[0][3])
        for label, rows, f_ms, s_ms, same in results:
            print(f"| {name} | {label} | {rows or 'n/a'} | {f_ms:.3f} | {s_ms:.3f} | "
                  f"{base / s_ms:.2f}x | {gbytes / s_ms * 1e3:.0f} | {same} |", flush=True)
        rope.ROWS = rows_default


if __name__ == "__main__":
    main()
