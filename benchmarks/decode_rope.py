"""Decode-step time of a RoPE model: lean decode (framework/fast/lean_decode.py) against
megatron-core's modules, one process, one run.

    python benchmarks/decode_rope.py [--model llama_tiny] [--batch 1] [--prompt-len 32] \
        [--max-new-tokens 32] [--iters 5] [--vocab 512] [--threads 1]

A random-weight model from conf/model/<model>.yaml (default llama_tiny: 4 layers, hidden 128,
4 heads in 2 KV groups, RMSNorm, SwiGLU, RoPE with Llama-3 scaling, untied), dropout 0, greedy
decoding of random prompts (fixed seed), no EOS, so every run makes exactly --max-new-tokens
tokens (checked). fp32 on CPU; bf16 on a GPU. Candidates, timed one after another:
* lean: `generate(..., decode_cuda_graph=False)`, eager lean decode steps;
* static: `decode_cuda_graph=True` (on CPU the static-shape step runs eagerly; on a GPU it is
  one CUDA graph per token);
* mcore: `lean_decode=False`, megatron-core's modules for every step.
Per candidate, the median over --iters runs (after one warm-up; the candidates' runs taken in
turn, round-robin, so that other load on the machine hits them alike) of a run with
--max-new-tokens tokens and of a run with 1 token (prefill and first token only); ms per decode step is their
difference divided by (max_new_tokens - 1), so the prefill, which every path runs through
megatron-core's modules, is left out. On CPU (fp32) the tokens of all candidates must agree (checked).
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

from benchmarks.generation import build_ours, sync  # noqa: E402

CANDIDATES = {"lean": dict(decode_cuda_graph=False), "static": dict(decode_cuda_graph=True),
              "mcore": dict(lean_decode=False)}


def model_config(name: str, vocab: int):
    from omegaconf import OmegaConf

    from framework.config import ModelConfig

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model",
                                                             f"{name}.yaml")))
    raw.pop("defaults", None)
    return replace(ModelConfig(**raw), hidden_dropout=0.0, attention_dropout=0.0,
                   vocab_size=vocab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)

    from data_tools.convert import single_process_world
    from framework.fast.lean_decode import supported
    from framework.generation import generate
    from framework.models.wrappers import unwrap

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if not on_gpu:
        torch.set_num_threads(a.threads)
    cfg = model_config(a.model, a.vocab)
    new, plen, b = a.max_new_tokens, a.prompt_len, a.batch
    assert new >= 2 and plen + new <= cfg.max_positions, "prompt + new tokens exceed the context"
    rows = []
    with single_process_world():
        model, _padded = build_ours(cfg, device, on_gpu, a.seed)
        assert supported(unwrap(model[0])), f"{a.model}: the lean path does not cover it"
        ids = torch.randint(0, cfg.vocab_size, (b, plen),
                            generator=torch.Generator().manual_seed(a.seed)).to(device)
        runs = {}  # (label, n) -> function
        for label, kw in CANDIDATES.items():
            for n in (new, 1):
                runs[label, n] = (lambda n=n, kw=kw: generate(
                    model, ids, vocab_size=cfg.vocab_size, max_new_tokens=n, **kw))
        outs = {label: runs[label, new]() for label in CANDIDATES}  # warm-up, tokens
        for label in CANDIDATES:
            runs[label, 1]()
        times = {key: [] for key in runs}
        # round-robin, so that load from other work on the machine hits every candidate alike
        for _ in range(a.iters):
            for key, fn in runs.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[key].append(time.perf_counter() - t)
        for label in CANDIDATES:
            assert tuple(outs[label].shape) == (b, plen + new), label
            full = statistics.median(times[label, new])
            first = statistics.median(times[label, 1])
            step = (full - first) / (new - 1)
            rows.append((label, full, first, step))
        sync(device)
    for label, out in outs.items():  # fp32 on CPU: the same tokens (bf16 may round apart)
        if not on_gpu:
            assert torch.equal(out, outs["mcore"]), f"{label}'s tokens differ from mcore's"
    mcore_step = rows[-1][3]
    where = torch.cuda.get_device_name(device) if on_gpu else \
        f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n# {where}  torch {torch.__version__}  {a.model} ({cfg.num_layers}L h"
          f"{cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_query_groups} groups, "
          f"vocab {cfg.vocab_size}), {'bf16' if on_gpu else 'fp32'}, batch {b}, prompt {plen}, "
          f"{new} new tokens, greedy, median of {a.iters}")
    print("| candidate | ms / run | ms / run of 1 token | ms / decode step | mcore / this |")
    print("|---|---|---|---|---|")
    for label, full, first, step in rows:
        print(f"| {label} | {1000 * full:.1f} | {1000 * first:.1f} | {1000 * step:.2f} | "
              f"{mcore_step / step:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
