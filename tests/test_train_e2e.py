"""The real `python train.py` on CPU: loss falls, checkpoints, resume, TP1 == TP2 (gloo)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.progress_bar=false", "train.log_interval=1", "train.micro_batch_size=8",
        "train.global_batch_size=16", "train.eval_iters=2", "train.device=cpu"]


def train(cwd, *overrides, name="run"):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *FAST,
           f"hydra.run.dir={cwd}/{name}", *overrides]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    path = os.path.join(cwd, name, "metrics.jsonl")
    recs = [json.loads(l) for l in open(path)]
    return recs, r.stdout


def losses(recs):
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_default_run_learns_checkpoints_and_resumes(tmp_path):
    recs, out = train(tmp_path, "train.max_steps=40", "train.eval_interval=20",
                      "checkpoint.save_interval=20")
    l = losses(recs)
    assert l[40] < l[1] - 0.5, l
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mfu"):
        assert key in recs[0]
    ckpt = tmp_path / "checkpoints" / "default"  # the default dir for a run with no overrides...
    ckpts = list((tmp_path / "checkpoints").iterdir())
    assert len(ckpts) == 1  # ...of the computation-changing keys
    ckpt = ckpts[0]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "40"
    meta = json.loads((ckpt / "iter_0000040" / "framework.json").read_text())
    assert meta["config"]["model"]["name"] == "gpt_tiny" and "torch" in meta["versions"]
    assert (ckpt / "iter_0000040" / "tokenizer").is_dir()
    # the same command again resumes at the right step
    recs2, out2 = train(tmp_path, "train.max_steps=44", "train.eval_interval=20",
                        "checkpoint.save_interval=20", name="run2")
    assert "resumed from" in out2 and "step 40" in out2
    assert sorted(losses(recs2)) == [41, 42, 43, 44]


def test_resume_is_bit_identical(tmp_path):
    common = ["train.eval_interval=0", "checkpoint.save_interval=4", "optimizer.lr_decay_steps=8",
              "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
    full, _ = train(tmp_path, "train.max_steps=8", f"checkpoint.dir={tmp_path}/a", *common,
                    name="full")
    train(tmp_path, "train.max_steps=4", f"checkpoint.dir={tmp_path}/b", *common, name="half")
    rest, out = train(tmp_path, "train.max_steps=8", f"checkpoint.dir={tmp_path}/b", *common,
                      name="rest")
    assert "resumed" in out
    lf, lr = losses(full), losses(rest)
    assert sorted(lr) == [5, 6, 7, 8]
    assert [lf[s] for s in lr] == [lr[s] for s in sorted(lr)]  # exact, with dropout on


def test_tp2_gloo_matches_tp1(tmp_path):
    """Both start from one seed checkpoint (train.max_steps=0), loaded at TP1 and at TP2."""
    train(tmp_path, "train.max_steps=0", f"checkpoint.dir={tmp_path}/seed", name="seed")
    assert (tmp_path / "seed" / "latest_checkpointed_iteration.txt").read_text() == "0"
    common = ["train.max_steps=5", "train.eval_interval=0", "checkpoint.save=false",
              f"checkpoint.load={tmp_path}/seed"]
    tp1, _ = train(tmp_path, *common, name="tp1")
    tp2, _ = train(tmp_path, *common, "parallel=tp2", name="tp2")
    a, b = losses(tp1), losses(tp2)
    assert sorted(a) == sorted(b)
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])


def test_dp2_gloo_matches_dp1(tmp_path):
    common = ["train.max_steps=4", "train.eval_interval=0", "checkpoint.save=false"]
    dp1, _ = train(tmp_path, *common, name="dp1")
    dp2, _ = train(tmp_path, *common, "parallel.data_parallel_size=2", name="dp2")
    a, b = losses(dp1), losses(dp2)
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])
