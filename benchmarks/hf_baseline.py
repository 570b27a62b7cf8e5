"""Hugging Face baseline for the speed tables: training steps of a transformers causal LM.

    python benchmarks/hf_baseline.py --model gpt2_large --micro-batch 24 --compile [--dropout 0.1]
    python benchmarks/hf_baseline.py --model llama3_1b --micro-batch 12 --compile
    python benchmarks/hf_baseline.py --model llama3_1b --settings-only    # no GPU: what would run

The recipe HF users run (transformers' Trainer does the same with `bf16=True`):
* fp32 parameters and gradients, the forward under `torch.autocast("cuda", torch.bfloat16)`;
* SDPA attention, no KV cache in training (`use_cache=False`);
* `--compile`: `torch.compile(model)` (default mode), and the loss from `labels=` inside the
  compiled call (HF's own shifted cross-entropy on fp32-upcast logits);
* torch AdamW, fused, with megatron-core's weight-decay groups (none on biases and 1-D params),
  the gradient norm clipped with `clip_grad_norm_`, and the LR schedule of our side (linear
  warmup, then cosine to min_lr); defaults = our `conf/optimizer/adam.yaml`, and
  `benchmarks/speed_table.py` passes our composed values explicitly.

Data: 4 batches of token ids drawn uniformly over [0, real vocab) from a seeded generator, cycled
(`token_batches`; our side's `data=random` draws the same distribution).

Timing as our side's `train.py` logs: windows of `--log-interval` steps, the host waiting for the
GPU only at each window's end; the first window (compilation, autotuning) is warm-up; tok/s is
tokens over the measured windows' total time. Prints one JSON line (last line of stdout): tok/s,
ms per step, per-window ms, peak allocated memory since the process started (as our side's
`train.py` reports it: warm-up and compilation included), torch.compile's graph breaks and
graphs (`dynamo_stats`), and the settings read back from the built model and optimizer
(`benchmarks/shapes.py: hf_settings`).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.shapes import (SHAPES, check_dropout, get_shape, hf_model,  # noqa: E402
                               hf_optimizer, hf_settings, random_ids)

# our conf/optimizer/adam.yaml (speed_table.py passes the composed values explicitly)
OPT_DEFAULTS = dict(lr=1e-3, min_lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                    clip_grad=1.0, lr_warmup_steps=10, lr_decay_style="cosine")
AUTOCAST = "bfloat16"  # the dtype the forward runs under (torch.autocast)
N_BATCHES, DATA_SEED = 4, 0


def data_vocab(shape) -> int:
    """The ids are drawn over the real vocab, also under --pad-vocab (padded rows are never a
    target, as on our side)."""
    return shape.vocab


def data_setting(shape) -> str:
    """hf_settings' `data` field: what `token_batches` draws for `shape`."""
    return random_ids(data_vocab(shape))


def token_batches(shape, micro_batch: int, device):
    """N_BATCHES distinct [micro_batch, seq] batches of ids drawn uniformly over
    [0, data_vocab(shape)) from a generator seeded with DATA_SEED (not zeros: METHOD.md), to be
    cycled (no host RNG per step)."""
    import torch

    g = torch.Generator(device=device).manual_seed(DATA_SEED)
    return [torch.randint(0, data_vocab(shape), (micro_batch, shape.seq), device=device,
                          generator=g) for _ in range(N_BATCHES)]


def dynamo_stats(counters) -> dict:
    """torch.compile's graph breaks (count and the most frequent reasons) and the number of
    distinct graphs it compiled, from torch._dynamo.utils.counters: a break splits the
    compiled model and runs Python between the pieces, so it is part of the HF timing."""
    breaks = counters.get("graph_break", {})
    top = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
    return {"graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": {str(k)[:200]: int(v) for k, v in top},
            "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0))}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2_large", choices=sorted(SHAPES))
    # dimension overrides (tests run tiny versions of a shape)
    for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="residual, embedding and attention dropout (HF Llama/Qwen2: 0 only)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15, help="measured steps (whole windows)")
    ap.add_argument("--log-interval", type=int, default=5, help="steps per timed window")
    ap.add_argument("--warmup-windows", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--pad-vocab", type=int, default=1,
                    help="round the vocab up to a multiple of this (1 = the real vocab)")
    for k, v in OPT_DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--no-fused", action="store_true", help="foreach AdamW instead of fused")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--settings-only", action="store_true",
                    help="build the model on the meta device, print its settings, exit")
    a = ap.parse_args(argv)
    for f in ("micro_batch", "steps", "log_interval"):
        if getattr(a, f) <= 0:
            ap.exit(2, f"error: --{f.replace('_', '-')} must be positive, got {getattr(a, f)}\n")
    shape = get_shape(a.model)
    dims = {f: getattr(a, f) for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab",
                                       "seq") if getattr(a, f) is not None}
    if "heads" in dims and "kv_heads" not in dims and shape.kv_heads == shape.heads:
        dims["kv_heads"] = dims["heads"]
    if "hidden" in dims and "ffn" not in dims and shape.ffn == 4 * shape.hidden:
        dims["ffn"] = 4 * dims["hidden"]
    shape = shape.replace(**dims)
    try:
        check_dropout(shape, a.dropout)
    except ValueError as e:
        ap.exit(2, f"error: --dropout: {e}\n")
    return a, shape


def main(argv=None) -> None:
    import torch

    a, shape = parse(argv)
    windows = -(-a.steps // a.log_interval)
    total = a.log_interval * (a.warmup_windows + windows)
    opt = dict(lr=a.lr, min_lr=a.min_lr, betas=[a.beta1, a.beta2], eps=a.eps,
               weight_decay=a.weight_decay, clip_grad=a.clip_grad,
               lr_warmup_steps=a.lr_warmup_steps, lr_decay_style=a.lr_decay_style,
               fused=not a.no_fused)
    vocab = -(-shape.vocab // a.pad_vocab) * a.pad_vocab
    dev = torch.device("meta" if a.settings_only else a.device)
    with dev:
        model = hf_model(shape, a.dropout, vocab)
    model.train()
    optimizer, sched = hf_optimizer(model, opt, total)
    settings = hf_settings(model, optimizer, opt, shape.seq, a.micro_batch, total,
                           data=data_setting(shape), autocast=AUTOCAST)
    n_params = sum(p.numel() for p in model.parameters())
    import transformers

    info = {"settings": settings, "params": n_params, "vocab_rows": vocab,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "class": type(model).__name__, "attn": model.config._attn_implementation}
    if a.settings_only:
        print(json.dumps(info))
        return
    fwd = torch.compile(model) if a.compile else model
    batches = token_batches(shape, a.micro_batch, dev)
    amp = torch.autocast(dev.type, dtype=getattr(torch, AUTOCAST))
    params = [p for p in model.parameters()]

    def step(i):
        x = batches[i % len(batches)]
        with amp:
            loss = fwd(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if a.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, a.clip_grad)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    win_ms, i, loss = [], 0, None
    # no reset of the peak after warm-up: peak since process start, as our side reports it
    for _window in range(a.warmup_windows + windows):
        t = time.perf_counter()
        for _ in range(a.log_interval):
            loss = step(i)
            i += 1
        loss_val = float(loss.detach())  # the host waits here, as our side's log step does
        sync()
        win_ms.append(1000 * (time.perf_counter() - t) / a.log_interval)
    meas = win_ms[a.warmup_windows:]
    ms = sum(meas) / len(meas)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    res = dict(info, tok_s=a.micro_batch * shape.seq / (ms / 1000), ms_per_iter=ms,
               window_ms=[round(x, 2) for x in win_ms], peak_gb=peak, peak_kind="allocated",
               last_loss=loss_val, steps=i)
    if a.compile:
        from torch._dynamo.utils import counters

        res.update(dynamo_stats(counters))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
