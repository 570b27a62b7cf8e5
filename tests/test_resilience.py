"""Resilience: signals, wall-clock budget, NaN guard, retention, atomic saves, kill -9 resume."""
import errno
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from framework.checkpoint.commit import remove_stale_tmp
from framework.checkpoint.retention import prune_checkpoints
from framework.config import CheckpointConfig, ConfigError, ModelConfig, OptimizerConfig, \
    ParallelConfig, TrainConfig
from framework.optimizer_step import (deferred_optimizer_step, deferred_step_supported,
                                      guarded_optimizer_step)
from framework.training.nan_guard import NanGuard, NonFiniteError, SpikeDetector
from framework.training.stop import StopRequest
from framework.training.watchdog import Watchdog
from helpers import run_train, start_train

NO_EVAL = ["train.eval_interval=0"]
MODEL = ModelConfig(hidden_dropout=0.0, attention_dropout=0.0)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------
def test_config_fields_validate():
    TrainConfig(max_minutes=1.5, nan_policy="stop", spike_factor=3.0)
    for bad in (dict(nan_policy="ignore"), dict(max_minutes=0), dict(max_consecutive_nan=0),
                dict(spike_factor=0.5)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointConfig(keep_last=0)


def test_nan_guard_skip_then_stop_and_spikes():
    g = NanGuard("skip", max_consecutive=3)
    assert g.check(1, False, 2.0, 1.0) is None
    assert "iteration 2" in g.check(2, True, float("nan"), None)
    assert "grad norm inf" in g.check(3, True, 2.0, float("inf"))
    assert g.check(4, False, 2.0, 1.0) is None  # the run of NaNs is broken: counter resets
    g.check(5, True, float("nan"), None)
    g.check(6, True, float("nan"), None)
    with pytest.raises(NonFiniteError, match="iteration 7: 3 consecutive"):
        g.check(7, True, float("nan"), None)
    with pytest.raises(NonFiniteError, match="iteration 9 .*nan_policy=stop"):
        NanGuard("stop").check(9, True, float("inf"), None)
    s = SpikeDetector(3.0, warmup=3)
    assert [s.check(i, 1.0) for i in range(1, 6)] == [None] * 5
    assert "spike at iteration 6" in s.check(6, 10.0)
    assert s.check(7, 1.0) is None and s.spikes == 1
    assert SpikeDetector(None).check(1, 1e9) is None


def test_stop_request_signals_and_budget():
    prev = signal.getsignal(signal.SIGUSR1)
    r = StopRequest().install()
    try:
        assert r.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert r.agreed() == "SIGUSR1"
    finally:
        r.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == prev
    assert StopRequest(max_minutes=1e-6, start=time.time() - 1).agreed() == "time"
    assert StopRequest(max_minutes=10).agreed() is None


def test_watchdog_names_rank_step_and_phase():
    got = []
    w = Watchdog(0.3, rank=3, on_timeout=got.append, poll_s=0.05).start()
    w.mark(17, "stop-flag all-reduce")
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        time.sleep(0.05)
    w.stop()
    assert got and "rank 3" in got[0] and "iteration 17" in got[0] and "all-reduce" in got[0]
    quiet = []
    w = Watchdog(0.5, rank=0, on_timeout=quiet.append, poll_s=0.05).start()
    for i in range(10):  # progress keeps it quiet
        w.mark(i, "train step")
        time.sleep(0.05)
    w.stop()
    assert quiet == []


def _fake_ckpt(d, it):
    p = d / f"iter_{it:07d}"
    p.mkdir()
    (p / "framework.json").write_text("{}")


def test_retention_and_stale_tmp(tmp_path):
    for it in (2, 4, 6, 8):
        _fake_ckpt(tmp_path, it)
    (tmp_path / "iter_0000010.tmp").mkdir()  # a killed save
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")  # 8: renamed, not tracked
    assert prune_checkpoints(str(tmp_path), None) == []
    removed = prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000002"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000006", "iter_0000008",
                                            "iter_0000010.tmp",
                                            "latest_checkpointed_iteration.txt"]
    prune_checkpoints(str(tmp_path), 1)
    assert (tmp_path / "iter_0000006").is_dir() and not (tmp_path / "iter_0000004").exists()
    remove_stale_tmp(str(tmp_path))
    assert not (tmp_path / "iter_0000010.tmp").exists()


# --------------------------------------------------------------------------------------------
# in-process: one gloo rank, a real model, optimizer and checkpoints
# --------------------------------------------------------------------------------------------
def _build(seed=0):
    from framework.models.build import build_model
    from framework.optimizer import build_optimizer

    torch.manual_seed(seed)
    model = build_model(MODEL, ParallelConfig(), vocab_size=128, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)
    opt, sched = build_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=0), model, max_steps=10,
                                 bf16=False, fp16=False, use_distributed_optimizer=False,
                                 overlap_param_gather=False, on_gpu=False)
    return model, opt, sched


def _backward(model, poison=False):
    tokens = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    loss = model[0](tokens, pos, None, labels=tokens).mean()
    loss.backward()
    if poison:
        next(model[0].parameters()).grad[0] = float("nan")
    return loss.item()


def _params(model):
    return [p.detach().clone() for p in model[0].parameters()]


def test_guarded_step_skips_nonfinite_before_the_update(mp1):
    model, opt, sched = _build()
    before = _params(model)
    loss = _backward(model, poison=True)
    ok, norm, non_finite = guarded_optimizer_step(opt, loss)
    assert (ok, non_finite) == (False, True) and norm != norm  # NaN norm reported
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    opt.zero_grad()
    ok, norm, non_finite = guarded_optimizer_step(opt, float("inf"))
    assert (ok, norm, non_finite) == (False, None, True)
    _backward(model)
    ok, norm, non_finite = guarded_optimizer_step(opt, 1.0)
    assert ok and not non_finite and norm > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def _save(d, it, model, opt, sched):
    from framework import checkpoint as ckpt

    return ckpt.save_checkpoint(str(d), it, model, opt, sched, consumed_samples=16 * it,
                                config={"model": {}})


def _load(d, seed=1):
    from framework import checkpoint as ckpt

    model, opt, sched = _build(seed)
    meta = ckpt.load_checkpoint(str(d), model, opt, sched, model_cfg=MODEL)
    return meta, model


def test_failed_or_killed_saves_leave_the_previous_checkpoint(mp1, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from framework import checkpoint as ckpt

    model, opt, sched = _build()
    _backward(model)
    guarded_optimizer_step(opt, 1.0)
    _save(tmp_path, 2, model, opt, sched)
    good = _params(model)
    real_save = dist_checkpointing.save

    # 1. disk full in the middle of the sharded write: one clear error, nothing left behind
    def full(sd, path, *a, **k):
        open(os.path.join(path, "partial.distcp"), "wb").write(b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dist_checkpointing, "save", full)
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        _save(tmp_path, 4, model, opt, sched)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "iter_0000004" in msg
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]

    # 2. killed mid-write (no Python cleanup runs: simulated by an exception the save does not
    #    catch): the tmp dir stays, the tracker still names iteration 2
    class Killed(BaseException):
        pass

    def killed(sd, path, *a, **k):
        real_save(sd, path, *a, **k)
        raise Killed()

    monkeypatch.setattr(dist_checkpointing, "save", killed)
    with pytest.raises(Killed):
        _save(tmp_path, 4, model, opt, sched)
    assert (tmp_path / "iter_0000004.tmp").is_dir()
    assert ckpt.latest_iteration(str(tmp_path)) == 2

    # 3. killed after the rename, before the tracker: iteration 2 is still the latest
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    from framework.checkpoint import commit

    monkeypatch.setattr(commit, "write_tracker", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        _save(tmp_path, 6, model, opt, sched)
    assert (tmp_path / "iter_0000006").is_dir() and ckpt.latest_iteration(str(tmp_path)) == 2
    assert not (tmp_path / "iter_0000004.tmp").exists()  # the next save cleared the stale tmp
    meta, loaded = _load(tmp_path)
    assert meta["iteration"] == 2
    assert all(torch.equal(a, b) for a, b in zip(good, _params(loaded)))

    # 4. a later good save commits; retention keeps the newest one only
    monkeypatch.undo()
    _save(tmp_path, 8, model, opt, sched)
    prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000008", "latest_checkpointed_iteration.txt"]
    assert _load(tmp_path)[0]["iteration"] == 8


# --------------------------------------------------------------------------------------------
# the real train.py
# --------------------------------------------------------------------------------------------
def _start(tmp, name, *overrides, env=None):
    return start_train(*NO_EVAL, *overrides, cwd=tmp, name=name, new_session=True, env=env)


def _wait_for_step(proc, metrics, step, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(metrics):
            for line in open(metrics).read().splitlines():
                try:
                    if json.loads(line).get("step", -1) >= step:
                        return
                except json.JSONDecodeError:  # a line being written
                    pass
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


def test_kill9_then_resume_is_bit_identical(tmp_path):
    common = ["train.max_steps=8", "checkpoint.save_interval=2", "optimizer.lr_decay_steps=8",
              "model.hidden_dropout=0.1", "checkpoint.keep_last=2"]
    full = run_train(*NO_EVAL, f"checkpoint.dir={tmp_path}/a", *common, cwd=tmp_path,
                     name="full")
    # a step at random in 3..6 (after at least one checkpoint), then SIGKILL the whole group
    kill_at = 3 + int.from_bytes(os.urandom(1), "little") % 4
    p = _start(tmp_path, "killed", f"checkpoint.dir={tmp_path}/b", *common)
    _wait_for_step(p, str(tmp_path / "killed" / "metrics.jsonl"), kill_at)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    tracked = int((tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text())
    assert tracked >= 2 and (tmp_path / "b" / f"iter_{tracked:07d}" / "framework.json").is_file()
    rest = run_train(*NO_EVAL, f"checkpoint.dir={tmp_path}/b", *common, cwd=tmp_path,
                     name="rest")
    assert f"resumed from" in rest.stdout and f"(step {tracked}," in rest.stdout
    lf, lr = full.losses, rest.losses
    assert sorted(lr) == list(range(tracked + 1, 9)), (kill_at, tracked, lr)
    assert [lf[s] for s in sorted(lr)] == [lr[s] for s in sorted(lr)], kill_at  # exact
    left = sorted(os.listdir(tmp_path / "b"))
    assert left == ["iter_0000006", "iter_0000008", "latest_checkpointed_iteration.txt"], left


@pytest.mark.parametrize("layout,group", [([], False), ([], True), (["parallel=tp2"], False),
                                          (["parallel=tp2"], True)],
                         ids=["1proc", "1proc-group", "tp2", "tp2-group"])
def test_sigterm_saves_and_exits_zero(tmp_path, layout, group):
    """SIGTERM stops the run with a checkpoint and exit 0: sent to the parent only (with tp2 it
    must forward to the workers), or to the whole process group after a periodic save (as
    Ctrl-C, `timeout` and SLURM do: every helper process gets it too; mcore's checkpoint-writer
    manager used to die with it, and the stop's save then failed with "Broken pipe")."""
    ck = tmp_path / "ck"
    # the TP2 group case starts its workers as users' runs do (spawned, not forked: conftest.py)
    env = dict(os.environ, FW_WORKER_START_METHOD="spawn") if layout and group else None
    p = _start(tmp_path, "run", f"checkpoint.dir={ck}", "train.max_steps=500",
               f"checkpoint.save_interval={2 if group else 1000}", *layout, env=env)
    _wait_for_step(p, str(tmp_path / "run" / "metrics.jsonl"), 3 if group else 2)
    t0 = time.time()
    if group:  # after the save at step 2
        os.killpg(p.pid, signal.SIGTERM)
    else:
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert time.time() - t0 < 60  # not the elastic agent's 30 s SIGKILL fallback + more
    step = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert (3 if group else 2) <= step < 500, (step, out[-2000:], err[-2000:])
    assert f"stopping at iteration {step}: SIGTERM received" in out
    meta = json.loads((ck / f"iter_{step:07d}" / "framework.json").read_text())
    assert meta["iteration"] == step and meta["consumed_samples"] == 16 * step
    if layout:
        assert "stopped by SIGTERM" in out
    for _ in range(50):  # e.g. the checkpoint-writer manager must not be orphaned
        left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True)
        if not left.stdout.strip():
            break
        time.sleep(0.2)
    assert left.stdout.strip() == "", "helper processes outlived the run"


def test_max_minutes_budget_saves_and_exits_zero(tmp_path):
    ck = tmp_path / "ck"
    r = run_train(*NO_EVAL, f"checkpoint.dir={ck}", "train.max_steps=100000",
                  "checkpoint.save_interval=100000", "train.max_minutes=0.01", cwd=tmp_path,
                  timeout=300)
    assert "train.max_minutes=0.01 reached" in r.stdout
    step = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= step < 100000


def test_a_window_of_non_finite_steps_is_logged_as_nan_not_zero(tmp_path):
    """Every step non-finite (weights of std 1e30): the log line, metrics.jsonl and the summary
    said "loss 0.0000" (a skipped step's loss was averaged in as 0, so one NaN in a window also
    pulled the mean down), and metrics.jsonl held a bare NaN, which is not JSON. Now the window's
    mean is over its finite losses, NaN when there are none; the file holds null; the summary
    says there was no finite loss."""
    r = run_train("model.init_method_std=1e30", "train.max_steps=3", "train.eval_interval=0",
                  "checkpoint.save=false", "train.progress_bar=false", cwd=tmp_path)
    assert "| loss nan |" in r.stdout and "loss 0.0000" not in r.stdout, r.stdout[-2000:]
    text = open(os.path.join(r.run_dir, "metrics.jsonl")).read()
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in text.splitlines()]
    assert [(x["step"], x["loss"], x["grad_norm"], x["nan_iters"]) for x in recs
            if "loss" in x] == [(i, None, None, i) for i in (1, 2, 3)], recs
    assert "done: step 3/3 | no finite loss since the start (3 non-finite steps in all)" \
        in r.stdout, r.stdout[-1500:]


def test_a_stop_during_evaluation_ends_it_saves_and_exits_zero(tmp_path):
    """A stop (here the train.max_minutes deadline; SIGTERM sets the same flag) during a long
    evaluation waited for all train.eval_iters batches (a fuzz run went on for 10 minutes after
    SIGTERM, and a scheduler's SIGKILL would have lost the run since its last save). Now
    evaluation ends at the next batch, says so, and the run saves and stops."""
    ck = tmp_path / "ck"
    r = run_train(f"checkpoint.dir={ck}", "train.max_steps=100000", "train.eval_interval=1",
                  "train.eval_iters=100000", "checkpoint.save_interval=100000",
                  "train.max_minutes=0.01", "train.progress_bar=false", cwd=tmp_path,
                  timeout=240)
    assert re.search(r"eval at iter 1: loss \S+ \| ppl \S+ \(stopped after \d+ of "
                     r"train.eval_iters=100000 batches\)", r.stdout), r.stdout[-2000:]
    assert "train.max_minutes=0.01 reached" in r.stdout
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# --------------------------------------------------------------------------------------------
# deferred step stats (train.defer_step_stats)
# --------------------------------------------------------------------------------------------
def _opt_state(opt):
    inner = opt.optimizer
    return [{k: v.clone() for k, v in inner.state[p].items()}
            for g in inner.param_groups for p in g["params"]]


def test_deferred_step_is_the_guarded_step_on_the_device(mp1):
    """Same norm, same clipped update, same skip of a non-finite step (weights, Adam moments
    and step count untouched), with the outcome left on the device."""
    from perturb import perturb_

    (m1, o1, _), (m2, o2, _) = _build(), _build()
    perturb_(m1, seed=3)  # the same non-zero biases and non-unit norms (tests/perturb.py)
    perturb_(m2, seed=3)
    assert deferred_step_supported(o1)  # fused CPU AdamW, no loss scaler
    for poison in (False, True, False):
        torch.manual_seed(7)
        loss1 = _backward(m1, poison)
        torch.manual_seed(7)
        loss2 = _backward(m2, poison)
        state_before = _opt_state(o2)
        params_before = _params(m2)
        ok, norm, non_finite = guarded_optimizer_step(o1, loss1)
        out = deferred_optimizer_step(o2, torch.tensor(loss2))
        assert out.dtype == torch.float64 and out.shape == (3,)
        assert (bool(out[0]), bool(out[2])) == (ok, non_finite) == (not poison, poison)
        if poison:
            assert torch.isnan(out[1])
            assert all(torch.equal(a, b) for a, b in zip(params_before, _params(m2)))
            assert all(torch.equal(a[k], b[k]) for a, b in zip(state_before, _opt_state(o2))
                       for k in a)
        else:
            assert float(out[1]) == norm > 1.0  # gpt_tiny's first grads are clipped (clip 1.0)
        assert all(torch.equal(a, b) for a, b in zip(_params(m1), _params(m2)))
        o1.zero_grad()
        o2.zero_grad()
    assert not hasattr(o2.optimizer, "found_inf")  # the flag does not outlive the step


def test_deferred_step_falls_back_where_the_host_must_decide():
    class Opt:
        grad_scaler = None
        config = type("C", (), {"use_precision_aware_optimizer_no_fp8_or_ds_fp8": False})()
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)

    assert deferred_step_supported(Opt())
    Opt.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # foreach kernels
    assert not deferred_step_supported(Opt())
    Opt.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    Opt.grad_scaler = object()  # fp16: the scaler's overflow flag is read on the host
    assert not deferred_step_supported(Opt())


def test_deferred_stats_give_the_synchronous_run(tmp_path):
    """train.py with the stats read one step late (the default) logs the same losses, grad norms,
    learning rates and skip counts as synchronous steps, through a NaN step and a checkpoint
    between log steps, and warns about the NaN step by its own number."""
    common = [*NO_EVAL, "train.log_interval=4", "train.micro_batch_size=16", "train.max_steps=10",
              "checkpoint.save_interval=3", "train.step._target_=tests.nan_step.NanAtStep",
              "+train.step.at=6", "+train.step._allowed_prefixes_=[tests.]"]
    runs = {}
    for defer in ("true", "false"):
        out = tmp_path / defer
        r = run_train(*common, f"train.defer_step_stats={defer}", f"checkpoint.dir={out}/ckpt",
                      cwd=tmp_path, name=f"{defer}/run")
        assert "non-finite loss nan at iteration 6; update skipped" in r.stdout, r.stdout[-2000:]
        recs = [json.loads(x) for x in open(out / "run" / "metrics.jsonl") if '"loss"' in x]
        runs[defer] = [(d["step"], d["loss"], d["grad_norm"], d["lr"], d["skipped_iters"],
                        d["nan_iters"]) for d in recs]
        meta = json.loads((out / "ckpt" / "iter_0000009" / "framework.json").read_text())
        runs[defer].append((meta.get("skipped_iters"), meta.get("nan_iters")))
    assert [s[0] for s in runs["true"][:-1]] == [4, 8, 10]
    assert runs["true"][1][4:] == (1, 1) and runs["true"][-1] == (1, 1)
    assert runs["true"] == runs["false"]
