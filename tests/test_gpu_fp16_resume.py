"""fp16 with dynamic loss scaling across a resume (one GPU; CPU runs refuse fp16).

An uninterrupted run saves every step; a second run is stopped by SIGTERM part-way and resumed.
The loss scaler's state (scale, growth tracker, hysteresis tracker) in each checkpoint of the
interrupted pair equals the uninterrupted run's at the same step, and so do every step's loss and
logged loss scale after the resume. The scaler is set up to move: a large initial scale backs off
on overflows, and a short growth window grows it again, so a stop lands mid-window.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 24
COMMON = ["train.fp16=true", "train.device=cuda", "train.progress_bar=false",
          "train.log_interval=1", "train.eval_interval=0", "train.micro_batch_size=8",
          "train.global_batch_size=16", f"train.max_steps={N}", f"optimizer.lr_decay_steps={N}",
          "optimizer.initial_loss_scale=16777216", "optimizer.loss_scale_window=5",
          "optimizer.hysteresis=2", "model.hidden_dropout=0.1", "checkpoint.save_interval=1",
          "parallel.data_parallel_size=1"]


def _cmd(tmp, name, ck):
    return [sys.executable, os.path.join(ROOT, "train.py"), *COMMON,
            f"hydra.run.dir={tmp}/{name}", f"checkpoint.dir={ck}"]


def _records(tmp, name):
    recs = [json.loads(l) for l in open(os.path.join(tmp, name, "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r["loss_scale"], r["skipped_iters"]) for r in recs
            if "loss" in r}


def _last_step(path) -> int:
    last = 0
    for line in path.read_text().splitlines():
        try:
            last = max(last, json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # a line being written
            pass
    return last


def _scaler(ck, step):
    """The grad scaler's state stored in checkpoint `step` (megatron-core's common state)."""
    from framework.checkpoint.reader import read_dist

    common = read_dist(os.path.join(ck, f"iter_{step:07d}"), "common")

    def find(d):
        if isinstance(d, dict):
            if "growth_tracker" in d and "scale" in d:
                return d
            for v in d.values():
                got = find(v)
                if got is not None:
                    return got
        return None

    s = find(common)
    assert s is not None, f"no grad scaler state in {ck}/iter_{step:07d}"
    return (float(torch.as_tensor(s["scale"]).reshape(-1)[0]), int(s["growth_tracker"]),
            int(s["hysteresis_tracker"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_resume_keeps_the_loss_scaler_state(tmp_path):
    full = subprocess.run(_cmd(tmp_path, "full", f"{tmp_path}/a"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = _records(tmp_path, "full")
    scales = [ref[s][1] for s in sorted(ref)]
    assert ref[N][2] > 0 and len(set(scales)) > 2, scales  # it backed off and grew again

    p = subprocess.Popen(_cmd(tmp_path, "stopped", f"{tmp_path}/b"), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    end = time.time() + 600
    while time.time() < end and p.poll() is None:  # stop after step 8 or later
        if metrics.exists() and _last_step(metrics) >= 8:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    stop = int((tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text())
    assert 8 <= stop < N, stop
    rest = subprocess.run(_cmd(tmp_path, "rest", f"{tmp_path}/b"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert rest.returncode == 0, rest.stderr[-3000:]
    got = _records(tmp_path, "rest")
    assert sorted(got) == list(range(stop + 1, N + 1))
    for s in (stop, N):  # the saved state at the stop, and after the resumed steps
        assert _scaler(f"{tmp_path}/b", s) == _scaler(f"{tmp_path}/a", s), s
    assert {s: got[s][:2] for s in got} == {s: ref[s][:2] for s in got}  # exact
    print(f"\nfp16 resume at step {stop}: scaler {_scaler(f'{tmp_path}/b', stop)} -> "
          f"{_scaler(f'{tmp_path}/b', N)} at {N}, equal to the uninterrupted run's; "
          f"loss scales {scales}")


def _run(tmp_path, common, name, ck, steps):
    """train.py with `common` for `steps` steps, checkpoints in `ck`, run dir <tmp>/<name>."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common,
                        f"train.max_steps={steps}", f"hydra.run.dir={tmp_path}/{name}",
                        f"checkpoint.dir={ck}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(tmp_path, name):
    recs = [json.loads(l) for l in open(os.path.join(tmp_path, name, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_resume_from_a_checkpoint_saved_before_the_first_step(tmp_path):
    """A bf16 checkpoint written at train.max_steps=0 holds the fp32 main params but no Adam
    moments yet; resuming it (same checkpoint.dir, more steps) trains exactly like one run."""
    common = ["train.device=cuda", "train.progress_bar=false", "train.log_interval=1",
              "train.eval_interval=0", "train.micro_batch_size=8", "train.global_batch_size=16",
              "optimizer.lr_decay_steps=4", "checkpoint.save_interval=100",
              "parallel.data_parallel_size=1"]

    _run(tmp_path, common, "seed", f"{tmp_path}/b", 0)
    rest = _run(tmp_path, common, "rest", f"{tmp_path}/b", 4)
    assert "holds no Adam moments" in rest.stdout + rest.stderr
    _run(tmp_path, common, "full", f"{tmp_path}/a", 4)
    got, ref = _losses(tmp_path, "rest"), _losses(tmp_path, "full")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == ref  # exact


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp8, workers", [(None, 0), ("delayed", 0), (None, 2)])
def test_resume_under_cuda_graphs_is_exact(tmp_path, fp8, workers):
    """model.cuda_graph=true keeps graph-safe generators in the RNG tracker; checkpoints store
    them as tensors (a weights-only load refuses generators) and load them back as generators,
    and the graph capture (at each process's first step) leaves the RNG states alone. 8 steps
    saved at 4 and resumed train exactly like 8 uninterrupted steps, dropout on. With
    train.fp8=delayed the checkpoint also carries the amax histories. With loader workers, whose
    batches a thread of torch's DataLoader page-locks (data.pin_memory), the capture pass takes
    unpinned batches, so that thread makes no CUDA call during mcore's capture."""
    common = ["train.device=cuda", "train.progress_bar=false", "train.log_interval=1",
              "train.eval_interval=0", "train.micro_batch_size=8", "train.global_batch_size=16",
              "optimizer.lr_decay_steps=8", "checkpoint.save_interval=4",
              "parallel.data_parallel_size=1", "model.cuda_graph=true", "train.bf16=true",
              "model.hidden_dropout=0.1", f"data.num_workers={workers}"] + \
        ([f"train.fp8={fp8}"] if fp8 else [])

    _run(tmp_path, common, "full", f"{tmp_path}/a", 8)
    _run(tmp_path, common, "first", f"{tmp_path}/b", 4)
    _run(tmp_path, common, "rest", f"{tmp_path}/b", 8)
    rest = _losses(tmp_path, "rest")
    assert sorted(rest) == [5, 6, 7, 8]
    assert rest == {s: v for s, v in _losses(tmp_path, "full").items() if s > 4}  # exact
