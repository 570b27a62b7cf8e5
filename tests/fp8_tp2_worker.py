"""Rank `rank` of the TP2 check in tests/test_fp8.py (started by torch.multiprocessing over
gloo): the amax all-reduce, the FP8 linear at TP2 (column, column + sequence parallel, row)
against TP1, every recipe (`delayed` on its second step, its scales then taken from the
amax history that `Fp8History.step` all-reduced over TP), and a tiny GPT with train.fp8 at TP2 (megatron-core's TP layers with
our FP8 linears) against the same model at TP1. Writes its results to <out_dir>/rank<rank>.pt."""
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

        def lin(xx, ww, bb, recipe, mode, allreduce, sp, grp, dyy):
            """fp8_linear forward + backward; `delayed` runs HISTORY + 2 times, the history
            rolled (and all-reduced over `grp`) after each, and gives the last run: by then
            the first cast's fill (all-reduced in place) is forgotten, and the scales come
            from the rolls alone."""
            if recipe != "delayed":
                y = f.fp8_linear(xx, ww, bb, recipe, mode, False, allreduce, sp, grp)
                y.backward(dyy)
                return y
            holder = type("Layer", (), {})()
            hist = f.Fp8History([holder], torch.device("cpu"), grp)
            for _ in range(f.HISTORY + 2):
                for t in (xx, ww, bb):
                    if t is not None:
                        t.grad = None
                y = f.fp8_linear(xx, ww, bb, recipe, mode, False, allreduce, sp, grp,
                                 holder.fp8_meta)
                y.backward(dyy)
                hist.step()
            return y

        def tp1(recipe):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = lin(xx, ww, None, recipe, "column", False, False, None, dy)
            return y.detach(), xx.grad, ww.grad

        rows = slice(rank * n // 2, (rank + 1) * n // 2)
        cols = slice(rank * k // 2, (rank + 1) * k // 2)
        toks = slice(rank * s // 2, (rank + 1) * s // 2)
        for recipe in f.RECIPES:
            y1, dx1, dw1 = tp1(recipe)
            # column-parallel, no SP: x whole on each rank, w's rows split, dgrad all-reduced
            xx, ww = x.clone().requires_grad_(), w[rows].clone().requires_grad_()
            y = lin(xx, ww, None, recipe, "column", True, False, group, dy[..., rows])
            results[f"{recipe} column"] = _diffs((y, y1[..., rows]), (xx.grad, dx1),
                                                 (ww.grad, dw1[rows]))
            # column-parallel + SP: x's sequence split, gathered (as FP8) inside
            xx, ww = x[toks].clone().requires_grad_(), w[rows].clone().requires_grad_()
            y = lin(xx, ww, None, recipe, "column", False, True, group, dy[..., rows])
            results[f"{recipe} column+sp"] = _diffs((y, y1[..., rows]), (xx.grad, dx1[toks]),
                                                    (ww.grad, dw1[rows]))
            # row-parallel: x's features and w's columns split, outputs summed over ranks
            xx, ww = x[..., cols].clone().requires_grad_(), w[:, cols].clone().requires_grad_()
            y = lin(xx, ww, None, recipe, "row", False, False, group, dy)
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
        results.update(_gpt_tp2_vs_tp1(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _diffs(*pairs):
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in pairs]


def _gpt_tp2_vs_tp1(rank):
    """A 2-layer GPT with train.fp8 (each recipe) at TP1 and, with the TP1 weights sliced,
    at TP2: one forward/backward on the same tokens. Returns {name: (loss rel diff, worst
    gradient rel diff)}, plus the FP8-vs-fp32 loss difference at TP1 for scale."""
    from framework.config import ModelConfig, ParallelConfig
    from framework.models.build import build_model
    from test_attention_variants import _shard, model_parallel

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                      hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 200, (2, 17), generator=g)
    tokens, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(16)[None].expand(2, 16)

    def build(tp, recipe):
        torch.manual_seed(0)
        return build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp), vocab_size=256,
                           bf16=False, fp16=False, device=torch.device("cpu"), wrap_ddp=False,
                           fp8=recipe)[0]

    def step(model):
        # delayed: HISTORY + 2 steps, the histories rolled (all-reduced over TP) after each;
        # the compared last step scales from the rolled amaxes alone
        for _ in range(f.HISTORY + 2 if getattr(model, "fp8_history", None) is not None else 1):
            model.zero_grad(set_to_none=True)
            loss = model(tokens, pos, None, labels=labels).mean()
            loss.backward()
            if getattr(model, "fp8_history", None) is not None:
                model.fp8_history.step()
        return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    out = {}
    for recipe in (None, "tensorwise", "delayed", "rowwise"):
        with model_parallel(1):
            ref = build(1, recipe)
            full = {n: p.detach().clone() for n, p in ref.named_parameters()}
            gp = torch.Generator().manual_seed(6)  # random biases, norm weights 1 + N(0, 0.1)
            for n, t in full.items():
                if "norm" in n or n.endswith("bias"):
                    base = 1.0 if "norm" in n and n.endswith("weight") else 0.0
                    t.copy_(base + 0.1 * torch.randn(t.shape, generator=gp))
            ref.load_state_dict(full, strict=False)
            l1, g1 = step(ref)
        if recipe is None:
            fp32_loss = l1
            continue
        with model_parallel(2):
            model = build(2, recipe)
            model.load_state_dict(_shard(full, model, 2, rank), strict=False)
            l2, g2 = step(model)
            g1 = _shard(g1, model, 2, rank)
        worst = max(((g2[n] - g1[n]).norm() / g1[n].norm()).item() for n in g2)
        out[f"gpt {recipe}"] = [abs(l2 - l1) / abs(l1), worst]
        out[f"gpt {recipe} vs fp32"] = abs(l1 - fp32_loss) / abs(fp32_loss)
    return out
