"""What the checkpoint manifest costs a save (and a load's verification), on this machine's CPU.

    python -m benchmarks.checkpoint_manifest [--hidden 1024] [--layers 4] [--repeats 2]

One gloo rank builds a GPT (fp32) with an Adam optimizer that has stepped once, saves it with
`save_checkpoint` `--repeats` times, and reports the save's wall time and the part of it spent
hashing (each rank's `.distcp` files and the rest: `hash_own_shards` + `write_manifest`), with
the hash's MB/s; then the time of `verify_checkpoint` (sizes + checksums) on the saved files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to save (default: a temp dir)")
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from framework.checkpoint import state as ckpt
    from framework.checkpoint.manifest import verify_checkpoint
    from framework.config import ModelConfig, OptimizerConfig, ParallelConfig
    from framework.models.build import build_model
    from framework.optimizer import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=max(1, args.hidden // 64), seq_length=128,
                      max_position_embeddings=128)
    model = build_model(cfg, ParallelConfig(), vocab_size=args.vocab, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)
    opt, sched = build_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=0), model, max_steps=10,
                                 bf16=False, fp16=False, use_distributed_optimizer=False,
                                 overlap_param_gather=False, on_gpu=False)
    for p in model[0].parameters():
        p.grad = torch.randn_like(p) * 1e-3
        p.main_grad = p.grad
    opt.step()
    params = sum(p.numel() for p in model[0].parameters())

    timing = {"hash": 0.0}
    real_own, real_manifest = ckpt.hash_own_shards, ckpt.write_manifest

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timing["hash"] += time.perf_counter() - t
        return wrapper

    ckpt.hash_own_shards, ckpt.write_manifest = timed(real_own), timed(real_manifest)
    root = args.dir or tempfile.mkdtemp(prefix="fw-manifest-bench-")
    try:
        for r in range(args.repeats):
            timing["hash"] = 0.0
            t = time.perf_counter()
            path = ckpt.save_checkpoint(root, r + 1, model, opt, sched, consumed_samples=0,
                                        config={"model": {}})
            total = time.perf_counter() - t
            size = sum(os.path.getsize(os.path.join(dp, f))
                       for dp, _d, fs in os.walk(path) for f in fs)
            print(f"save {r + 1}: {params / 1e6:.1f}M params, checkpoint {size / 1e6:.0f} MB: "
                  f"save {total:.2f} s, of which hashing {timing['hash']:.2f} s "
                  f"({100 * timing['hash'] / total:.1f}%, {size / 1e6 / timing['hash']:.0f} MB/s)",
                  flush=True)
            t = time.perf_counter()
            verify_checkpoint(path, r + 1, collective=False)
            v = time.perf_counter() - t
            print(f"verify {r + 1}: {v:.2f} s ({size / 1e6 / v:.0f} MB/s)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        ps.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
