"""Rank `rank` of the TP2 check in tests/test_fp8.py (started by torch.multiprocessing over
gloo; kept apart so that each process imports only torch and framework/fast/fp8.py): the amax
all-reduce, and the FP8 linear at TP2 (column, column + sequence parallel, row) against TP1,
both recipes. Writes its results to <out_dir>/rank<rank>.pt."""
import os

import torch
import torch.distributed as dist

from framework.fast import fp8 as f


def tp2_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = dist.group.WORLD
        results = {}
        # the amax all-reduce: each rank's shard has its own amax; the scale is the global one
        loc = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank)) * (1 + 7 * rank)
        amax = torch.tensor([0.0]) + loc.abs().max()
        full_amax = amax.clone()
        dist.all_reduce(full_amax, op=dist.ReduceOp.MAX)
        _, _, inv = f.cast_tensorwise(loc, f.E4M3, group)
        _, _, inv_local = f.cast_tensorwise(loc, f.E4M3, None)
        results["amax"] = (inv.item(), f.pow2_scale(full_amax, f.E4M3)[1].item(),
                           inv_local.item())
        _, rinv = f.cast_rowwise(loc.t().contiguous(), f.E4M3, 1, group)
        ref_rows = loc.t().abs().amax(1)
        dist.all_reduce(ref_rows, op=dist.ReduceOp.MAX)
        results["row_amax"] = torch.equal(rinv, f.pow2_scale(ref_rows, f.E4M3)[1])

        g = torch.Generator().manual_seed(10)
        s, bsz, k, n = 8, 4, 64, 32
        x = torch.randn(s, bsz, k, generator=g)
        x[..., k // 2:] *= 4  # rank 1's half of the features (row-parallel) is larger
        x[s // 2:] *= 3  # and its half of the sequence (SP)
        w = torch.randn(n, k, generator=g) * 0.1
        w[n // 2:] *= 4  # rank 1's output rows (column-parallel)
        w[:, k // 2:] *= 2
        dy = torch.randn(s, bsz, n, generator=g)
        dy[..., n // 2:] *= 4
        b = torch.randn(n, generator=g)

        def tp1(recipe):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = f.fp8_linear(xx, ww, None, recipe, "column", False, False, False, None)
            y.backward(dy)
            return y.detach(), xx.grad, ww.grad

        rows = slice(rank * n // 2, (rank + 1) * n // 2)
        cols = slice(rank * k // 2, (rank + 1) * k // 2)
        toks = slice(rank * s // 2, (rank + 1) * s // 2)
        for recipe in f.RECIPES:
            y1, dx1, dw1 = tp1(recipe)
            # column-parallel, no SP: x whole on each rank, w's rows split, dgrad all-reduced
            xx, ww = x.clone().requires_grad_(), w[rows].clone().requires_grad_()
            y = f.fp8_linear(xx, ww, None, recipe, "column", False, True, False, group)
            y.backward(dy[..., rows])
            results[f"{recipe} column"] = _diffs((y, y1[..., rows]), (xx.grad, dx1),
                                                 (ww.grad, dw1[rows]))
            # column-parallel + SP: x's sequence split, gathered (as FP8) inside
            xx, ww = x[toks].clone().requires_grad_(), w[rows].clone().requires_grad_()
            y = f.fp8_linear(xx, ww, None, recipe, "column", False, False, True, group)
            y.backward(dy[..., rows])
            results[f"{recipe} column+sp"] = _diffs((y, y1[..., rows]), (xx.grad, dx1[toks]),
                                                    (ww.grad, dw1[rows]))
            # row-parallel: x's features and w's columns split, outputs summed over ranks
            xx, ww = x[..., cols].clone().requires_grad_(), w[:, cols].clone().requires_grad_()
            y = f.fp8_linear(xx, ww, None, recipe, "row", False, False, False, group)
            y.backward(dy)
            ysum = y.detach().clone()
            dist.all_reduce(ysum)
            results[f"{recipe} row"] = _diffs((ysum, y1), (xx.grad, dx1[..., cols]),
                                              (ww.grad, dw1[:, cols]))
        # a bias on a column-parallel layer: its shard's gradient
        xx, ww, bb = x.clone().requires_grad_(), w[rows].clone().requires_grad_(), \
            b[rows].clone().requires_grad_()
        f.fp8_linear(xx, ww, bb, "tensorwise", "column", False, True, False, group).backward(
            dy[..., rows])
        results["bias"] = _diffs((bb.grad, dy[..., rows].sum((0, 1))))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _diffs(*pairs):
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in pairs]
