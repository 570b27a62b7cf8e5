"""FP8 against bf16 training loss on a real tokenised corpus, one GPU, one run (`train.fp8`).

    python benchmarks/fp8_loss.py [--steps 500] [--recipes tensorwise,rowwise] [--out DIR]

The corpus is built offline (the GPU machine has no internet): text that ships with Python
itself, the reference-manual topics of `pydoc_data.topics` (English prose) and the standard
library's `.py` sources (code, comments and docstrings), in sorted order, up to --corpus-mb.
A byte-level BPE tokenizer (GPT-2's scheme; vocabulary --vocab) is trained on it with HF
`tokenizers`, and the text is preprocessed to `.bin/.idx` by `framework.data.indexed.preprocess`,
as user data is. Then the real `train.py` trains a GPT at gpt2-small's width (12 layers, 768
hidden, 12 heads; seq 1024; dropout 0; micro-batch 8, global batch 16; AdamW, lr 6e-4 cosine to
6e-5 after 50 warm-up steps) for --steps steps, once in bf16 and once per FP8 recipe, each from
the same seed (the same initial weights and data order).

Prints each run's mean loss over the last 100 steps and FP8's difference from bf16 (the issue's
target: within 1%), and writes the curves to <out>/fp8_loss.png and the numbers to
<out>/fp8_loss.json (default out: benchmarks/results/).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def corpus_documents(max_mb: float):
    """Python's reference topics, then the stdlib sources (sorted), up to max_mb of text."""
    docs = []
    try:
        from pydoc_data.topics import topics

        docs += [topics[k] for k in sorted(topics)]
    except ImportError:  # some distributions leave pydoc_data out
        pass
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "dist-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
        if sum(len(d) for d in docs) > max_mb * 2 ** 20:
            break
    return [d for d in docs if d.strip()]


def build_data(d: str, vocab: int, max_mb: float):
    """Train the tokenizer and write the indexed dataset; returns (tokenizer dir, prefix)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from framework.data.indexed import preprocess
    from framework.tokenizer import Tokenizer as FwTokenizer

    docs = corpus_documents(max_mb)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tok_dir = os.path.join(d, "tokenizer")
    hf.save_pretrained(tok_dir)
    prefix = os.path.join(d, "stdlib_text_document")
    preprocess(docs, FwTokenizer(hf), prefix, workers=min(8, os.cpu_count() or 1),
               progress=False)
    n_tokens = os.path.getsize(prefix + ".bin") // 2  # uint16 tokens below 65500 ids
    return tok_dir, prefix, len(docs), sum(len(x) for x in docs), n_tokens


# --recipes names beyond train.fp8's own values: the settings each stands for
BEST = ["train.fp8=delayed", "model.fp8_fused_act=true", "model.fp8_fused_act_backward=true"]
RECIPES = {"best": BEST, "best_fast_bwd": BEST + ["model.fp8_backward_fast_accum=true"]}


def train(d: str, name: str, tok_dir: str, prefix: str, steps: int, extra):
    run = os.path.join(d, name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "model=gpt2_small",
           "model.vocab_size=null", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
           "data=indexed", f"data.path=[{prefix}]", "data.split='100,0,0'",
           f"tokenizer.path={tok_dir}", f"train.max_steps={steps}", "train.log_interval=1",
           "train.eval_interval=0", "train.micro_batch_size=8", "train.global_batch_size=16",
           "train.progress_bar=false", "train.seed=1234", "checkpoint.save=false",
           "optimizer.lr=6e-4", "optimizer.min_lr=6e-5", "optimizer.lr_warmup_steps=50",
           "parallel=single", "parallel.data_parallel_size=1",
           f"checkpoint.dir={run}/ckpt", f"hydra.run.dir={run}/out", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    if r.returncode != 0:
        raise SystemExit(f"error: the {name} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    recs = [json.loads(x) for x in open(os.path.join(run, "out", "metrics.jsonl"))]
    losses = {x["step"]: x["loss"] for x in recs if "loss" in x}
    ms = [x["ms_per_iter"] for x in recs if "ms_per_iter" in x and x["step"] > 20]
    return [losses[s] for s in sorted(losses)], sum(ms) / max(len(ms), 1), time.time() - t0


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--recipes", default="tensorwise",
                    help="comma-separated train.fp8 recipes, or " + ", ".join(
                        f"{k} ({' '.join(v)})" for k, v in RECIPES.items()))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpus-mb", type=float, default=32.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        tok_dir, prefix, n_docs, n_chars, n_tokens = build_data(d, a.vocab, a.corpus_mb)
        print(f"corpus: {n_docs} documents, {n_chars / 2 ** 20:.1f} MiB of Python's own docs and "
              f"stdlib sources, {n_tokens / 1e6:.2f}M tokens (byte-level BPE, vocab {a.vocab}); "
              f"built in {time.time() - t0:.0f} s", flush=True)
        runs = {"bf16": []} | {f"fp8 {r}": RECIPES.get(r, [f"train.fp8={r}"])
                               for r in a.recipes.split(",") if r}
        curves = {}
        for name, extra in runs.items():
            losses, ms, wall = train(d, name.replace(" ", "_"), tok_dir, prefix, a.steps, extra)
            curves[name] = {"losses": losses, "ms_per_iter": ms, "wall_s": wall}
            print(f"{name}: {len(losses)} steps, {ms:.1f} ms/iter, {wall:.0f} s", flush=True)
    last = min(100, a.steps)
    ref = sum(curves["bf16"]["losses"][-last:]) / last
    print(f"\nFP8 vs bf16 loss, gpt2-small width, seq 1024, {a.steps} steps, one {card}")
    print(f"| run | mean loss, last {last} steps | vs bf16 | ms/iter |")
    print("|---|---|---|---|")
    summary = {"card": card, "steps": a.steps, "tokens": n_tokens, "vocab": a.vocab,
               "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for name, c in curves.items():
        mean = sum(c["losses"][-last:]) / last
        rel = (mean - ref) / ref
        print(f"| {name} | {mean:.4f} | {100 * rel:+.2f}% | {c['ms_per_iter']:.1f} |")
        summary["runs"][name] = {"mean_last": mean, "rel_vs_bf16": rel, **c}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fp8_loss.json"), "w") as f:
        json.dump(summary, f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, c in curves.items():
        ax.plot(range(1, len(c["losses"]) + 1), c["losses"], label=name, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"FP8 vs bf16, gpt2-small width, seq 1024, {a.steps} steps, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "fp8_loss.png"), dpi=120)
    print(f"wrote {os.path.join(a.out, 'fp8_loss.png')} and fp8_loss.json")


if __name__ == "__main__":
    main()
