"""Settings a run takes but used to drop without a word (the 2026-12-05 audit), as train.py runs:
* resuming with other optimizer settings: the checkpoint's optimizer and scheduler state would
  keep its own lr, schedule, weight decay, betas and eps. Refused in one line naming the fields;
  `optimizer.override_on_resume=true` continues with the new values (the learning rate then
  follows the new schedule from the checkpoint's step, as a fresh run with those settings does
  at that step), the moments kept;
* `data.num_workers` reached no DataLoader: now it does, with the same batches;
* a warm-up longer than the decay is capped: now a note says so.
"""
from __future__ import annotations

import torch

from framework.config import OptimizerConfig, ParallelConfig
from helpers import run_train

COMMON = ["train.eval_interval=0", "checkpoint.save_interval=3"]


def _lrs(run):
    return {r["step"]: r["lr"] for r in run.records if "lr" in r}


def test_resume_with_other_optimizer_settings(tmp_path):
    ck = f"checkpoint.dir={tmp_path}/ck"
    run_train(*COMMON, ck, "train.max_steps=3", cwd=tmp_path, name="a")
    new = ["optimizer.lr=0.05", "optimizer.adam_beta2=0.5"]
    r = run_train(*COMMON, ck, "train.max_steps=5", *new, cwd=tmp_path, name="b", expect=None)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if "optimizer.lr: checkpoint=" in line]
    assert len(err) == 1, r.stderr[-2000:]
    assert "optimizer.adam_beta2: checkpoint=0.95 config=0.5" in err[0]
    assert "optimizer.override_on_resume=true" in err[0]
    assert not (tmp_path / "ck" / "iter_0000005").exists()  # nothing trained, nothing written
    # only the length changed: the same run goes on (its schedule, as the README says)
    on = run_train(*COMMON, f"checkpoint.dir={tmp_path}/ck2", "train.max_steps=3",
                   cwd=tmp_path, name="c")
    assert on.returncode == 0
    run_train(*COMMON, f"checkpoint.dir={tmp_path}/ck2", "train.max_steps=5", cwd=tmp_path,
              name="d")
    # override: the new schedule from step 4 on, equal to a fresh run's with these settings
    o = run_train(*COMMON, ck, "train.max_steps=5", *new, "optimizer.override_on_resume=true",
                  cwd=tmp_path, name="e")
    assert "note: optimizer.override_on_resume=true: continuing with optimizer.lr=0.05" \
        in o.stdout + o.stderr
    assert "optimizer.adam_beta2=0.5" in o.stdout + o.stderr
    fresh = run_train(*COMMON, f"checkpoint.dir={tmp_path}/fresh", "train.max_steps=5", *new,
                      cwd=tmp_path, name="f")
    got, want = _lrs(o), _lrs(fresh)
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert abs(got[step] - want[step]) < 1e-12, (step, got[step], want[step])


def test_override_on_resume_keeps_the_run_directory():
    """It says how to resume, not what is computed: `train.max_steps=4000
    optimizer.override_on_resume=true` continues checkpoints/default."""
    from framework.cli import checkpoint_overrides

    assert checkpoint_overrides(["train.max_steps=4000", "optimizer.override_on_resume=true"]) \
        == ""
    assert checkpoint_overrides(["optimizer.lr=0.01", "optimizer.override_on_resume=true"]) \
        == "optimizer.lr=0.01"


def test_only_what_the_checkpoint_stores_is_compared(tmp_path):
    """A seed checkpoint (train.max_steps=0) stores the scheduler but no optimizer tensors: its
    schedule fields are compared, the betas (a fresh optimizer takes this config's) are not."""
    ck = f"checkpoint.dir={tmp_path}/seed"
    run_train(*COMMON, ck, "train.max_steps=0", cwd=tmp_path, name="seed")
    run_train(*COMMON, ck, "train.max_steps=1", "optimizer.adam_beta2=0.5", cwd=tmp_path,
              name="betas")
    r = run_train(*COMMON, ck, "train.max_steps=2", "optimizer.weight_decay=0.3",
                  cwd=tmp_path, name="wd", expect=None)
    assert r.returncode != 0 and "optimizer.weight_decay: checkpoint=0.1 config=0.3" in r.stderr


def test_resume_with_data_workers_is_bit_identical(tmp_path):
    """With DataLoader workers, a resumed run's steps equal the uninterrupted run's (gpt_tiny,
    dropout on). The loader draws its workers' seed from its own generator, not from the
    global CPU RNG that the resume restores; this test passes without that too (the dropout
    here does not draw from that RNG), so it checks the workers' batches and the resume, not
    the draw."""
    common = ["train.eval_interval=0", "data.num_workers=2", "checkpoint.save_interval=2",
              "optimizer.lr_decay_steps=4"]  # the same schedule for the 2-step first half
    full = run_train(*common, f"checkpoint.dir={tmp_path}/a", "train.max_steps=4",
                     cwd=tmp_path, name="full").losses
    run_train(*common, f"checkpoint.dir={tmp_path}/b", "train.max_steps=2", cwd=tmp_path,
              name="first")
    rest = run_train(*common, f"checkpoint.dir={tmp_path}/b", "train.max_steps=4",
                     cwd=tmp_path, name="rest").losses
    assert sorted(rest) == [3, 4]
    assert all(rest[s] == full[s] for s in (3, 4)), (rest, full)


def test_apply_optimizer_settings_sets_the_groups(mp1):
    """The param groups' betas and eps, and lr / weight decay at the current step, after a
    scheduler state was loaded."""
    from framework.config import ModelConfig
    from framework.models.build import build_model
    from framework.optimizer import apply_optimizer_settings, build_optimizer

    model = build_model(ModelConfig(), ParallelConfig(), vocab_size=64, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)
    old = OptimizerConfig(lr=1e-3, min_lr=1e-4)
    opt, sched = build_optimizer(old, model, max_steps=100, bf16=False, fp16=False,
                                 use_distributed_optimizer=False, overlap_param_gather=False,
                                 on_gpu=False)
    sched.step(increment=50)
    new = OptimizerConfig(lr=2e-2, min_lr=2e-3, adam_beta1=0.8, adam_beta2=0.5, adam_eps=1e-6,
                          weight_decay=0.01, lr_warmup_steps=0)
    changed = apply_optimizer_settings(opt, sched, new, max_steps=100,
                                       stored={"lr": 1e-3, "adam_beta2": 0.95, "adam_eps": 1e-8,
                                               "sgd_momentum": 0.5})
    assert changed == ["optimizer.lr=0.02", "optimizer.adam_beta2=0.5", "optimizer.adam_eps=1e-06"]
    assert apply_optimizer_settings(opt, sched, new, max_steps=200, stored={"lr": 2e-2}) == [
        "the decay over 200 steps (was 100)"]
    apply_optimizer_settings(opt, sched, new, max_steps=100)
    _o2, ref = build_optimizer(new, model, max_steps=100, bf16=False, fp16=False,
                               use_distributed_optimizer=False, overlap_param_gather=False,
                               on_gpu=False)
    ref.step(increment=50)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.5) and g["eps"] == 1e-6
        assert g["lr"] == ref.get_lr(g)
        assert g["weight_decay"] == 0.01 * g.get("wd_mult", 1.0)
    assert sched.num_steps == 50


def test_num_workers_feed_the_same_batches(tmp_path):
    common = ["train.eval_interval=0", "checkpoint.save=false", "train.max_steps=3"]
    a = run_train(*common, cwd=tmp_path, name="w0").losses
    b = run_train(*common, "data.num_workers=2", cwd=tmp_path, name="w2").losses
    assert a == b and sorted(a) == [1, 2, 3]


def test_capped_warmup_is_noted(tmp_path):
    r = run_train("train.eval_interval=0", "checkpoint.save=false", "train.max_steps=3",
                  "optimizer.lr_warmup_steps=500", cwd=tmp_path, name="w")
    assert "note: optimizer.lr_warmup_steps=500 is capped at 2" in r.stdout + r.stderr
