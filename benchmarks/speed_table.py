"""Speed at equal settings: ours vs Hugging Face + torch.compile (and torchtitan), each side at
its best micro-batch, on one GPU, in one run.

    python benchmarks/speed_table.py --models gpt2_large --dropouts 0,0.1 \\
        --ours-mbs 32,24,48 --hf-mbs 32,24,40 --budget-s 450 --results $OUT/speed.jsonl
    python benchmarks/speed_table.py --models llama3_1b --dry-run     # no GPU: check and print

Before anything is timed, both sides' settings are derived from what each side really builds
(ours: the config `train.py` composes from the exact overrides; HF: the transformers model and
torch optimizer, built on the meta device) and compared field by field
(benchmarks/shapes.py: dimensions, dropout, optimizer, clipping, LR schedule, batch, data). Any
difference stops the run with `error: settings differ` before GPU work. After each timed run its
own settings are read back (our run's .hydra/config.yaml, the HF process's built objects) and
checked again; a row whose settings moved is marked.

Every candidate (side, micro-batch, dropout) runs in its own process, one after another, so one
OOM or crash does not end the table. Candidates run round-robin over the groups (model x dropout
x side): each group's first micro-batch (the expected best) before any group's second, so a
machine taken away mid-run still leaves a comparable pair. A group stops growing its micro-batch
after an OOM. Each finished row is printed at once and appended to `--results` (JSON lines);
running again with the same file skips what it holds, so a second call completes the sweep.
`--budget-s` bounds the whole call: a candidate that would start with less than `--min-run-s`
left is not started (and stays to be run by the next call).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import throughput as tp  # noqa: E402
from benchmarks.shapes import (NOT_COMPARED, PEAK_TFLOPS_BF16, SHAPES, TITLES,  # noqa: E402
                               check_dropout, compare_settings, compose_ours, get_shape,
                               hf_model, hf_optimizer, hf_settings, ours_settings, settings_line)

SIDES = {"ours": "ours (train.py, defaults)", "hf": "HF + torch.compile",
         "hf_pad": "HF + torch.compile, vocab padded to a multiple of 128",
         "torchtitan": "torchtitan 0.2.2 trainer, per-block compile"}
TABLE_HEAD = ("| dropout | system | micro-batch | tok/s | MFU | peak GB | spread | "
              "vs best HF + compile |")
# ours + one switch, for `--ours-variants` (the label says what differs from the defaults)
OURS_VARIANTS = {"default": [], "compile": ["model.torch_compile=true"],
                 "unfused_wgrad": ["model.fused_wgrad=false"],
                 "cuda_graph": ["model.cuda_graph=true"],
                 "no_swiglu_kernel": ["model.swiglu_kernel=false"],
                 "keep_logits": ["model.fused_ce_keep_logits=true"],
                 "recompute_logits": ["model.fused_ce_keep_logits=false"],
                 "qkv_rope": ["model.qkv_rope_fusion=true"],
                 "keep_logits_qkv_rope": ["model.fused_ce_keep_logits=true",
                                          "model.qkv_rope_fusion=true"]}


@dataclass
class Cand:
    model: str
    dropout: float
    side: str  # ours | hf | hf_pad | torchtitan
    variant: str  # ours: a key of OURS_VARIANTS; others: "-"
    mb: int
    steps: int
    rank: int = 0  # position of mb in its group's list (the round-robin order)

    @property
    def key(self) -> str:
        return (f"{self.model}|d{self.dropout:g}|{self.side}|{self.variant}|mb{self.mb}|"
                f"steps{self.steps}")

    @property
    def group(self):
        return (self.model, self.dropout, self.side, self.variant)

    @property
    def label(self) -> str:
        if self.side == "ours" and self.variant != "default":
            return f"ours + {' '.join(OURS_VARIANTS[self.variant])}"
        return SIDES[self.side]


@dataclass
class Plan:
    """Per (model, dropout): the settings both sides were checked to share, and commands."""
    model: str
    dropout: float
    ours_cfg: object  # composed framework.config.Config (at the first ours micro-batch)
    ours_settings: Dict
    hf_settings: Dict
    hf_info: Dict
    diffs: List[str]
    commands: Dict[str, str] = field(default_factory=dict)


def mb_lists(text: str, name: str, models: List[str]) -> Dict[str, List[int]]:
    """'32,24,48' (every model) or 'llama3_1b:12,16 llama3_3b:4,8' (per model; a model not
    named gets none) -> {model: [micro-batches in the order to try]}."""
    def ints(t):
        try:
            vals = [int(x) for x in t.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"error: {name} must be comma-separated integers, got {text!r}")
        if any(v <= 0 for v in vals):
            raise SystemExit(f"error: {name} must be positive, got {text!r}")
        return vals

    if ":" not in text:
        return {m: ints(text) for m in models}
    out = {m: [] for m in models}
    for part in text.replace(";", " ").split():
        m, sep, vals = part.partition(":")
        if not sep or m not in out:
            raise SystemExit(f"error: {name}: {part!r} is not MODEL:MB,MB with MODEL one of "
                             f"--models ({', '.join(models)})")
        out[m] = ints(vals)
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2_large", help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--dropouts", default="0", help="comma-separated; each runs on both sides")
    ap.add_argument("--ours-mbs", default="32,24,48",
                    help="our micro-batches, in the order to try them (expected best first); "
                         "'32,24' for every model or 'llama3_1b:12,16 llama3_3b:4,8' per model")
    ap.add_argument("--hf-mbs", default="32,24,40")
    ap.add_argument("--hf-pad-mbs", default="",
                    help="also HF with the vocab padded like ours (a multiple of 128)")
    ap.add_argument("--tt-mbs", default="", help="torchtitan micro-batches (Llama shapes)")
    ap.add_argument("--ours-variants", default="default",
                    help=f"comma-separated, of {list(OURS_VARIANTS)}")
    ap.add_argument("--steps", type=int, default=15, help="measured steps per candidate "
                    f"(whole windows of {tp.LOG}), after one warm-up window")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="wall-clock budget of this call, seconds")
    ap.add_argument("--min-run-s", type=float, default=60.0,
                    help="do not start a candidate with less than this left")
    ap.add_argument("--cap-s", type=float, default=300.0, help="timeout of one candidate")
    ap.add_argument("--results", default=None, help="JSON-lines file: append; skip what it holds")
    ap.add_argument("--table-out", default=None, help="also write the final table here")
    ap.add_argument("--ours-extra", default="", help="space-separated train.py overrides")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the settings and print the plan and commands; time nothing")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    for m in a.models:
        if m not in SHAPES:
            ap.exit(2, f"error: --models: unknown shape {m!r}; known: {', '.join(SHAPES)}\n")
    try:
        a.dropouts = [float(x) for x in a.dropouts.split(",") if x.strip()]
    except ValueError:
        ap.exit(2, f"error: --dropouts must be comma-separated numbers, got {a.dropouts!r}\n")
    for d in a.dropouts:
        if not 0.0 <= d < 1.0:
            ap.exit(2, f"error: --dropouts: {d} is not in [0, 1)\n")
    for name in ("ours_mbs", "hf_mbs", "hf_pad_mbs", "tt_mbs"):
        setattr(a, name, mb_lists(getattr(a, name), "--" + name.replace("_", "-"), a.models))
    a.ours_variants = [v for v in a.ours_variants.split(",") if v]
    for v in a.ours_variants:
        if v not in OURS_VARIANTS:
            ap.exit(2, f"error: --ours-variants: unknown {v!r}; known: {list(OURS_VARIANTS)}\n")
    if a.steps <= 0:
        ap.exit(2, f"error: --steps must be positive, got {a.steps}\n")
    for m in a.models:
        for d in a.dropouts:
            try:
                check_dropout(get_shape(m), d)
            except ValueError as e:
                ap.exit(2, f"error: --dropouts: {e}\n")
    if a.results and os.path.isdir(a.results):
        ap.exit(2, f"error: --results {a.results} is a directory\n")
    return a


# --------------------------------------------------------------------------------------------
# settings: derive both sides', compare
# --------------------------------------------------------------------------------------------
def with_mb(settings: Dict, mb: int) -> Dict:
    return dict(settings, micro_batch=mb, global_batch=mb)


def make_plan(model: str, dropout: float, mb: int, steps: int, extra: List[str]) -> Plan:
    import torch

    shape = get_shape(model)
    over = tp.ours_overrides_for(model, mb, steps, dropout, extra)
    cfg = compose_ours(over)
    ours_s = ours_settings(cfg)
    total = tp.LOG * (1 + -(-steps // tp.LOG))
    opt = dict(lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
               betas=[cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2],
               eps=cfg.optimizer.adam_eps, weight_decay=cfg.optimizer.weight_decay,
               clip_grad=cfg.optimizer.clip_grad, lr_warmup_steps=cfg.optimizer.lr_warmup_steps,
               lr_decay_style=cfg.optimizer.lr_decay_style, fused=bool(cfg.optimizer.fused_step))
    with torch.device("meta"):
        hm = hf_model(shape, dropout)
    hopt, _ = hf_optimizer(hm, opt, total)
    hf_s = hf_settings(hm, hopt, opt, shape.seq, mb, total)
    import transformers

    info = {"class": type(hm).__name__, "params": sum(p.numel() for p in hm.parameters()),
            "transformers": transformers.__version__}
    plan = Plan(model, dropout, cfg, ours_s, hf_s, info, compare_settings(ours_s, hf_s))
    plan.commands["ours"] = " ".join(["python train.py", *over,
                                      "checkpoint.dir=<tmp> hydra.run.dir=<tmp>"])
    plan.commands["hf"] = " ".join(["python" if i == 0 else x for i, x in enumerate(
        tp.hf_cmd(model, mb, steps, True, dropout, cfg.optimizer))]).replace(ROOT + "/", "")
    return plan


# --------------------------------------------------------------------------------------------
# running candidates
# --------------------------------------------------------------------------------------------
def tt_cmd(c: Cand, optimizer) -> List[str]:
    o = optimizer
    return [sys.executable, os.path.join(ROOT, "benchmarks", "torchtitan_baseline.py"),
            "--model", c.model, "--micro-batch", str(c.mb), "--steps", str(c.steps),
            "--log-interval", str(tp.LOG), "--lr", str(o.lr), "--min-lr", str(o.min_lr),
            "--beta1", str(o.adam_beta1), "--beta2", str(o.adam_beta2), "--eps", str(o.adam_eps),
            "--weight-decay", str(o.weight_decay), "--clip-grad", str(o.clip_grad),
            "--lr-warmup-steps", str(o.lr_warmup_steps)]


def run_cand(c: Cand, plan: Plan, timeout: float, ours_extra: List[str]) -> Dict:
    t0 = time.time()
    rec = {"key": c.key, "model": c.model, "dropout": c.dropout, "side": c.side,
           "variant": c.variant, "mb": c.mb, "steps": c.steps}
    diffs: List[str] = []
    if c.side == "ours":
        extra = OURS_VARIANTS[c.variant] + ours_extra
        res, err = tp.ours(c.model, c.mb, c.steps, extra, dropout=c.dropout, timeout=timeout,
                           keep_config=True)
        if res is not None:
            ran = ours_settings(res.pop("config"))
            diffs = compare_settings(with_mb(plan.ours_settings, c.mb), ran)
        rec["cmd"] = " ".join(["python train.py", *tp.ours_overrides_for(
            c.model, c.mb, c.steps, c.dropout, extra)])
    elif c.side in ("hf", "hf_pad"):
        extra = ["--pad-vocab", "128"] if c.side == "hf_pad" else []
        cmd = tp.hf_cmd(c.model, c.mb, c.steps, True, c.dropout, plan.ours_cfg.optimizer, extra)
        r = tp.run(cmd, timeout=timeout)
        res, err = (None, tp.failure(r)) if r.returncode != 0 else (
            json.loads(r.stdout.strip().splitlines()[-1]), "")
        if res is not None:
            ran = res.pop("settings")
            ref = with_mb(plan.ours_settings, c.mb)
            if c.side == "hf_pad":  # the padded rows are the point of this row
                ran = dict(ran, vocab=ref["vocab"])
            diffs = compare_settings(ref, ran)
            rec["versions"] = {k: res.pop(k) for k in ("transformers", "torch") if k in res}
        rec["cmd"] = " ".join(cmd).replace(sys.executable, "python").replace(ROOT + "/", "")
    else:  # torchtitan: its own settings (untied, weight decay on all parameters), reported
        cmd = tt_cmd(c, plan.ours_cfg.optimizer)
        r = tp.run(cmd, timeout=timeout)
        res, err = (None, tp.failure(r)) if r.returncode != 0 else (
            json.loads(r.stdout.strip().splitlines()[-1]), "")
        rec["cmd"] = (res or {}).pop("command", None) or " ".join(cmd).replace(
            sys.executable, "python").replace(ROOT + "/", "")
    if res is not None:
        shape = get_shape(c.model)
        wins = res.get("window_ms") or []
        meas = wins[-(-c.steps // tp.LOG):] if c.side != "ours" else wins
        spread = (max(meas) - min(meas)) / (sum(meas) / len(meas)) if meas else None
        rec.update(tok_s=res["tok_s"], ms_per_iter=res["ms_per_iter"],
                   mfu=res["tok_s"] * shape.flops_per_token() / (PEAK_TFLOPS_BF16 * 1e12),
                   peak_gb=res.get("peak_gb"), window_ms=wins, spread=spread,
                   last_loss=res.get("last_loss"), settings_diffs=diffs)
        for k in ("peak_kind", "params"):
            if k in res:
                rec[k] = res[k]
    else:
        rec["error"] = err.strip().splitlines()[-1][:300] if err.strip() else "failed"
    rec["elapsed_s"] = round(time.time() - t0, 1)
    return rec


def order(cands: List[Cand]) -> List[Cand]:
    """Round-robin: every group's rank-0 candidate, then every group's rank-1, ..."""
    return sorted(cands, key=lambda c: c.rank)  # stable: groups keep their listed order


def row(rec: Dict, best_hf: Optional[float]) -> str:
    label = SIDES.get(rec["side"], rec["side"])
    if rec["side"] == "ours" and rec["variant"] != "default":
        label = f"ours + {' '.join(OURS_VARIANTS[rec['variant']])}"
    if "error" in rec:
        why = "did not fit (OOM)" if rec["error"] == "OOM" else f"did not run: {rec['error']}"
        return f"| {rec['dropout']:g} | {label} | {rec['mb']} | {why} | | | | |"
    ratio = f"{rec['tok_s'] / best_hf:.2f}x" if best_hf else "n/a"
    peak = "" if rec.get("peak_gb") is None else f"{rec['peak_gb']:.1f}"
    if rec.get("peak_kind") == "reserved":
        peak += " (reserved)"
    spread = "" if rec.get("spread") is None else f"{100 * rec['spread']:.1f}%"
    mark = " (settings moved: " + "; ".join(rec["settings_diffs"]) + ")" \
        if rec.get("settings_diffs") else ""
    return (f"| {rec['dropout']:g} | {label}{mark} | {rec['mb']} | {rec['tok_s']:.0f} | "
            f"{100 * rec['mfu']:.1f}% | {peak} | {spread} | {ratio} |")


def env_line() -> str:
    """Card, date, commit and versions, asked in a child process (this one keeps no CUDA
    context, which would take GPU memory from the candidates)."""
    code = ("import torch,json;print(json.dumps([torch.cuda.get_device_name(0) if "
            "torch.cuda.is_available() else 'no GPU', torch.__version__]))")
    try:
        card, torch_v = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                  text=True, timeout=120).stdout)
    except Exception:  # noqa: BLE001 - the header says so
        card, torch_v = "unknown card", "?"
    from importlib.metadata import PackageNotFoundError, version

    vers = []
    for pkg in ("transformers", "megatron-core", "triton"):
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            vers.append(f"{pkg} absent")
    today = datetime.date.today().isoformat()
    return f"{card} — {today} — commit {commit()} — torch {torch_v}, " + ", ".join(vers)


def commit() -> str:
    try:
        h = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        if h.returncode == 0:
            dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain",
                                    "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return h.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("BENCH_COMMIT", "unknown (no git here; set BENCH_COMMIT)")


def header(plan: Plan, env: str, steps: int) -> List[str]:
    shape = get_shape(plan.model)
    cfg = plan.ours_cfg
    from framework.models.build import padded_vocab_size

    padded = padded_vocab_size(shape.vocab, cfg.model.make_vocab_size_divisible_by, 1)
    o = plan.ours_settings
    return [
        f"### {TITLES.get(plan.model, plan.model)}, seq {shape.seq}, dropout {plan.dropout:g}"
        f" — {env}",
        "",
        f"- **Both sides** (checked equal field by field before timing, and again from each "
        f"run's own config/objects): {settings_line(o)}; {shape.layers} layers, hidden "
        f"{shape.hidden}, {shape.heads} heads / {shape.kv_heads} KV, FFN {shape.ffn} "
        f"({shape.activation}), {shape.norm} eps {shape.norm_eps:g}, {shape.position}"
        + (f" theta {shape.rope_theta:g}" if shape.position == "rope" else "")
        + f", {'tied' if shape.tied else 'untied'} embeddings, vocab {shape.vocab}, "
        f"{plan.hf_info['params'] / 1e6:.1f}M parameters.",
        f"- **HF**: `{plan.hf_info['class']}` (transformers {plan.hf_info['transformers']}), SDPA "
        "attention, `use_cache=False`, `torch.compile(model)` (default mode), loss from "
        "`labels=` inside the compiled call (HF's shifted cross-entropy on fp32-upcast logits), "
        f"fp32 params and grads under `torch.autocast(bf16)`, {shape.vocab} vocab rows. "
        f"`{plan.commands['hf']}`",
        "- **Ours**: `train.py` on megatron-core, bf16 weights for compute (Float16Module), fp32 "
        f"main params and fp32 grads in the optimizer, {padded} vocab rows, default kernels. "
        f"`{plan.commands['ours']}`",
        "- **Not compared** (each side's own way): " + "; ".join(NOT_COMPARED) + ".",
        f"- **Timing**: windows of {tp.LOG} steps, the host waits for the GPU at each window's "
        f"end (as `train.py` logs); 1 warm-up window, then {-(-steps // tp.LOG)} measured; "
        "tok/s = tokens / measured time; spread = (slowest - fastest window) / mean. MFU = "
        f"(6 x {shape.matmul_params() / 1e6:.1f}M matmul params + 12 x layers x hidden x seq) = "
        f"{shape.flops_per_token() / 1e9:.3f} GFLOP/token against {PEAK_TFLOPS_BF16:.0f} "
        "TFLOP/s. Peak GB = `torch.cuda.max_memory_allocated`.",
        "",
        TABLE_HEAD,
        "|---|---|---|---|---|---|---|---|",
    ]


def table(plans: List[Plan], recs: Dict[str, Dict], env: str, steps: int) -> str:
    out = []
    for plan in plans:
        mine = [r for r in recs.values() if r["model"] == plan.model
                and r["dropout"] == plan.dropout]
        ok = lambda side: [r for r in mine if r["side"] == side and "error" not in r  # noqa
                           and not r.get("settings_diffs")]
        best_hf = max(ok("hf"), key=lambda r: r["tok_s"], default=None)
        out += header(plan, env, steps)
        side_order = {"hf": 0, "hf_pad": 1, "torchtitan": 2, "ours": 3}
        for r in sorted(mine, key=lambda r: (side_order.get(r["side"], 9), r["variant"], r["mb"])):
            out.append(row(r, best_hf["tok_s"] if best_hf else None))
        best_ours = max([r for r in ok("ours") if r["variant"] == "default"],
                        key=lambda r: r["tok_s"], default=None)
        if best_hf and best_ours:
            out.append("")
            out.append(f"**Each at its best micro-batch, dropout {plan.dropout:g}: ours "
                       f"{best_ours['tok_s']:.0f} tok/s (mb {best_ours['mb']}, "
                       f"{100 * best_ours['mfu']:.1f}% MFU) vs HF + compile "
                       f"{best_hf['tok_s']:.0f} (mb {best_hf['mb']}, "
                       f"{100 * best_hf['mfu']:.1f}%): "
                       f"{best_ours['tok_s'] / best_hf['tok_s']:.2f}x.**")
        tts = [r for r in mine if r["side"] == "torchtitan"]
        if tts and tts[0].get("cmd"):
            out.append("")
            out.append(f"torchtitan ran as: `{tts[0]['cmd']}` (its own settings: untied output "
                       "layer, weight decay on every parameter, per-block compile, fp32 params "
                       "under autocast bf16; peak = max reserved)")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse(argv)
    t_start = time.time()
    extra = a.ours_extra.split()
    plans: List[Plan] = []
    cands: List[Cand] = []
    for m in a.models:
        shape = get_shape(m)
        for d in a.dropouts:
            plan = make_plan(m, d, (a.ours_mbs[m] or a.hf_mbs[m] or [8])[0], a.steps, extra)
            plans.append(plan)
            if plan.diffs:
                print(f"error: settings differ for {m} dropout {d:g}: " + "; ".join(plan.diffs),
                      file=sys.stderr)
                return 1
            groups = [("ours", v, a.ours_mbs[m]) for v in a.ours_variants] + \
                [("hf", "-", a.hf_mbs[m]), ("hf_pad", "-", a.hf_pad_mbs[m])]
            if shape.family == "llama" and d == 0:
                groups.append(("torchtitan", "-", a.tt_mbs[m]))
            for side, variant, mbs in groups:
                # the second baselines start one round later than ours and HF + compile
                later = 1 if side in ("hf_pad", "torchtitan") else 0
                for i, mb in enumerate(mbs):
                    cands.append(Cand(m, d, side, variant, mb, a.steps, rank=i + later))
    env = env_line() if not a.dry_run else \
        f"dry run — {datetime.date.today()} — commit {commit()}"
    print(f"settings match on both sides for {len(plans)} (model, dropout) pair(s)", flush=True)
    for plan in plans:
        print(f"{plan.model} dropout {plan.dropout:g}: {settings_line(plan.ours_settings)}")
        print(f"  ours: {plan.commands['ours']}\n  HF:   {plan.commands['hf']}")
    queue = order(cands)
    if a.dry_run:
        print("plan (in run order):")
        for c in queue:
            print(f"  {c.key}")
        return 0

    recs: Dict[str, Dict] = {}
    if a.results and os.path.exists(a.results):
        for line in open(a.results):
            if line.strip():
                r = json.loads(line)
                recs[r["key"]] = r
        print(f"resuming: {len(recs)} result(s) already in {a.results}", flush=True)
    plan_of = {(p.model, p.dropout): p for p in plans}
    oom_at: Dict[tuple, int] = {}
    for r in recs.values():
        if r.get("error") == "OOM":
            g = (r["model"], r["dropout"], r["side"], r["variant"])
            oom_at[g] = min(oom_at.get(g, 1 << 30), r["mb"])
    print(TABLE_HEAD, flush=True)
    not_run = []
    for c in queue:
        if c.key in recs:
            continue
        if c.mb > oom_at.get(c.group, 1 << 30):
            continue  # a smaller micro-batch of this group did not fit
        left = a.budget_s - (time.time() - t_start)
        # the longest this side took for this model so far in this call (compilation included)
        est = max([r["elapsed_s"] for r in recs.values() if r.get("model") == c.model
                   and r.get("side") == c.side and r.get("this_call")], default=0.0)
        if left < max(a.min_run_s, 1.1 * est):
            not_run.append(c)
            continue
        rec = run_cand(c, plan_of[(c.model, c.dropout)], min(a.cap_s, left), extra)
        if rec.get("error") == "OOM":
            oom_at[c.group] = min(oom_at.get(c.group, 1 << 30), c.mb)
        if "timed out" in rec.get("error", "") and left <= a.cap_s:
            # cut by this call's budget, not by the candidate's cap: leave it for the next call
            not_run.append(c)
            print(f"(not finished within this call's budget: {c.key})", flush=True)
            continue
        recs[c.key] = dict(rec, this_call=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"{c.model}: " + row(rec, None) + f" ({rec['elapsed_s']:.0f} s)", flush=True)
    text = table(plans, recs, env, a.steps)
    if not_run:
        text += ("\nNot run within this call's budget (run the same command again with the "
                 "same --results to continue): " + ", ".join(c.key for c in not_run) + "\n")
    print("\n" + text, flush=True)
    if a.table_out:
        with open(a.table_out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
