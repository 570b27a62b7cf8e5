"""Bad input to the real `python train.py`: exit non-zero with one clear `error:` line on stderr
(no traceback) naming the field or file, before any training, without touching files on disk."""
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import run_train

BASE = ["train.progress_bar=false", "train.device=cpu", "train.micro_batch_size=8",
        "train.global_batch_size=16", "train.eval_interval=0"]


def _tree_hash(path):
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a good indexed dataset and broken copies, and a seed checkpoint."""
    from framework.data.indexed import preprocess
    from framework.tokenizer import embedded_tokenizer

    d = tmp_path_factory.mktemp("inputs")
    tok = embedded_tokenizer()
    tok.save(str(d / "tok"))
    docs = [f"document number {i}: the quick brown fox jumps over the lazy dog." * 3
            for i in range(200)]
    preprocess(docs, tok, str(d / "good"), progress=False)

    def copy(name):
        for ext in (".bin", ".idx"):
            shutil.copy(d / f"good{ext}", d / f"{name}{ext}")
        return str(d / name)

    os.remove(copy("nobin") + ".bin")
    os.remove(copy("noidx") + ".idx")
    with open(copy("trunc") + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "good.bin") - 10)
    with open(copy("badhdr") + ".idx", "r+b") as f:
        f.write(b"NOTANIDX")
    with open(copy("bigid") + ".bin", "r+b") as f:  # uint16 tokens: id 65000 >= vocab
        f.seek(20)
        f.write((65000).to_bytes(2, "little"))
    (d / "empty_ckpt").mkdir()
    run_train(*BASE, "train.max_steps=0", f"checkpoint.dir={d}/seed", cwd=d, name="seedrun",
              fast=False)
    return d


def _cases(d):
    idx = ["data=indexed", f"tokenizer.path={d}/tok", "data.split='100,0,0'"]
    return [
        # config rules
        (["model.num_attention_heads=3"], "model.num_attention_heads"),
        (["train.global_batch_size=20"], "train.global_batch_size=20"),
        (["+train.bogus=1"], "train.bogus"),
        (["train.max_steps=abc"], "train.max_steps=abc"),  # Hydra's own error, one line too
        (["model=null"], "model=null: a config group takes one of its options by name"),
        (["~model"], "~model removes the model config group, which a run needs"),
        (["model.default_lr=1e-2", "optimizer.lr=1e-3"],
         "model.default_lr=1e-2 has no effect: optimizer.lr is set"),
        (["checkpoint.load=ck/train.seed=2"], "quote a value that holds '='"),
        # an interpolation to a key that does not exist: one line naming the field
        (["optimizer.lr=${nowhere.x}"], "optimizer.lr: Interpolation key 'nowhere.x' not found"),
        (["parallel=pp2"], "parallel.pipeline_model_parallel_size"),
        (["parallel.sequence_parallel=true"], "sequence_parallel"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        # an unwritable cache directory used to hang for ever on a file lock
        (["data.path_to_cache=/proc"], "data.path_to_cache=/proc"),
        (["model.cudnn_attention=true"], "model.cudnn_attention=true"),
        (["train.fp8=tensorwise"], "train.fp8=tensorwise needs a GPU with FP8"),
        # data files (checked in the parent, also for a multi-worker layout)
        ([*idx, f"data.path=[{d}/nobin]"], f"{d}/nobin.bin"),
        ([*idx, f"data.path=[{d}/noidx]"], f"{d}/noidx.idx"),
        ([*idx, f"data.path=[{d}/trunc]", "parallel=tp2"], f"{d}/trunc.bin is truncated"),
        ([*idx, f"data.path=[{d}/badhdr]"], f"{d}/badhdr.idx"),
        ([*idx, f"data.path=[{d}/bigid]"], "token id 65000"),
        (["data=indexed", f"tokenizer.path={d}/tok", f"data.path=[{d}/good]",
          "data.split='100,0,0'", "train.eval_interval=5"], "data.split"),
        # tokenizer
        (["data=indexed", f"data.path=[{d}/good]"], "tokenizer"),
        (["data=indexed", f"data.path=[{d}/good]", f"tokenizer.path={d}/nope"],
         f"tokenizer.path='{d}/nope'"),
        # checkpoints
        ([f"checkpoint.load={d}/seed", "model.num_layers=2", "model.hidden_size=64"],
         "model.num_layers: checkpoint=4 config=2; model.hidden_size: checkpoint=128 config=64"),
        ([f"checkpoint.dir={d}/seed", "model.num_layers=2", "parallel=tp2"],
         "model.num_layers: checkpoint=4 config=2"),
        ([f"checkpoint.load={d}/empty_ckpt"], "no committed checkpoint"),
    ]


def _run(d, i, overrides):
    if not any(o.startswith("checkpoint.dir=") for o in overrides):
        overrides = [*overrides, f"checkpoint.dir={d}/runs/ck{i}"]
    return run_train(*BASE, "train.max_steps=2", *overrides, cwd=d, name=f"runs/{i}",
                     fast=False, expect=None)


def test_bad_inputs_fail_with_one_line_and_touch_nothing(world):
    d = world
    cases = _cases(d)
    watched = [p for p in os.listdir(d) if p not in ("runs",)]
    before = {p: _tree_hash(d / p) if (d / p).is_dir() else
              hashlib.sha256((d / p).read_bytes()).hexdigest() for p in watched}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda ic: _run(d, ic[0], ic[1][0]), enumerate(cases)))
    problems = []
    for (overrides, needle), r in zip(cases, results):
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        if (r.returncode == 0 or "Traceback" in r.stderr or len(errors) != 1
                or needle not in errors[0] or "iter " in r.stdout):
            problems.append(f"{overrides}: rc={r.returncode} errors={errors} "
                            f"stderr tail={r.stderr[-600:]!r}")
    assert not problems, "\n".join(problems)
    after = {p: _tree_hash(d / p) if (d / p).is_dir() else
             hashlib.sha256((d / p).read_bytes()).hexdigest() for p in watched}
    assert after == before
    assert not any(os.path.exists(d / "runs" / f"ck{i}") for i in range(len(cases)))
