"""Baseline for benchmarks/throughput.py: Hugging Face GPT2LMHeadModel training steps.

Mixed precision as users run it: fp32 parameters, bf16 autocast, SDPA attention, fused torch
AdamW. `--compile` wraps the model in torch.compile. Prints one JSON line with tok/s and peak
memory. Run on one GPU.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=a.layers, n_embd=a.hidden, n_head=a.heads, n_positions=a.seq,
                     vocab_size=a.vocab, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if a.compile else model
    x = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.steps
    print(json.dumps({"tok_s": a.micro_batch * a.seq / dt, "ms_per_iter": 1000 * dt,
                      "peak_gb": torch.cuda.max_memory_allocated() / 2**30}))


if __name__ == "__main__":
    main()
