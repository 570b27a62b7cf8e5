"""Text-generation throughput (tokens/s) of our `generate` against Hugging Face, one GPU, one run.

    python benchmarks/generation.py [--batches 1,32] [--prompt-len 128] [--max-new-tokens 128] \
        [--iters 3] [--no-cache-batches 1] [--tiny]

A random-weight GPT with gpt2-large's dimensions (conf/model/gpt2_large.yaml: 36 layers, hidden
1280, 20 heads, 1024 positions, learned absolute positions, tanh-GeLU, LayerNorm, vocab 50257,
padded as our build pads it), bf16, dropout 0, greedy decoding of random prompts (fixed seed).
Candidates, timed one after another in this process on GPU 0, at every batch size:
* ours, `framework.generation.generate` with the KV cache and eager decode steps through
  framework/fast/lean_decode.py (`decode_cuda_graph=False`; the default on CPU and under TP/PP);
* on GPU, ours with decode steps replayed as one CUDA graph (`decode_cuda_graph=True`; the
  default for a single-GPU model);
* ours with the KV cache and megatron-core's modules for every step (`lean_decode=False`);
* ours with `use_cache=False` (the whole sequence re-run every step; slow, so only at
  `--no-cache-batches`, batch 1 by default);
* Hugging Face `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`, same dimensions, bf16
  parameters, SDPA attention.
Neither side stops early: ours gets no `eos_id` and HF's config has no EOS token, so every run
produces exactly `--max-new-tokens` tokens per row (checked). Each candidate / batch is warmed
up once, then `--iters` runs are timed with `torch.cuda.synchronize()` around each; the table
gives the median: generated tokens/s (batch x new tokens / time), time per run, ms per decode
step (time / new tokens, prefill included) and the ratio of tokens/s to HF at the same batch.

`--tiny` uses tiny dimensions (2 layers, hidden 64, 4 heads, vocab 128, 256 positions) and runs
on CPU in fp32 when there is no GPU (a smoke test; its numbers mean nothing).
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=256,
            max_position_embeddings=256, vocab_size=128)


def model_config(tiny: bool):
    """gpt2_large.yaml as a ModelConfig, dropout 0 (tiny dimensions with `tiny`)."""
    from omegaconf import OmegaConf

    from framework.config import ModelConfig

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model",
                                                             "gpt2_large.yaml")))
    raw.pop("defaults", None)
    cfg = ModelConfig(**raw)
    cfg = replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    return replace(cfg, name="gpt_tiny", **TINY) if tiny else cfg


def build_ours(cfg, device, bf16: bool, seed: int):
    from framework.config import ParallelConfig
    from framework.models.build import build_model, padded_vocab_size

    torch.manual_seed(seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    model = build_model(cfg, ParallelConfig(), vocab_size=padded, bf16=bf16, fp16=False,
                        device=device, wrap_ddp=False)
    return model, padded


def build_hf(cfg, device, dtype, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    hcfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions,
                      n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                      n_head=cfg.num_attention_heads, activation_function=act,
                      layer_norm_epsilon=cfg.layernorm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(hcfg)
    return model.to(dtype).eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int):
    """Warm up once, then the median seconds of `iters` synchronized runs, and the last output."""
    out = fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-cache-batches", default="1",
                    help="batch sizes at which ours without KV cache also runs ('' = none)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny dimensions; CPU (fp32) allowed when there is no GPU")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the number of layers (e.g. --tiny --layers 36: gpt2-large's "
                         "depth at tiny width, where a step is all per-layer overhead)")
    a = ap.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",") if x]
    no_cache = {int(x) for x in a.no_cache_batches.split(",") if x}

    import transformers

    from framework.generation import generate

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not a.tiny:
        raise SystemExit("no GPU: this benchmark needs CUDA (use --tiny for a CPU smoke test)")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    bf16 = on_gpu
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = model_config(a.tiny)
    if a.layers:
        cfg = replace(cfg, num_layers=a.layers)
    new, plen = a.max_new_tokens, a.prompt_len
    card = torch.cuda.get_device_name(device) if on_gpu else "CPU"

    rows = []  # (label, batch, seconds or None, note)
    # one process, TP = PP = 1 (the converter's helper: gloo, plus NCCL when CUDA is present)
    from data_tools.convert import single_process_world

    with single_process_world():
        ours, padded = build_ours(cfg, device, bf16, a.seed)
        hf = build_hf(cfg, device, dtype, a.seed)
        gen = torch.Generator().manual_seed(a.seed)
        for b in batches:
            ids = torch.randint(0, cfg.vocab_size, (b, plen), generator=gen).to(device)
            mask = torch.ones_like(ids)
            cands = [("HF GPT2LMHeadModel.generate (KV cache)",
                      lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                          do_sample=False, use_cache=True, pad_token_id=0))]
            cands.append(("ours, KV cache, lean eager decode steps",
                          lambda: generate(ours, ids, vocab_size=cfg.vocab_size,
                                           max_new_tokens=new, decode_cuda_graph=False)))
            if on_gpu:
                cands.append(("ours, KV cache, decode steps as one CUDA graph (GPU default)",
                              lambda: generate(ours, ids, vocab_size=cfg.vocab_size,
                                               max_new_tokens=new, decode_cuda_graph=True)))
            cands.append(("ours, KV cache, megatron-core modules every step (lean_decode=False)",
                          lambda: generate(ours, ids, vocab_size=cfg.vocab_size,
                                           max_new_tokens=new, lean_decode=False)))
            if b in no_cache:
                cands.append(("ours, no KV cache (use_cache=False)",
                              lambda: generate(ours, ids, vocab_size=cfg.vocab_size,
                                               max_new_tokens=new, use_cache=False)))
            for label, fn in cands:
                try:
                    sec, out = timed(fn, device, a.iters)
                except torch.cuda.OutOfMemoryError:
                    rows.append((label, b, None, "out of memory"))
                    torch.cuda.empty_cache()
                    print(rows[-1], flush=True)
                    continue
                # every run must produce exactly `new` tokens per row (no early stop)
                assert tuple(out.shape) == (b, plen + new), (label, tuple(out.shape))
                rows.append((label, b, sec, ""))
                print(f"{label}, batch {b}: {1000 * sec:.1f} ms/run", file=sys.stderr,
                      flush=True)
        del ours, hf

    dims = (f"{cfg.num_layers}L h{cfg.hidden_size} {cfg.num_attention_heads} heads, vocab "
            f"{cfg.vocab_size} (ours padded to {padded})")
    print(f"\n# {card}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"{'tiny' if a.tiny else 'gpt2-large'} dims ({dims}), {'bf16' if bf16 else 'fp32'}, "
          f"random weights, prompt {plen}, {new} new tokens, greedy, median of {a.iters}")
    print("| candidate | batch | new tok/s | ms / run | ms / step | vs HF |")
    print("|---|---|---|---|---|---|")
    hf_rate = {b: b * new / s for label, b, s, _ in rows if label.startswith("HF") and s}
    for label, b, sec, note in rows:
        if sec is None:
            print(f"| {label} | {b} | did not run: {note} | | | |")
            continue
        rate = b * new / sec
        ratio = f"{rate / hf_rate[b]:.2f}x" if b in hf_rate else "n/a"
        print(f"| {label} | {b} | {rate:.1f} | {1000 * sec:.1f} | {1000 * sec / new:.2f} | "
              f"{ratio} |")
    return rows


if __name__ == "__main__":
    main()
