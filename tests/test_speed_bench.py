"""The speed benchmarks compare like with like (CPU checks; the timings themselves need a GPU).

* benchmarks/shapes.py: parameter counts and FLOPs of every shape equal what HF builds and
  Megatron's formula; our train.py overrides and the HF config build models of the same size at
  tiny dims of each family (GPT-2, Llama, Qwen2 tied/untied), and both sides' settings read from
  the built objects agree field by field;
* benchmarks/speed_table.py: the dry run finds the settings equal for the shipped shapes and
  stops on a planted difference (dimensions, dropout, precision, LR decay length, data); the
  queue is round-robin, stops growing a group after an OOM, honours the budget and resumes from
  its results file (rows checked against other settings run again; rows of earlier calls are
  marked, and counted in the bold ratio only from this call's commit, card and versions);
  --ours-extra is in our rows' key and label; the header's commands name no micro-batch;
* every side's data is uniformly random ids over the real vocab (ours: data=random);
* benchmarks/hf_baseline.py trains a tiny model on the CPU with our optimizer settings, and
  reports torch.compile's graph breaks;
* the HF LR schedule follows megatron-core's OptimizerParamScheduler step by step;
* benchmarks/torchtitan_baseline.py: its TOML parses, carries our decay style and fused flag
  (or refuses), comes back as settings that match ours but for its own way; its log parser
  reads torchtitan's lines.

The speed_table tests build settings and commands only (run_cand is replaced): no train.py runs.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import tomllib

import pytest
import torch

from benchmarks import hf_baseline, speed_table, throughput, torchtitan_baseline
from benchmarks.shapes import (SHAPES, compare_settings, compose_ours, get_shape, hf_model,
                               hf_optimizer, hf_settings, lr_at, ours_overrides, ours_settings)
from helpers import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = dict(lr=1e-3, min_lr=1e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, clip_grad=1.0,
           lr_warmup_steps=10, lr_decay_style="cosine", fused=True)
TINY = dict(layers=2, hidden=64, heads=4, ffn=160, vocab=256, seq=32)
TINY_SHAPES = {
    "gpt2": get_shape("gpt2_large").replace(**dict(TINY, ffn=256), kv_heads=4),
    "llama": get_shape("llama3_1b").replace(**TINY, kv_heads=2),
    "qwen2": get_shape("qwen2_5_1_5b").replace(**TINY, kv_heads=2, norm_eps=1e-6),
    "qwen2_untied": get_shape("qwen2_5_1_5b_untied").replace(**TINY, kv_heads=1),
}
RANDOM_256 = "uniform random ids over [0, 256), seeded"


def hf_side(model, opt, seq, mb, steps, shape):
    return hf_settings(model, opt, OPT, seq, mb, steps, data=hf_baseline.data_setting(shape),
                       autocast=hf_baseline.AUTOCAST)


def test_shape_counts_match_hf_and_megatron_formula():
    from framework.training.metrics import flops_per_token

    for name, shape in SHAPES.items():
        with torch.device("meta"):
            m = hf_model(shape, 0.0)
        assert sum(p.numel() for p in m.parameters()) == shape.params(), name
        if shape.family == "gpt2":
            want = flops_per_token(shape.layers, shape.hidden, shape.seq, shape.vocab)
            assert shape.flops_per_token() == pytest.approx(want, rel=1e-12), name
    # issue 29's MFU for the 1B shape: 58.0k tok/s -> 48.2%
    assert 58.0e3 * SHAPES["llama3_1b"].flops_per_token() / 989e12 == pytest.approx(0.482, abs=1e-3)


@pytest.mark.parametrize("fam", sorted(TINY_SHAPES))
def test_tiny_models_and_settings_match(mp1, fam):
    """Our overrides and the HF config give the same model size, and the settings read from our
    composed config and from HF's built model + fused AdamW agree (dropout 0.1 for GPT-2)."""
    from framework.models.build import build_model

    shape = TINY_SHAPES[fam]
    dropout = 0.1 if shape.family == "gpt2" else 0.0
    cfg = compose_ours(ours_overrides(shape, dropout) + [
        "data=random", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.max_steps=20"])
    torch.manual_seed(0)
    ours = build_model(cfg.model, cfg.parallel, vocab_size=shape.vocab, bf16=False, fp16=False,
                       device=torch.device("cpu"), wrap_ddp=False)[0]
    n_ours = sum(p.numel() for p in ours.parameters())
    hf = hf_model(shape, dropout)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf == shape.params(), (fam, n_ours, n_hf, shape.params())
    opt, _ = hf_optimizer(hf, OPT, 20)
    ours = ours_settings(cfg)
    diffs = compare_settings(ours, hf_side(hf, opt, shape.seq, 2, 20, shape))
    assert diffs == [], diffs
    assert (ours["data"], ours["compute_dtype"], ours["master_dtype"], ours["fp8"],
            ours["lr_decay_steps"]) == (RANDOM_256, "bf16", "fp32", "none", 20)


@pytest.mark.parametrize("extra,fields", [
    (["model.num_query_groups=4", "optimizer.adam_beta2=0.999"], ["betas", "kv_heads"]),
    # megatron-core's MockGPTDataset (a fixed cycle of ids) is not the baselines' random ids
    (["data=mock"], ["data"]),
    (["train.fp8=tensorwise"], ["fp8"]),
    (["train.bf16=false"], ["compute_dtype"]),
    (["optimizer.lr_decay_steps=100"], ["lr_decay_steps"]),
])
def test_settings_comparison_sees_a_difference(extra, fields):
    shape = TINY_SHAPES["llama"]
    data = [o for o in extra if o.startswith("data=")] or ["data=random"]
    cfg = compose_ours(ours_overrides(shape, 0.0) + data + [o for o in extra if o not in data])
    hf = hf_model(shape, 0.0)
    opt, _ = hf_optimizer(hf, OPT, cfg.train.max_steps)
    diffs = compare_settings(ours_settings(cfg), hf_side(hf, opt, shape.seq,
                                                         cfg.train.micro_batch_size,
                                                         cfg.train.max_steps, shape))
    assert [d.split(":")[0] for d in diffs] == fields, diffs


def test_every_side_draws_uniform_random_ids():
    """Our speed runs' train.py command says data=random (never data=mock), and the data field
    of each side comes from what it draws: ours from data.type and model.vocab_size, HF and
    torchtitan from their generators' vocab."""
    from benchmarks import parallel
    from benchmarks.torchtitan_spec import data_setting

    over = throughput.ours_overrides_for("gpt2_large", 8, 10, 0.0)
    assert "data=random" in over and not any(o.startswith("data=") and o != "data=random"
                                             for o in over)
    assert parallel.DATA == "data=random"
    # no other train.py command here passes data=mock (a Python string, a shell word)
    for f in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
        assert '"data=mock"' not in open(f).read(), f
    for f in glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")):
        assert "data=mock" not in open(f).read(), f
    shape = get_shape("llama3_1b")
    want = "uniform random ids over [0, 128256), seeded"
    assert hf_baseline.data_setting(shape) == data_setting(shape) == want
    assert hf_baseline.data_setting(shape.replace(vocab=50257)) != want
    assert ours_settings(compose_ours(speed_table.tp.ours_overrides_for(
        "llama3_1b", 8, 10, 0.0)))["data"] == want
    ids = hf_baseline.token_batches(TINY_SHAPES["llama"], 3, torch.device("cpu"))
    assert len(ids) == hf_baseline.N_BATCHES and all(x.shape == (3, 32) for x in ids)
    assert 0 <= min(int(x.min()) for x in ids) and max(int(x.max()) for x in ids) < 256
    # peak memory since process start on both sides: HF resets nothing after warm-up
    assert "reset_peak_memory_stats" not in open(hf_baseline.__file__).read()


def test_dry_run_settings_match(capsys):
    rc = speed_table.main(["--models", "gpt2_large,llama3_1b,qwen2_5_1_5b_untied",
                           "--dropouts", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "settings match on both sides for 3" in out, out
    assert "data: uniform random ids over [0, 50257), seeded" in out
    # the header's commands run every row's own micro-batch
    assert "--micro-batch <mb>" in out and "train.micro_batch_size=<mb>" in out
    assert "data=random" in out and "data=mock" not in out
    rc = speed_table.main(["--models", "gpt2_xl", "--dropouts", "0,0.1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "dropout 0.1 (residual/embedding) and 0.1 (attention)" in out
    assert "--dropout 0.1" in out and "model.hidden_dropout=0.1" in out


@pytest.mark.parametrize("extra,field", [("model.hidden_dropout=0.2", "hidden_dropout"),
                                         ("model.num_query_groups=4", "kv_heads"),
                                         ("train.fp8=tensorwise", "fp8"),
                                         ("data=mock", "data")])
def test_dry_run_stops_on_a_difference(capsys, extra, field):
    rc = speed_table.main(["--models", "llama3_1b", "--dry-run", "--ours-extra", extra])
    err = capsys.readouterr().err
    assert rc == 1 and "error: settings differ" in err and field in err, err


def test_ours_extra_in_key_and_label(capsys):
    """--ours-extra is part of our rows' key (a results file keeps rows of other extras apart)
    and label, not of the baselines' keys."""
    rc = speed_table.main(["--models", "gpt2_large", "--dry-run", "--ours-mbs", "8",
                           "--hf-mbs", "8", "--ours-extra", "model.fused_wgrad=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "gpt2_large|d0|ours|default|mb8|steps15|+model.fused_wgrad=false" in out, out
    assert "gpt2_large|d0|hf|-|mb8|steps15\n" in out
    c = speed_table.Cand("gpt2_large", 0.0, "ours", "compile", 8, 15,
                         extra=("model.fused_wgrad=false",))
    assert c.label == "ours + model.torch_compile=true model.fused_wgrad=false"
    assert speed_table.Cand("gpt2_large", 0.0, "ours", "default", 8, 15).label == \
        "ours (train.py, defaults)"


@pytest.mark.parametrize("argv", [
    ["--models", "llama3_1b", "--dropouts", "0.1"],  # HF Llama has no residual dropout
    ["--models", "gpt3"],
    ["--ours-mbs", "8,x"],
    ["--models", "gpt2_large", "--hf-mbs", "llama3_1b:8"],
    # torchtitan has no constant LR decay
    ["--models", "llama3_1b", "--tt-mbs", "8", "--ours-extra",
     "optimizer.lr_decay_style=constant"],
])
def test_bad_arguments_are_one_line_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        speed_table.main(argv + ["--dry-run"])
    msg = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert e.value.code != 0 and "error:" in msg, msg


ENV = {"commit": "0123456789ab", "card": "test card", "torch": "2.x", "versions": "t 1",
       "date": "2026-12-05"}


def test_queue_oom_budget_and_resume(monkeypatch, tmp_path, capsys):
    """Round-robin order, no larger micro-batch after an OOM, nothing started past the budget,
    and a second call with the same results file runs only what is missing; rows of earlier
    calls are marked, and count in the bold ratio only from this call's commit, card and
    versions; rows checked against other settings run again."""
    ran = []

    def fake(c, plan, timeout):
        ran.append((c.side, c.mb, c.dropout))
        rec = {"key": c.key, "model": c.model, "dropout": c.dropout, "side": c.side,
               "variant": c.variant, "mb": c.mb, "steps": c.steps, "extra": list(c.extra),
               "elapsed_s": 1.0}
        if c.side == "ours" and c.mb >= 48:
            rec["error"] = "OOM"
        else:
            tok = (1000.0 if c.side == "ours" else 800.0) + c.mb
            rec.update(tok_s=tok, ms_per_iter=1.0, mfu=0.4, peak_gb=10.0, spread=0.01,
                       settings_diffs=[])
        if c.side == "hf" and c.mb == 24:
            rec.update(graph_breaks=2, unique_graphs=3,
                       graph_break_reasons={"Unsupported: call_function foo": 2})
        return rec

    monkeypatch.setattr(speed_table, "run_cand", fake)
    monkeypatch.setattr(speed_table, "env_info", lambda: dict(ENV))
    res = tmp_path / "r.jsonl"
    argv = ["--models", "gpt2_large", "--dropouts", "0,0.1", "--ours-mbs", "32,48,64",
            "--hf-mbs", "32,24", "--results", str(res), "--min-run-s", "0"]
    assert speed_table.main(argv) == 0
    assert ran == [("ours", 32, 0.0), ("hf", 32, 0.0), ("ours", 32, 0.1), ("hf", 32, 0.1),
                   ("ours", 48, 0.0), ("hf", 24, 0.0), ("ours", 48, 0.1), ("hf", 24, 0.1)]
    out = capsys.readouterr().out
    assert "ours 1032 tok/s (mb 32" in out and "HF + compile 832 (mb 32" in out, out
    assert "1.24x" in out and "did not fit (OOM)" in out
    assert "**Warning**: HF + torch.compile mb 24 had 2 torch.compile graph break(s), 3 " \
        "graph(s): Unsupported: call_function foo (x2)." in out
    assert "since the process started, on both sides" in out
    lines = [json.loads(x) for x in res.read_text().splitlines()]
    assert len(lines) == 8
    assert lines[0]["env"] == ENV and lines[0]["ref_settings"]["micro_batch"] == 32
    ran.clear()
    assert speed_table.main(argv + ["--hf-mbs", "32,24,16"]) == 0  # only hf mb16 is new
    assert ran == [("hf", 16, 0.0), ("hf", 16, 0.1)]
    # the earlier call's rows: same commit, card and versions -> marked, counted
    out = capsys.readouterr().out
    assert "| HF + torch.compile† | 32 | 832 |" in out and "1.24x.**" in out, out
    assert "† from an earlier call" in out
    ran.clear()
    assert speed_table.main(argv[:-2] + ["--min-run-s", "60", "--budget-s", "30",
                                         "--hf-mbs", "8"]) == 0
    assert ran == [] and "Not run within this call's budget" in capsys.readouterr().out
    # another card: the earlier rows are shown with where they ran, not counted
    monkeypatch.setattr(speed_table, "env_info", lambda: dict(ENV, card="other card"))
    assert speed_table.main(argv) == 0 and ran == []
    out = capsys.readouterr().out
    assert "| ours (train.py, defaults)‡ | 32 | 1032 |" in out and "x.**" not in out, out
    assert "‡ from an earlier call on test card — 2026-12-05 — commit 0123456789ab" in out
    # checked against other settings (a changed lr): every row runs again
    assert speed_table.main(argv + ["--ours-extra", "optimizer.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    assert len(ran) == 8 and "checked against other or no settings: run again" in out
    assert "| ours + optimizer.lr=2e-3 | 32 | 1032 |" in out
    assert "ours + optimizer.lr=2e-3 1032 tok/s (mb 32" in out


def test_resume_keeps_only_rows_checked_against_this_plan(tmp_path, capsys):
    """A results row runs again unless the settings it was checked against are this call's:
    rows of an older script (no settings recorded) and rows of other settings are dropped, the
    last matching row of a key is kept, rows of other models stay."""
    plan = speed_table.make_plan("gpt2_large", 0.0, 8, 15, [])
    ref = speed_table.with_mb(plan.ours_settings, 8)
    base = {"model": "gpt2_large", "dropout": 0.0, "side": "hf", "variant": "-", "mb": 8}
    lines = [dict(base, key="a", tok_s=1.0, ref_settings=ref),
             dict(base, key="a", tok_s=2.0, ref_settings=dict(ref, lr=2e-3)),
             dict(base, key="b", tok_s=3.0),
             dict(base, key="c", model="gpt2_xl", tok_s=4.0)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = speed_table.load_results(str(path), {("gpt2_large", 0.0): plan})
    assert {k: r["tok_s"] for k, r in recs.items()} == {"a": 1.0, "c": 4.0}
    assert "(2 checked against other or no settings: run again)" in capsys.readouterr().out


def test_hf_baseline_trains_on_cpu():
    shape = TINY_SHAPES["qwen2"]
    r = run(os.path.join(ROOT, "benchmarks", "hf_baseline.py"), "--model", "qwen2_5_1_5b",
            "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "160",
            "--vocab", "256", "--seq", "32", "--device", "cpu", "--micro-batch", "2", "--steps",
            "2", "--log-interval", "1", cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 3 and len(res["window_ms"]) == 3 and res["tok_s"] > 0
    assert res["params"] == shape.params() and 0 < res["last_loss"] < 20
    s = res["settings"]
    assert (s["qkv_bias"], s["linear_bias"], s["tied"], s["fused"]) == (True, False, True, True)
    assert s["no_weight_decay"] == "biases and 1-D (norm) parameters"
    assert (s["data"], s["compute_dtype"], s["master_dtype"], s["fp8"], s["lr_decay_steps"]) \
        == (RANDOM_256, "bf16", "fp32", "none", 3)
    assert "graph_breaks" not in res  # not compiled


@pytest.mark.parametrize("fam", sorted(TINY_SHAPES))
def test_hf_baseline_compiles_to_one_graph(fam):
    """The compiled HF model, called as hf_baseline.py calls it (`labels=` inside), is one graph:
    no graph break at the loss (GPT-2's unnamed loss type used to log from inside forward)."""
    import torch._dynamo as dynamo

    shape = TINY_SHAPES[fam]
    torch.manual_seed(0)
    model = hf_model(shape, 0.0)
    ref = hf_model(shape, 0.0)
    ref.load_state_dict(model.state_dict())
    ref.loss_type = None  # transformers' fallback, which the fix names explicitly
    x = torch.randint(0, shape.vocab, (2, 16))
    dynamo.reset()
    explained = dynamo.explain(model)(input_ids=x, labels=x, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [str(b.reason) for b in explained.break_reasons]
    with torch.no_grad():  # the same loss as the fallback's
        assert torch.equal(model(input_ids=x, labels=x, use_cache=False).loss,
                           ref(input_ids=x, labels=x, use_cache=False).loss)


def test_window_spread_counts_only_the_measured_windows():
    from benchmarks.speed_table import window_spread

    # a baseline's windows: the warm-up (compilation) first, then ceil(20 / 5) = 4 measured
    hf = [17979.19, 424.65, 422.72, 425.93, 425.32]
    assert window_spread(hf, "hf", 20) == pytest.approx((425.93 - 422.72) / (sum(hf[1:]) / 4))
    assert window_spread(hf, "torchtitan", 20) == window_spread(hf, "hf", 20)
    # ours reports only its measured windows
    assert window_spread([10.0, 12.0], "ours", 20) == pytest.approx(2 / 11)
    assert window_spread([], "hf", 20) is None


def test_hf_dynamo_stats():
    from collections import Counter

    counters = {"graph_break": Counter({"a": 1, "b": 3}), "stats": Counter(unique_graphs=4)}
    assert hf_baseline.dynamo_stats(counters) == {
        "graph_breaks": 4, "graph_break_reasons": {"b": 3, "a": 1}, "unique_graphs": 4}
    assert hf_baseline.dynamo_stats({})["graph_breaks"] == 0


def test_hf_lr_schedule_is_megatrons():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    for style in ("cosine", "linear", "constant"):
        for warmup, steps in ((10, 20), (3, 40), (0, 7)):
            opt = dict(OPT, lr_decay_style=style, lr_warmup_steps=warmup)
            sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
            ref = OptimizerParamScheduler(
                sgd, init_lr=0.0, max_lr=opt["lr"], min_lr=opt["min_lr"],
                lr_warmup_steps=min(warmup, steps - 1), lr_decay_steps=steps,
                lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=steps,
                wd_incr_style="constant")
            for step in range(steps + 3):
                want = sgd.param_groups[0]["lr"]
                assert lr_at(step, opt, steps) == pytest.approx(want, abs=1e-15), (style, step)
                ref.step(1)


def test_torchtitan_toml_and_log_parser(tmp_path):
    cfg = torchtitan_baseline.job_config("llama3_1b", 12, 20, 5, str(tmp_path),
                                         torchtitan_baseline.OPT_DEFAULTS)
    back = tomllib.loads(torchtitan_baseline.toml_text(cfg))
    assert back == cfg
    assert back["training"]["seq_len"] == 2048 and back["compile"]["components"] == ["model",
                                                                                      "loss"]
    assert back["lr_scheduler"]["min_lr_factor"] == pytest.approx(0.1)
    log = "\n".join(
        f"[rank0]:[titan] 2026-12-04 INFO \x1b[31mstep: {s:2}  \x1b[32mloss: {9 - s / 10:8.5f}  "
        f"grad_norm:  1.2345  memory: {40 + s / 10:5.2f}GiB(30.00%)  tps: {t:,}  "
        f"tflops: 400.00  mfu: 40.00%\x1b[39m"
        for s, t in ((1, 900), (5, 50000), (10, 60000), (15, 40000), (20, 60000)))
    res = torchtitan_baseline.parse_log(log, 12, 2048, 5)
    tokens = 12 * 2048
    assert res["window_ms"] == [round(1000 * tokens / t, 2) for t in (60000, 40000, 60000)]
    assert res["tok_s"] == pytest.approx(3 / (1 / 60000 + 1 / 40000 + 1 / 60000))
    assert res["peak_gb"] == 42.0 and res["last_loss"] == 7.0
    with pytest.raises(ValueError):
        torchtitan_baseline.parse_log(log.splitlines()[0], 12, 2048, 5)


def tt_opt(o, **kw):
    """torchtitan_baseline's optimizer dict from our composed OptimizerConfig (`kw` replace)."""
    return dict(dict(lr=o.lr, min_lr=o.min_lr, beta1=o.adam_beta1, beta2=o.adam_beta2,
                     eps=o.adam_eps, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                     lr_warmup_steps=o.lr_warmup_steps, lr_decay_style=o.lr_decay_style,
                     fused=o.fused_step), **kw)


def test_torchtitan_settings_come_back_and_match_ours(tmp_path, capsys):
    """The TOML's key fields come back as settings under our names: equal to ours but for
    torchtitan's own way (untied, decay on every parameter); the decay style and the fused flag
    go through, a constant decay is refused."""
    from benchmarks.torchtitan_baseline import job_config, main, toml_text, tt_settings

    plan = speed_table.make_plan("llama3_1b", 0.0, 12, 15, [])
    o = plan.ours_cfg.optimizer
    ref = speed_table.with_mb(plan.ours_settings, 12)
    cfg = job_config("llama3_1b", 12, 20, 5, str(tmp_path), tt_opt(o))
    tt = tt_settings(tomllib.loads(toml_text(cfg)))
    assert speed_table.tt_diffs(ref, tt) == []
    assert (tt["tied"], tt["compile"], tt["compute_dtype"], tt["master_dtype"]) == \
        (False, "per block (model, loss)", "bf16", "fp32")
    assert compare_settings({k: ref[k] for k in torchtitan_baseline.OWN_WAY},
                            {k: tt[k] for k in torchtitan_baseline.OWN_WAY}) != []
    cfg = job_config("llama3_1b", 12, 20, 5, str(tmp_path),
                     tt_opt(o, lr_decay_style="linear", fused=False))
    assert (cfg["lr_scheduler"]["decay_type"], cfg["optimizer"]["implementation"]) == \
        ("linear", "foreach")
    assert [d.split(":")[0] for d in speed_table.tt_diffs(ref, tt_settings(cfg))] == \
        ["fused", "lr_decay_style"]
    with pytest.raises(ValueError, match="constant"):
        job_config("llama3_1b", 12, 20, 5, str(tmp_path), tt_opt(o, lr_decay_style="constant"))
    cmd = " ".join(speed_table.tt_cmd("llama3_1b", 12, 15, o))
    assert "--lr-decay-style cosine" in cmd and "--no-fused" not in cmd
    assert main(["--model", "llama3_1b", "--dry-run", "--out-dir", str(tmp_path), "--no-fused",
                 "--lr-decay-style", "linear"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["settings"]["fused"], info["settings"]["lr_decay_style"]) == (False, "linear")
    with pytest.raises(SystemExit) as e:
        main(["--model", "llama3_1b", "--dry-run", "--out-dir", str(tmp_path),
              "--lr-decay-style", "constant"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_table_shows_torchtitan_settings(monkeypatch, tmp_path, capsys):
    """Each torchtitan row's settings (read back from its TOML) are printed under the table,
    micro-batches that share them on one line; a difference from ours beyond torchtitan's own
    way marks the row."""
    from benchmarks.torchtitan_baseline import job_config, tt_settings

    def fake(c, plan, timeout):
        rec = {"key": c.key, "model": c.model, "dropout": c.dropout, "side": c.side,
               "variant": c.variant, "mb": c.mb, "steps": c.steps, "elapsed_s": 1.0,
               "extra": list(c.extra), "tok_s": 1000.0, "ms_per_iter": 1.0, "mfu": 0.4,
               "settings_diffs": []}
        if c.side == "torchtitan":
            opt = tt_opt(plan.ours_cfg.optimizer, lr_warmup_steps=3 if c.mb == 16 else 10)
            rec["tt_settings"] = tt_settings(job_config(c.model, c.mb, 20, 5, str(tmp_path), opt))
            rec["settings_diffs"] = speed_table.tt_diffs(
                speed_table.with_mb(plan.ours_settings, c.mb), rec["tt_settings"])
        return rec

    monkeypatch.setattr(speed_table, "run_cand", fake)
    monkeypatch.setattr(speed_table, "env_info", lambda: dict(ENV))
    assert speed_table.main(["--models", "llama3_1b", "--ours-mbs", "8", "--hf-mbs", "8",
                             "--tt-mbs", "12,16,24", "--min-run-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "torchtitan ran as `python benchmarks/torchtitan_baseline.py --model llama3_1b " \
        "--micro-batch <mb> --steps 15" in out, out
    assert "- mb 12, 24: lr 0.001 (warmup 10, cosine to 0.0001 over 20 steps)" in out
    assert "- mb 16: lr 0.001 (warmup 3," in out and "untied output layer" in out
    assert "| torchtitan 0.2.2 trainer, per-block compile (settings moved: lr_warmup_steps: " \
        "ours 10 vs torchtitan 3) | 16 |" in out


def test_torchtitan_profile_window_is_not_measured(tmp_path):
    """--profile-dir: one more log window after the measured steps, whose last two steps
    torchtitan's profiler records; the log parser stops before that window."""
    cfg = torchtitan_baseline.job_config("llama3_1b", 16, 20, 5, str(tmp_path),
                                         torchtitan_baseline.OPT_DEFAULTS, profile=True)
    back = tomllib.loads(torchtitan_baseline.toml_text(cfg))
    assert back["training"]["steps"] == 25
    prof = back["profiling"]
    assert prof["enable_profiling"] and prof["profile_freq"] == 25
    assert prof["profile_freq"] - prof["profiler_warmup"] - prof["profiler_active"] >= 20
    assert "profiling" not in torchtitan_baseline.job_config(
        "llama3_1b", 16, 20, 5, str(tmp_path), torchtitan_baseline.OPT_DEFAULTS)
    with pytest.raises(ValueError, match="log-interval"):
        torchtitan_baseline.job_config("llama3_1b", 16, 20, 3, str(tmp_path),
                                       torchtitan_baseline.OPT_DEFAULTS, profile=True)
    log = "\n".join(f"step: {s}  loss: 5.0  memory: 40.00GiB(30.00%)  tps: {t:,}"
                     for s, t in ((1, 900), (5, 50000), (10, 60000), (15, 60000), (20, 60000),
                                  (25, 1000)))
    res = torchtitan_baseline.parse_log(log, 16, 2048, 5, last_step=20)
    assert res["tok_s"] == pytest.approx(60000) and res["steps_logged"][-1] == 25


def test_profile_summary_reads_another_trainers_trace(tmp_path):
    """A trace without our train_step_ ranges (torchtitan's): steps come from torch.profiler's
    ProfilerStep# ranges, and the kernel time is grouped by kind of work."""
    from benchmarks.profile_summary import category, summarize

    ev = []
    for i, t0 in enumerate((0, 1000)):
        ev.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{24 + i}",
                   "ts": t0, "dur": 1000})
        ev += [{"ph": "X", "cat": "kernel", "name": n, "ts": t0 + a, "dur": d, "args": {}}
               for n, a, d in (("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", 0, 600),
                               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 600, 200),
                               ("triton_per_fused_mul_rsqrt_0", 800, 50),
                               ("multi_tensor_apply_kernel", 850, 50))]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    text = summarize(str(path), out=str(tmp_path / "t.txt"))
    assert text.startswith(f"{path}: 2 step(s), GPU kernel time 0.9 ms/step")
    # with launch records: a kernel launched before the first step range (the GPU behind the
    # host) is left out of the per-step times
    late = [{"ph": "X", "cat": "kernel", "name": "nvjet_late", "ts": 10, "dur": 900,
             "args": {"correlation": 99}},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": -50, "dur": 5,
             "pid": 1, "tid": 1, "args": {"correlation": 99}}]
    for i, e in enumerate([x for x in ev if x["cat"] == "kernel"]):
        e["args"] = {"correlation": i}
        late.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
                     "ts": e["ts"] - 1 if e["ts"] >= 1 else 0, "dur": 1, "pid": 1,
                     "tid": 1, "args": {"correlation": i}})
    path.write_text(json.dumps({"traceEvents": ev + late}))
    text = summarize(str(path))
    assert text.startswith(f"{path}: 2 step(s), GPU kernel time 0.9 ms/step (kernels launched "
                           f"inside the 2 ProfilerStep ranges; 1 launched outside them left out)")
    assert "0.60   66.7      1  GEMM" in text and "0.20   22.2      1  attention" in text
    assert "GPU idle 0.1 ms" in text
    assert [category(n) for n in ("sm90_xmma_gemm_bf16bf16", "void at::native::vectorized_"
                                  "elementwise_kernel", "fmha_cutlassF", "ncclKernel_AllReduce",
                                  "_rmsnorm_fwd_kernel")] == \
        ["GEMM", "elementwise", "attention", "communication", "triton (fused)"]


def test_torchtitan_synthetic_tokens_and_flavors():
    from benchmarks.torchtitan_spec import SyntheticTokens

    it = iter(SyntheticTokens(vocab=100, batch=3, seq=16, n=2))
    (a, la), (b, _), (c, _) = next(it), next(it), next(it)
    assert a["input"].shape == la.shape == (3, 16) and int(a["input"].max()) < 100
    assert torch.equal(a["input"][:, 1:], la[:, :-1]) and torch.equal(a["input"], c["input"])
    assert not torch.equal(a["input"], b["input"])
    pytest.importorskip("torchtitan")
    from torchtitan.models.llama3.model.model import FeedForward

    from benchmarks.torchtitan_spec import model_args

    for shape in [s for s in SHAPES.values() if s.family == "llama"] + [TINY_SHAPES["llama"]]:
        a = model_args(shape)
        with torch.device("meta"):
            ff = FeedForward(dim=a.dim, hidden_dim=4 * a.dim, multiple_of=a.multiple_of,
                             ffn_dim_multiplier=a.ffn_dim_multiplier)
        assert ff.w1.weight.shape == (shape.ffn, shape.hidden), shape.name


def test_session_scripts_parse():
    for f in ("speed_session.sh", "speed_session_llama.sh", "speed_session_common.sh",
              "fetch_device_wheels.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", f)],
                           capture_output=True, text=True)
        assert r.returncode == 0, (f, r.stderr)


def test_fused_optimizer_is_read_from_the_run():
    """The `fused` setting of our side comes from train.py's optimizer line (the groups torch's
    fused AdamW kernel really took, out of its Adam param groups)."""
    import torch

    from benchmarks.throughput import fused_adam_groups
    from framework.fast.multi_tensor import fuse_adam

    assert fused_adam_groups("x\noptimizer: torch's fused AdamW kernel in 2 of 3 param groups\n") \
        == [2, 3]
    assert fused_adam_groups("no such line") is None

    class Wrapped:  # an mcore optimizer holds the torch one as .optimizer
        def __init__(self, opt):
            self.optimizer = opt

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = Wrapped(torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}]))
    assert fuse_adam(opt) == (0, 2)  # CPU tensors stay on foreach


def test_fp8_cast_tiles_times_the_casts_of_a_profiled_step():
    """benchmarks/fp8_cast_tiles.py times one layer's casts as the best FP8 recipe makes them:
    11 cast-kernel launches and 1 activation-backward launch a layer, as the gpt2-xl profile
    counted them (528 and 48 over 48 layers, benchmarks/RESULTS.md, sixteenth session), and its
    grid holds the default tiles it compares against."""
    from benchmarks.fp8_cast_tiles import GRID, bytes_moved, casts
    from framework.fast import fp8

    c = casts(1600, 6400, 16384)
    assert [k for _, k, *_ in c].count("cast") == 528 // 48
    assert [k for _, k, *_ in c].count("act_bwd") == 48 // 48
    assert all(t in GRID for t in fp8.TILES.values())
    assert bytes_moved(16384, 1600, "x") == 16384 * 1600 * 4
    # the one cast that also makes a bias gradient: QKV's output gradient (at GPT-2's defaults
    # the only FP8 linear adding its own bias; fc1's goes to the activation, the others' to
    # bias-dropout-add)
    assert [(n, m, k) for n, _, m, k, kind in c if kind == "dy_bias"] == [
        ("bwd qkv output grad (+ its bias gradient)", 16384, 4800)]
