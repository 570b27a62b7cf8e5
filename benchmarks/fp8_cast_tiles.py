"""The FP8 cast kernels' tile shapes, timed on one GPU in one run (`train.fp8`'s largest cost that
is not a GEMM: the sixteenth session's gpt2-xl profile in benchmarks/RESULTS.md).

    python benchmarks/fp8_cast_tiles.py [--model gpt2_xl] [--micro-batch 16] [--out FILE.json]

For every cast one transformer layer makes per step with the best recipe (`train.fp8=delayed
model.fp8_fused_act=true model.fp8_fused_act_backward=true`), at the model's shapes:
* forward: the input casts of QKV, the attention projection and fc1 ([tokens, hidden], both
  layouts), fc2's input made from fc1's output by the fused activation ([tokens, ffn]), and the
  four weights (both layouts);
* backward: the output-gradient casts of fc2, the attention projection and QKV (e5m2, both
  layouts; QKV's with the column sums that make its bias gradient) and the activation backward
  fused with fc1's output-gradient cast (`_act_bwd_cast_kernel`),
each tile (rows x columns x warps) of a grid is timed with CUDA events (median of 3 replays of
one CUDA graph holding 40 launches, after warm-up; training runs the casts in per-layer graphs
too), and its outputs are checked against the default tile's: FP8 bits of
both layouts, the scale and the recorded amax equal; the bias gradient of the activation
backward within fp32 rounding. A tile whose output differs is reported and never chosen.

Prints, per cast: the default tile's time and achieved bandwidth (the bytes the cast must move:
its reads and both FP8 outputs), the best tile's, and the ratio; then the layer's total per step
(x layers: what a training step would save) at the default, at the best tile per kernel
(`cast` and `act_bwd`, one tile each, as `fp8.TILES` holds them; another tile only where it is
more than 3% faster than the default over the layer), and the FP8_CAST_TILES value that sets
that pair for an end-to-end A/B with benchmarks/throughput.py.
"""
import argparse
import itertools
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MARGIN = 0.03  # a tile replaces the default only when its layer total is 3% lower
GRID = [(bm, bk, w) for bm, bk in itertools.product((32, 64, 128), (32, 64, 128, 256))
        if bm * bk <= 16384 for w in (4, 8)]


def casts(hidden: int, ffn: int, tokens: int):
    """(name, kernel, rows, columns, input kind) of one layer's casts per step, forward then
    backward. Input kind: x (bf16 activation), w (weight), dy (output gradient), dy_bias (an
    output gradient whose column sums the cast also makes: QKV's bias gradient), act (fc1's
    output, cast through the activation), act_bwd (the activation backward)."""
    return [
        ("fwd qkv input", "cast", tokens, hidden, "x"),
        ("fwd proj input", "cast", tokens, hidden, "x"),
        ("fwd fc1 input", "cast", tokens, hidden, "x"),
        ("fwd fc2 input (activation)", "cast", tokens, ffn, "act"),
        ("fwd qkv weight", "cast", 3 * hidden, hidden, "w"),
        ("fwd proj weight", "cast", hidden, hidden, "w"),
        ("fwd fc1 weight", "cast", ffn, hidden, "w"),
        ("fwd fc2 weight", "cast", hidden, ffn, "w"),
        ("bwd fc2 output grad", "cast", tokens, hidden, "dy"),
        ("bwd proj output grad", "cast", tokens, hidden, "dy"),
        ("bwd qkv output grad (+ its bias gradient)", "cast", tokens, 3 * hidden, "dy_bias"),
        ("bwd activation + fc1 output grad", "act_bwd", tokens, ffn, "act_bwd"),
    ]


def bytes_moved(m: int, k: int, kind: str) -> int:
    """What the cast must read and write: bf16 in, FP8 rows and transpose out; the activation
    backward reads fc1's output and the activation's gradient and writes dh (bf16) besides."""
    return m * k * (2 * 2 + 1 + 1 + 2) if kind == "act_bwd" else m * k * (2 + 1 + 1)  # (sums: ~0)


def main():
    import torch

    from benchmarks.shapes import get_shape
    from framework.fast import fp8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2_xl")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if not torch.cuda.is_available() or fp8.triton is None:
        sys.exit("error: fp8_cast_tiles.py times Triton kernels: it needs a CUDA GPU and triton")
    shape = get_shape(a.model)
    tokens = a.micro_batch * shape.seq
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    card = torch.cuda.get_device_name(0)
    print(f"{a.model}: hidden {shape.hidden}, ffn {shape.ffn}, {shape.layers} layers, "
          f"{tokens} tokens (micro-batch {a.micro_batch} x seq {shape.seq}); {card}; "
          f"torch {torch.__version__}; default tiles {fp8.TILES}", flush=True)

    def timed(fn):
        """ms per call, from `launches` calls captured in one CUDA graph (as training runs the
        casts: per-layer graphs), so that the host's launch work is not timed; each call also
        copies a 17-float amax history (a few microseconds, the same for every tile)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles and warms up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(a.launches):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        runs = []
        for _ in range(a.repeats):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end) / a.launches)
        del graph
        return statistics.median(runs)

    results = []
    for name, kernel, m, k, kind in casts(shape.hidden, shape.ffn, tokens):
        scale = 0.02 if kind == "w" else (0.01 if kind in ("dy", "dy_bias", "act_bwd") else 1.0)
        x = (torch.randn(m, k, device=dev, generator=g) * scale).to(torch.bfloat16)
        bias = (torch.randn(k, device=dev, generator=g) * 0.1).to(torch.bfloat16)
        dtype = fp8.E5M2 if kind in ("dy", "dy_bias", "act_bwd") else fp8.E4M3
        # the amax histories each launch starts from (copied on the device: no host sync in
        # the timed loop)
        if kind == "act_bwd":
            da = (torch.randn(m, k, device=dev, generator=g) * 0.01).to(torch.bfloat16)
            rows0 = torch.zeros(3, fp8.HISTORY + 1, device=dev)
            rows0[fp8.DY, 0] = 0.05

            def run(tile, x=x, bias=bias, da=da, rows0=rows0):
                meta = fp8.Fp8Meta(rows0.clone())
                meta.primed = [True, True, True]
                dh, dbias, (q, qt, inv) = fp8.act_backward_cast(x, bias, "gelu_tanh", da, meta,
                                                                 dtype, tile=tile)
                return (dh, q.view(torch.uint8), qt.view(torch.uint8), inv,
                        meta.rows[fp8.DY, fp8.HISTORY].clone()), dbias
        else:
            act = "gelu_tanh" if kind == "act" else None
            hist0 = torch.zeros(fp8.HISTORY + 1, device=dev)
            hist0[0] = x.float().abs().max() * 1.5 + 1e-3

            def run(tile, x=x, bias=bias, act=act, dtype=dtype, hist0=hist0, kind=kind):
                hist = hist0.clone()
                sums = torch.empty(x.shape[1], device=x.device) if kind == "dy_bias" else None
                q, qt, inv = fp8.cast(x, hist[:fp8.HISTORY], dtype, None, True, True,
                                      amax_out=hist[fp8.HISTORY:], act=act,
                                      act_bias=bias if act else None, tile=tile, sums_out=sums)
                return (q.view(torch.uint8), qt.view(torch.uint8), inv,
                        hist[fp8.HISTORY].clone()), sums
            if kind == "dy_bias":  # what the cast's column sums replace: a pass of its own
                separate_ms = timed(lambda x=x: x.sum(0))
        ref, ref_extra = run(fp8.TILES[kernel])
        rows = []
        for tile in GRID:
            got, extra = run(tile)
            same = all(torch.equal(u, v) for u, v in zip(got, ref))
            if extra is not None:
                same = same and torch.allclose(extra.float(), ref_extra.float(), rtol=1e-2,
                                               atol=1e-3)
            ms = timed(lambda tile=tile: run(tile))
            rows.append({"tile": list(tile), "ms": ms, "same": bool(same)})
        default = next(r for r in rows if tuple(r["tile"]) == fp8.TILES[kernel])
        ok = [r for r in rows if r["same"]]
        best = min(ok, key=lambda r: r["ms"])
        nbytes = bytes_moved(m, k, kind)
        bad = [r["tile"] for r in rows if not r["same"]]
        results.append({"cast": name, "kernel": kernel, "shape": [m, k], "bytes": nbytes,
                        "default_ms": default["ms"], "best_tile": best["tile"],
                        "best_ms": best["ms"], "tiles": rows, "differs": bad})
        print(f"{name:36s} [{m} x {k}] default {default['ms'] * 1e3:8.1f} us "
              f"({nbytes / default['ms'] / 1e9:5.2f} TB/s); best {tuple(best['tile'])} "
              f"{best['ms'] * 1e3:8.1f} us ({nbytes / best['ms'] / 1e9:5.2f} TB/s), "
              f"{default['ms'] / best['ms']:.2f}x" + (f"; OUTPUT DIFFERS at {bad}" if bad else ""),
              flush=True)

    # one tile per kernel (what fp8.TILES holds): the one with the least total time per layer
    def total(kernel, tile):
        return sum(next(r["ms"] for r in res["tiles"] if tuple(r["tile"]) == tile)
                   for res in results if res["kernel"] == kernel)

    choice, summary = {}, {}
    for kernel in ("cast", "act_bwd"):
        ok_tiles = [t for t in GRID if all(next(r["same"] for r in res["tiles"]
                                                if tuple(r["tile"]) == t)
                                           for res in results if res["kernel"] == kernel)]
        best = min(ok_tiles, key=lambda t: total(kernel, t))
        # another tile only where it gains more than the timing's noise
        choice[kernel] = best if total(kernel, best) < (1 - MARGIN) * total(
            kernel, fp8.TILES[kernel]) else fp8.TILES[kernel]
        summary[kernel] = {"default_ms_per_layer": total(kernel, fp8.TILES[kernel]),
                           "best_tile": list(choice[kernel]),
                           "best_ms_per_layer": total(kernel, choice[kernel])}
    before = sum(s["default_ms_per_layer"] for s in summary.values())
    after = sum(s["best_ms_per_layer"] for s in summary.values())
    env = ",".join(f"{k}={'x'.join(map(str, t))}" for k, t in choice.items())
    print(f"\nper layer and step: default tiles {before:.3f} ms, best tile per kernel "
          f"{after:.3f} ms; x {shape.layers} layers: {before * shape.layers:.1f} -> "
          f"{after * shape.layers:.1f} ms a step ({(before - after) * shape.layers:.1f} ms less)")
    print(f"FP8_CAST_TILES={env}")
    print(f"the QKV bias gradient as a pass of its own (dy.sum(0), before the cast made it): "
          f"{separate_ms * 1e3:.1f} us a layer, {separate_ms * shape.layers:.2f} ms a step")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "tokens": tokens, "card": card,
                       "torch": torch.__version__, "default_tiles": fp8.TILES,
                       "casts": results, "per_kernel": summary, "env": env,
                       "separate_bias_grad_ms_per_layer": separate_ms}, f, indent=1)


if __name__ == "__main__":
    main()
