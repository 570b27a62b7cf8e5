"""The default job (`python train.py` then `python generate.py`) at several lengths: wall time of
training and held-out accuracy, each candidate on its own pinned CPU cores (not in CI).

    python benchmarks/default_job.py                         # the default length only
    python benchmarks/default_job.py --steps 1000 1500 2000  # candidates side by side

Each candidate runs `train.py train.device=cpu train.max_steps=N` (the schedule decays over N
steps, as a user's shorter run would) in its own checkpoint directory, pinned with `taskset` to
`--cores` cores of its own when the machine has enough (else all share them), then
`generate.py device=cpu` on the result. Prints a Markdown table named by date, CPU and commit:
training wall time, steps/s, held-out accuracy and eval loss.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True)
    return r.stdout.strip() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[None],
                    help="train.max_steps candidates (default: conf/train.yaml's)")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores per candidate")
    ap.add_argument("--first-core", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every candidate")
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir, removed)")
    a = ap.parse_args(argv)

    work = a.out or tempfile.mkdtemp(prefix="default_job-")
    os.makedirs(work, exist_ok=True)
    ncpu = len(os.sched_getaffinity(0))
    pin = shutil.which("taskset") is not None and ncpu >= a.first_core + a.cores * len(a.steps)
    procs = []
    for i, n in enumerate(a.steps):
        name = f"steps{n or 'default'}"
        over = [f"train.max_steps={n}"] if n is not None else []
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "train.device=cpu",
               "train.progress_bar=false", f"checkpoint.dir={work}/{name}/ck",
               f"hydra.run.dir={work}/{name}/run", *over, *a.extra]
        if pin:
            lo = a.first_core + i * a.cores
            cmd = ["taskset", "-c", f"{lo}-{lo + a.cores - 1}", *cmd]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.cores), CUDA_VISIBLE_DEVICES="")
        log = open(f"{work}/{name}.train.log", "w")
        procs.append((name, n, cmd, env, time.time(),
                      subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                       env=env)))
    rows = []
    for name, n, cmd, env, t0, p in procs:
        rc = p.wait()
        wall = time.time() - t0
        gen = subprocess.run([*cmd[:cmd.index(os.path.join(ROOT, "train.py"))],
                              os.path.join(ROOT, "generate.py"), "device=cpu",
                              f"load={work}/{name}/ck", f"hydra.run.dir={work}/{name}/gen"],
                             cwd=work, capture_output=True, text=True, env=env)
        acc = re.search(r"accuracy: (\d+)/(\d+)", gen.stdout + gen.stderr)
        recs = [json.loads(l) for l in open(f"{work}/{name}/run/metrics.jsonl")] \
            if os.path.exists(f"{work}/{name}/run/metrics.jsonl") else []
        steps = max((r.get("step", 0) for r in recs), default=0)
        evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
        rows.append((n, rc, wall, steps, acc, evals[-1] if evals else None, gen.returncode))
    print(f"## Default job, {datetime.date.today()}, {_cpu_name()}, commit {_commit()}")
    print(f"{a.cores} cores per candidate ({'pinned with taskset' if pin else 'not pinned'}), "
          f"OMP_NUM_THREADS={a.cores}, {len(a.steps)} candidate(s) at once; extra: {a.extra}\n")
    print("| train.max_steps | exit | train wall (with start-up) | steps/s (same) | held-out accuracy | eval loss |")
    print("|---|---|---|---|---|---|")
    for n, rc, wall, steps, acc, ev, grc in rows:
        accs = f"{acc[1]}/{acc[2]} = {100 * int(acc[1]) / int(acc[2]):.1f}%" if acc \
            else f"(generate exit {grc})"
        print(f"| {n or 'default'} | {rc} | {wall / 60:.1f} min | "
              f"{steps / wall if wall else 0:.2f} | {accs} | "
              f"{'' if ev is None else f'{ev:.3f}'} |")
    if a.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
