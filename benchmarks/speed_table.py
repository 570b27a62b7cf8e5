"""Speed at equal settings: ours vs Hugging Face + torch.compile (and torchtitan), each side at
its best micro-batch, on one GPU, in one run.

    python benchmarks/speed_table.py --models gpt2_large --dropouts 0,0.1 \\
        --ours-mbs 32,24,48 --hf-mbs 32,24,40 --budget-s 450 --results $OUT/speed.jsonl
    python benchmarks/speed_table.py --models llama3_1b --dry-run     # no GPU: check and print

Before anything is timed, both sides' settings are derived from what each side really builds
(ours: the config `train.py` composes from the exact overrides; HF: the transformers model and
torch optimizer, built on the meta device) and compared field by field
(benchmarks/shapes.py: dimensions, dropout, optimizer, clipping, LR schedule, batch, precision,
data). Any difference stops the run with `error: settings differ` before GPU work. After each
timed run its own settings are read back (our run's .hydra/config.yaml, the HF process's built
objects, torchtitan's job TOML) and checked again; a row whose settings moved is marked.

Every candidate (side, micro-batch, dropout) runs in its own process, one after another, so one
OOM or crash does not end the table. Candidates run round-robin over the groups (model x dropout
x side): each group's first micro-batch (the expected best) before any group's second, so a
machine taken away mid-run still leaves a comparable pair. A group stops growing its micro-batch
after an OOM. Each finished row is printed at once and appended to `--results` (JSON lines, each
with the commit, card and versions it ran on and the settings it was checked against); running
again with the same file skips what it holds (a row checked against other settings than this
call's, or recording none, runs again), so a second call completes the sweep. A row from an
earlier call is marked in the table; it counts in the bold ratio only where its commit (without
uncommitted changes), card and versions are this call's. `--budget-s` bounds the whole call: a candidate that would start
with less than `--min-run-s` left is not started (and stays to be run by the next call).
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
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import hf_baseline  # noqa: E402
from benchmarks import throughput as tp  # noqa: E402
from benchmarks import torchtitan_baseline as ttb  # noqa: E402
from benchmarks.shapes import (NOT_COMPARED, PEAK_TFLOPS_BF16, SHAPES, TITLES,  # noqa: E402
                               check_dropout, compare_settings, compose_ours, get_shape,
                               hf_model, hf_optimizer, hf_settings, ours_settings, settings_line)

SHORT = {"ours": "ours", "hf": "HF", "hf_pad": "HF padded", "torchtitan": "torchtitan"}
SIDES = {"ours": "ours (train.py, defaults)", "hf": "HF + torch.compile",
         "hf_pad": "HF + torch.compile, vocab padded to a multiple of 128",
         "torchtitan": "torchtitan 0.2.2 trainer, per-block compile"}
TABLE_HEAD = ("| dropout | system | micro-batch | tok/s | MFU | peak GB | spread | "
              "vs best HF + compile |")
# ours + one switch, for `--ours-variants` (the label says what differs from the defaults)
OURS_VARIANTS = {"default": [], "compile": ["model.torch_compile=true"],
                 "unfused_wgrad": ["model.fused_wgrad=false"],
                 "pageable": ["data.pin_memory=false"],
                 "cuda_graph": ["model.cuda_graph=true"],
                 "no_swiglu_kernel": ["model.swiglu_kernel=false"],
                 "keep_logits": ["model.fused_ce_keep_logits=true"],
                 "recompute_logits": ["model.fused_ce_keep_logits=false"],
                 "qkv_rope": ["model.qkv_rope_fusion=true"],
                 "ce_chunk4k": ["model.fused_ce_chunk_tokens=4096"],
                 "ce_chunk8k": ["model.fused_ce_chunk_tokens=8192"],
                 "keep_logits_qkv_rope": ["model.fused_ce_keep_logits=true",
                                          "model.qkv_rope_fusion=true"]}


MB = "<mb>"  # the micro-batch in the header's commands (each row's own is in its record)


def ours_label(variant: str, extra) -> str:
    """Our row's label: what differs from the defaults (the variant's switches, then
    --ours-extra), or 'ours (train.py, defaults)'."""
    switches = OURS_VARIANTS[variant] + list(extra)
    return f"ours + {' '.join(switches)}" if switches else SIDES["ours"]


@dataclass
class Cand:
    model: str
    dropout: float
    side: str  # ours | hf | hf_pad | torchtitan
    variant: str  # ours: a key of OURS_VARIANTS; others: "-"
    mb: int
    steps: int
    rank: int = 0  # position of mb in its group's list (the round-robin order)
    extra: Tuple[str, ...] = ()  # ours: the --ours-extra overrides

    @property
    def key(self) -> str:
        # our rows run with --ours-extra: a results file then keeps apart rows run with other
        # extras (the other sides' rows follow ours through the settings they were checked
        # against, `stale`)
        extra = f"|+{' '.join(self.extra)}" if self.side == "ours" and self.extra else ""
        return (f"{self.model}|d{self.dropout:g}|{self.side}|{self.variant}|mb{self.mb}|"
                f"steps{self.steps}{extra}")

    @property
    def group(self):
        return (self.model, self.dropout, self.side, self.variant, self.extra)

    @property
    def label(self) -> str:
        if self.side == "ours":
            return ours_label(self.variant, self.extra)
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
    extra: Tuple[str, ...] = ()  # --ours-extra, in ours_cfg


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
    """Both sides' settings at micro-batch `mb` (the header's commands name the micro-batch
    `MB`: each row runs its own)."""
    import torch

    shape = get_shape(model)
    cfg = compose_ours(tp.ours_overrides_for(model, mb, steps, dropout, extra))
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
    hf_s = hf_settings(hm, hopt, opt, shape.seq, mb, total,
                       data=hf_baseline.data_setting(shape), autocast=hf_baseline.AUTOCAST)
    import transformers

    info = {"class": type(hm).__name__, "params": sum(p.numel() for p in hm.parameters()),
            "transformers": transformers.__version__}
    plan = Plan(model, dropout, cfg, ours_s, hf_s, info, compare_settings(ours_s, hf_s),
                extra=tuple(extra))
    plan.commands["ours"] = " ".join(["python train.py", *tp.ours_overrides_for(
        model, MB, steps, dropout, extra), "checkpoint.dir=<tmp> hydra.run.dir=<tmp>"])
    plan.commands["hf"] = shown(tp.hf_cmd(model, MB, steps, True, dropout, cfg.optimizer))
    if model in ttb.TT_SHAPES:
        plan.commands["torchtitan"] = shown(tt_cmd(model, MB, steps, cfg.optimizer))
    return plan


def shown(cmd: List[str]) -> str:
    """A command as the table prints it: `python`, paths relative to the repository."""
    return " ".join(["python" if i == 0 else x for i, x in enumerate(cmd)]).replace(
        ROOT + "/", "")


def check_torchtitan(plan: Plan) -> None:
    """torchtitan runs our decay style only where it has it: a one-line error otherwise."""
    style = plan.ours_cfg.optimizer.lr_decay_style
    if style not in ttb.TT_DECAY_TYPES:
        raise SystemExit(f"error: --tt-mbs: our optimizer.lr_decay_style={style} has no "
                         f"torchtitan counterpart (torchtitan_baseline runs "
                         f"{' or '.join(ttb.TT_DECAY_TYPES)}); leave --tt-mbs empty")


def tt_diffs(ref: Dict, tt: Dict) -> List[str]:
    """Fields of torchtitan's settings that differ from ours, beyond what it has its own way
    (torchtitan_baseline.OWN_WAY) and what ours has no field for (its compile scope)."""
    keys = [k for k in tt if k in ref and k not in ttb.OWN_WAY]
    return compare_settings({k: ref[k] for k in keys}, {k: tt[k] for k in keys},
                            them="torchtitan")


# --------------------------------------------------------------------------------------------
# running candidates
# --------------------------------------------------------------------------------------------
def tt_cmd(model: str, mb, steps: int, optimizer) -> List[str]:
    """torchtitan_baseline.py's command with our composed OptimizerConfig's values."""
    o = optimizer
    return [sys.executable, os.path.join(ROOT, "benchmarks", "torchtitan_baseline.py"),
            "--model", model, "--micro-batch", str(mb), "--steps", str(steps),
            "--log-interval", str(tp.LOG), "--lr", str(o.lr), "--min-lr", str(o.min_lr),
            "--beta1", str(o.adam_beta1), "--beta2", str(o.adam_beta2), "--eps", str(o.adam_eps),
            "--weight-decay", str(o.weight_decay), "--clip-grad", str(o.clip_grad),
            "--lr-warmup-steps", str(o.lr_warmup_steps), "--lr-decay-style", o.lr_decay_style
            ] + ([] if o.fused_step else ["--no-fused"])


def window_spread(wins: List[float], side: str, steps: int) -> Optional[float]:
    """(slowest - fastest) / mean over the measured windows. Our runs report only their measured
    windows; the baselines report every window, the warm-up (compilation) first, so only their
    last ceil(steps / LOG) windows count."""
    n_measured = -(-steps // tp.LOG)  # ceil
    meas = list(wins) if side == "ours" else list(wins)[-n_measured:]
    return (max(meas) - min(meas)) / (sum(meas) / len(meas)) if meas else None


def run_cand(c: Cand, plan: Plan, timeout: float) -> Dict:
    t0 = time.time()
    rec = {"key": c.key, "model": c.model, "dropout": c.dropout, "side": c.side,
           "variant": c.variant, "mb": c.mb, "steps": c.steps, "extra": list(c.extra)}
    diffs: List[str] = []
    if c.side == "ours":
        extra = OURS_VARIANTS[c.variant] + list(c.extra)
        res, err = tp.ours(c.model, c.mb, c.steps, extra, dropout=c.dropout, timeout=timeout,
                           keep_config=True)
        if res is not None:
            ran = ours_settings(res.pop("config"))
            groups = res.pop("fused_adam_groups", None)
            if groups is not None:  # what the optimizer really ran, not the config flag
                ran["fused"] = groups[0] == groups[1] and groups[1] > 0
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
            for k in ("graph_breaks", "graph_break_reasons", "unique_graphs"):
                if k in res:
                    rec[k] = res[k]
        rec["cmd"] = shown(cmd)
    else:  # torchtitan: its settings read back from its TOML, its own way where OWN_WAY says
        cmd = tt_cmd(c.model, c.mb, c.steps, plan.ours_cfg.optimizer)
        r = tp.run(cmd, timeout=timeout)
        res, err = (None, tp.failure(r)) if r.returncode != 0 else (
            json.loads(r.stdout.strip().splitlines()[-1]), "")
        if res is not None:
            rec["tt_settings"] = res.pop("settings")
            diffs = tt_diffs(with_mb(plan.ours_settings, c.mb), rec["tt_settings"])
            rec["tt_command"] = res.pop("command", None)  # with its temporary TOML's path
        rec["cmd"] = shown(cmd)
    if res is not None:
        shape = get_shape(c.model)
        wins = res.get("window_ms") or []
        spread = window_spread(wins, c.side, c.steps)
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


def row(rec: Dict, best_hf: Optional[float], mark: str = "") -> str:
    """One table row; `mark`: its provenance marker (`provenance`)."""
    label = SIDES.get(rec["side"], rec["side"])
    if rec["side"] == "ours":
        label = ours_label(rec["variant"], rec.get("extra") or ())
    label += mark
    if "error" in rec:
        why = "did not fit (OOM)" if rec["error"] == "OOM" else f"did not run: {rec['error']}"
        return f"| {rec['dropout']:g} | {label} | {rec['mb']} | {why} | | | | |"
    ratio = f"{rec['tok_s'] / best_hf:.2f}x" if best_hf else "n/a"
    peak = "" if rec.get("peak_gb") is None else f"{rec['peak_gb']:.1f}"
    if rec.get("peak_kind") == "reserved":
        peak += " (reserved)"
    spread = "" if rec.get("spread") is None else f"{100 * rec['spread']:.1f}%"
    moved = " (settings moved: " + "; ".join(rec["settings_diffs"]) + ")" \
        if rec.get("settings_diffs") else ""
    return (f"| {rec['dropout']:g} | {label}{moved} | {rec['mb']} | {rec['tok_s']:.0f} | "
            f"{100 * rec['mfu']:.1f}% | {peak} | {spread} | {ratio} |")


# what a record keeps of the call that ran it; equal (clean commit) = measured like this call
ENV_FIELDS = ("commit", "card", "torch", "versions")


def env_info() -> Dict[str, str]:
    """This call's card, torch and package versions, date and commit; the card and torch are
    asked in a child process (this one keeps no CUDA context, which would take GPU memory from
    the candidates)."""
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
    return {"commit": commit(), "card": card, "torch": torch_v, "versions": ", ".join(vers),
            "date": datetime.date.today().isoformat()}


def env_line(env: Dict[str, str]) -> str:
    return (f"{env.get('card', '?')} — {env.get('date', '?')} — commit {env.get('commit', '?')} "
            f"— torch {env.get('torch', '?')}, {env.get('versions', '?')}")


def commit() -> str:
    """BENCH_COMMIT when set (the device copy's git metadata can be stale), else git's HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
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
    return "unknown (no git here; set BENCH_COMMIT)"


def provenance(rec: Dict, env: Dict[str, str]) -> str:
    """'' for a row of this call; '†' for a row of an earlier call (--results) on this call's
    commit, card and versions, the commit a plain hash (no uncommitted changes, not unknown):
    it counts in the bold ratio; '‡' for any other earlier row: shown, not counted."""
    if rec.get("this_call"):
        return ""
    ran = rec.get("env") or {}
    sha = env.get("commit", "")
    clean = bool(sha) and all(ch in "0123456789abcdef" for ch in sha)
    same = clean and all(ran.get(k) == env.get(k) for k in ENV_FIELDS)
    return "†" if same else "‡"


def provenance_lines(mine: List[Dict], marks: Dict[str, str]) -> List[str]:
    """The footnotes of the rows from earlier calls: where each '‡' row ran."""
    out = []
    if "†" in marks.values():
        out.append("† from an earlier call (--results) on this commit, card and versions; "
                   "counted in the bold ratio.")
    where: Dict[str, List[str]] = {}
    for r in mine:
        if marks[r["key"]] == "‡":
            e = r.get("env")
            where.setdefault(env_line(e) if e else "an unrecorded commit, card and versions",
                             []).append(f"{SHORT.get(r['side'], r['side'])} mb {r['mb']}")
    for line, rows in where.items():
        out.append(f"‡ from an earlier call on {line} ({', '.join(rows)}): not counted in the "
                   "bold ratio.")
    return out


def header(plan: Plan, env: Dict[str, str], steps: int) -> List[str]:
    shape = get_shape(plan.model)
    cfg = plan.ours_cfg
    from framework.models.build import padded_vocab_size

    padded = padded_vocab_size(shape.vocab, cfg.model.make_vocab_size_divisible_by, 1)
    o = plan.ours_settings
    return [
        f"### {TITLES.get(plan.model, plan.model)}, seq {shape.seq}, dropout {plan.dropout:g}"
        f" — {env_line(env)}",
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
        f"`{plan.commands['hf']}` ({MB}: each row's micro-batch)",
        "- **Ours**: `train.py` on megatron-core, bf16 weights for compute (Float16Module), fp32 "
        f"main params and fp32 grads in the optimizer, {padded} vocab rows, default kernels. "
        f"`{plan.commands['ours']}`",
        "- **Not compared** (each side's own way): " + "; ".join(NOT_COMPARED) + ".",
        f"- **Timing**: windows of {tp.LOG} steps, the host waits for the GPU at each window's "
        f"end (as `train.py` logs); 1 warm-up window, then {-(-steps // tp.LOG)} measured; "
        "tok/s = tokens / measured time; spread = (slowest - fastest window) / mean. MFU = "
        f"(6 x {shape.matmul_params() / 1e6:.1f}M matmul params + 12 x layers x hidden x seq) = "
        f"{shape.flops_per_token() / 1e9:.3f} GFLOP/token against {PEAK_TFLOPS_BF16:.0f} "
        "TFLOP/s. Peak GB = `torch.cuda.max_memory_allocated` since the process started, on "
        "both sides (warm-up and compilation included); torchtitan: its max reserved.",
        "",
        TABLE_HEAD,
        "|---|---|---|---|---|---|---|---|",
    ]


def graph_break_lines(mine: List[Dict]) -> List[str]:
    """A warning per HF row whose torch.compile broke the model's graph (hf_baseline.py's
    dynamo counters): a break runs Python between compiled pieces, in the HF timing."""
    out = []
    for r in sorted(mine, key=lambda r: (r["side"], r["mb"])):
        if r["side"] in ("hf", "hf_pad") and r.get("graph_breaks"):
            why = "; ".join(f"{k} (x{v})" for k, v in (r.get("graph_break_reasons") or {}).items())
            out.append(f"**Warning**: {SIDES[r['side']]} mb {r['mb']} had {r['graph_breaks']} "
                       f"torch.compile graph break(s), {r.get('unique_graphs', '?')} graph(s)"
                       + (f": {why}" if why else "") + ".")
    return out


def tt_settings_line(s: Dict) -> str:
    """torchtitan's settings (torchtitan_baseline.tt_settings, read back from its TOML)."""
    return (f"lr {s['lr']:g} (warmup {s['lr_warmup_steps']}, {s['lr_decay_style']} to "
            f"{s['min_lr']:g} over {s['lr_decay_steps']} steps) betas {tuple(s['betas'])} eps "
            f"{s['eps']:g} weight decay {s['weight_decay']:g} (exempt: {s['no_weight_decay']}), "
            f"grad clip {s['clip_grad']:g}, fused={s['fused']}, seq {s['seq']}, compile "
            f"{s['compile']}, {s['compute_dtype']} compute with {s['master_dtype']} master "
            f"weights, FP8 {s['fp8']}, recompute {s['recompute']}, "
            f"{'tied' if s['tied'] else 'untied'} output layer, data: {s['data']}")


def tt_lines(plan: Plan, tts: List[Dict]) -> List[str]:
    """How torchtitan ran: the command, and per set of settings read back from its TOML the
    micro-batches that ran with it."""
    groups: Dict[str, List[int]] = {}
    for r in tts:
        if "error" in r:
            continue
        s = {k: v for k, v in (r.get("tt_settings") or {}).items()
             if k not in ("micro_batch", "global_batch")}
        groups.setdefault(json.dumps(s, sort_keys=True), []).append(r["mb"])
    out = [f"torchtitan ran as `{plan.commands.get('torchtitan', '?')}` ({MB}: each row's "
           "micro-batch; peak = max reserved); its own way: untied output layer, weight decay "
           "on every parameter." + (" Its settings, read back from its TOML:" if groups else "")]
    for key, mbs in groups.items():
        s = json.loads(key)
        what = tt_settings_line(s) if s else "not recorded (an earlier torchtitan_baseline.py)"
        out.append(f"- mb {', '.join(map(str, sorted(mbs)))}: {what}")
    return out


def table(plans: List[Plan], recs: Dict[str, Dict], env: Dict[str, str], steps: int) -> str:
    out = []
    for plan in plans:
        mine = [r for r in recs.values() if r["model"] == plan.model
                and r["dropout"] == plan.dropout]
        marks = {r["key"]: provenance(r, env) for r in mine}
        ok = lambda side: [r for r in mine if r["side"] == side and "error" not in r  # noqa
                           and not r.get("settings_diffs") and marks[r["key"]] != "‡"]
        best_hf = max(ok("hf"), key=lambda r: r["tok_s"], default=None)
        out += header(plan, env, steps)
        side_order = {"hf": 0, "hf_pad": 1, "torchtitan": 2, "ours": 3}
        for r in sorted(mine, key=lambda r: (side_order.get(r["side"], 9), r["variant"],
                                             r.get("extra") or [], r["mb"])):
            out.append(row(r, best_hf["tok_s"] if best_hf else None, marks[r["key"]]))
        notes = provenance_lines(mine, marks) + graph_break_lines(mine)
        if notes:
            out += [""] + notes
        # the bold line: our defaults with this call's --ours-extra
        best_ours = max([r for r in ok("ours") if r["variant"] == "default"
                         and tuple(r.get("extra") or ()) == plan.extra],
                        key=lambda r: r["tok_s"], default=None)
        if best_hf and best_ours:
            who = ours_label("default", plan.extra) if plan.extra else "ours"
            out.append("")
            out.append(f"**Each at its best micro-batch, dropout {plan.dropout:g}: {who} "
                       f"{best_ours['tok_s']:.0f} tok/s (mb {best_ours['mb']}, "
                       f"{100 * best_ours['mfu']:.1f}% MFU) vs HF + compile "
                       f"{best_hf['tok_s']:.0f} (mb {best_hf['mb']}, "
                       f"{100 * best_hf['mfu']:.1f}%): "
                       f"{best_ours['tok_s'] / best_hf['tok_s']:.2f}x.**")
        tts = [r for r in mine if r["side"] == "torchtitan"]
        if tts:
            out += [""] + tt_lines(plan, tts)
        out.append("")
    return "\n".join(out)


def stale(rec: Dict, plan_of: Dict) -> bool:
    """A record of this call's (model, dropout) that was checked against other settings than
    this call's plan (another --ours-extra that moves a setting, another data type, ...), or
    that records none (an earlier version of this script): it runs again. Records of other
    (model, dropout) pairs are kept."""
    plan = plan_of.get((rec.get("model"), rec.get("dropout")))
    if plan is None:
        return False
    return "ref_settings" not in rec or bool(
        compare_settings(with_mb(plan.ours_settings, rec["mb"]), rec["ref_settings"]))


def load_results(path: str, plan_of: Dict) -> Dict[str, Dict]:
    """An earlier call's records by key, the last of each key that is not `stale`."""
    recs, n_stale = {}, 0
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            if stale(r, plan_of):
                n_stale += 1
            else:
                recs[r["key"]] = r
    print(f"resuming: {len(recs)} result(s) already in {path}"
          + (f" ({n_stale} checked against other or no settings: run again)" if n_stale
             else ""),
          flush=True)
    return recs


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
            # the pair the ratio needs first (our first variant, then HF + compile), then
            # the other variants, so a call cut by its budget still has the ratio
            ours = [("ours", v, a.ours_mbs[m]) for v in a.ours_variants]
            groups = ours[:1] + [("hf", "-", a.hf_mbs[m])] + ours[1:] + \
                [("hf_pad", "-", a.hf_pad_mbs[m])]
            if shape.family == "llama" and d == 0 and a.tt_mbs[m]:
                check_torchtitan(plan)
                groups.append(("torchtitan", "-", a.tt_mbs[m]))
            for side, variant, mbs in groups:
                # the second baselines start one round later than ours and HF + compile
                later = 1 if side in ("hf_pad", "torchtitan") else 0
                for i, mb in enumerate(mbs):
                    cands.append(Cand(m, d, side, variant, mb, a.steps, rank=i + later,
                                      extra=tuple(extra) if side == "ours" else ()))
    print(f"settings match on both sides for {len(plans)} (model, dropout) pair(s)", flush=True)
    for plan in plans:
        print(f"{plan.model} dropout {plan.dropout:g}: {settings_line(plan.ours_settings)}")
        print(f"  ours: {plan.commands['ours']}\n  HF:   {plan.commands['hf']}")
        if "torchtitan" in plan.commands and a.tt_mbs[plan.model] and plan.dropout == 0:
            print(f"  torchtitan: {plan.commands['torchtitan']}")
    queue = order(cands)
    if a.dry_run:
        print("plan (in run order):")
        for c in queue:
            print(f"  {c.key}")
        return 0

    env = env_info()
    ran_on = {k: env[k] for k in ENV_FIELDS + ("date",)}
    plan_of = {(p.model, p.dropout): p for p in plans}
    recs: Dict[str, Dict] = {}
    if a.results and os.path.exists(a.results):
        recs = load_results(a.results, plan_of)
    oom_at: Dict[tuple, int] = {}
    for r in recs.values():
        if r.get("error") == "OOM":
            g = (r["model"], r["dropout"], r["side"], r["variant"], tuple(r.get("extra") or ()))
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
        plan = plan_of[(c.model, c.dropout)]
        rec = run_cand(c, plan, min(a.cap_s, left))
        # where it ran and what it was checked against (a later call's `provenance`, `stale`)
        rec.update(env=ran_on, ref_settings=with_mb(plan.ours_settings, c.mb))
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
