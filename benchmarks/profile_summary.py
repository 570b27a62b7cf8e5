"""Summarise a torch.profiler Chrome trace: GPU kernel time grouped by kernel name, by kind of
work (GEMM, attention, optimizer, ...), by training phase and by the op that launched it.

    python benchmarks/profile_summary.py trace.json [--top 30]

Steps are counted from our `train_step_*` ranges (train.py's profiler) or, in a trace of another
trainer (torchtitan's), from torch.profiler's own `ProfilerStep#N` ranges.
"""
import argparse
import json
from collections import defaultdict


def summarize(path: str, top: int = 30, out: str = None) -> str:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kern = defaultdict(lambda: [0.0, 0])
    steps = 0
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") == "kernel":
            k = kern[e["name"][:110]]
            k[0] += e.get("dur", 0.0)
            k[1] += 1
        elif e.get("cat") == "user_annotation" and e["name"].startswith("train_step_"):
            steps += 1
    marker, note = "train_step_", ""
    if not steps:  # another trainer's trace: torch.profiler's step ranges
        marker = "ProfilerStep#"
        ranges = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                        if e.get("ph") == "X" and e.get("name", "").startswith(marker)
                        and e.get("cat") in ("user_annotation", "cpu_op"))
        steps = len(ranges)
        # the GPU runs behind the host, so the recorded kernels include ones launched before
        # the first range: count a kernel in the step whose range holds its launch
        kept, left = _launched_in(events, ranges)
        if kept is not None:
            kern = kept
            note = (f" (kernels launched inside the {steps} ProfilerStep ranges; {left} "
                    f"launched outside them left out)")
    steps = max(steps, 1)
    total = sum(v[0] for v in kern.values())
    lines = [f"{path}: {steps} step(s), GPU kernel time {total / 1000 / steps:.1f} ms/step"
             + note, f"{'ms/step':>9} {'%':>6} {'calls':>6}  kernel"]
    for name, (dur, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{dur / 1000 / steps:9.2f} {100 * dur / max(total, 1):6.1f} "
                     f"{n // steps:6d}  {name}")
    lines += category_table(kern, steps)
    lines += step_idle(events, marker)
    lines += phase_table(events, steps)
    lines += launch_table(events, steps, top)
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")


def _merge(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap(merged, a, b):
    """Total length of `merged` intervals inside [a, b]."""
    total = 0.0
    for x, y in merged:
        if y <= a:
            continue
        if x >= b:
            break
        total += min(y, b) - max(x, a)
    return total


def _launched_in(events, ranges):
    """({kernel name: [us, calls]} of the kernels whose launch (the cuda_runtime event with
    the same correlation id) lies in one of `ranges`, number left out), or (None, 0) when the
    trace has no correlation ids."""
    import bisect

    launch_ts = {e["args"]["correlation"]: e["ts"] for e in events if e.get("ph") == "X"
                 and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    if not launch_ts or not ranges:
        return None, 0
    starts = [a for a, _ in ranges]
    kern, left = defaultdict(lambda: [0.0, 0]), 0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        t = launch_ts.get(e.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, t) - 1 if t is not None else -1
        if i < 0 or t > ranges[i][1]:
            left += 1
            continue
        k = kern[e["name"][:110]]
        k[0] += e.get("dur", 0.0)
        k[1] += 1
    return kern, left


# kinds of GPU work, matched in order on the lower-cased kernel name (first match wins)
CATEGORIES = (
    ("attention", ("fmha", "flash", "attn", "sdpa", "cudnn")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "wgmma", "s16816",
              "sm90_", "sm80_")),
    ("optimizer + clip", ("adam", "multi_tensor", "foreach", "l2norm", "lpnorm")),
    ("communication", ("nccl",)),
    ("copy / fill", ("copy", "memcpy", "memset", "fill", "cat_", "index")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("reduction", ("reduce",)),
    ("triton (fused)", ("triton", "_kernel", "_swiglu")),  # torch.compile's and ours
)


def category(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def category_table(kern, steps):
    """GPU kernel time per kind of work (`CATEGORIES`), ms per step and % of kernel time: one
    table that reads the same for our trace and another trainer's."""
    agg = defaultdict(lambda: [0.0, 0])
    for name, (dur, n) in kern.items():
        a = agg[category(name)]
        a[0] += dur
        a[1] += n
    total = sum(v[0] for v in agg.values()) or 1.0
    out = ["", f"{'ms/step':>9} {'%':>6} {'calls':>6}  kind of work"]
    for cat, (dur, n) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
        out.append(f"{dur / 1000 / steps:9.2f} {100 * dur / total:6.1f} {n // steps:6d}  {cat}")
    return out


def step_idle(events, marker):
    """Per step range (`marker`): its wall span and the time no kernel ran on the GPU in it."""
    gpu = _merge([(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"
                  and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")])
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"
             and e.get("cat") in ("user_annotation", "cpu_op")
             and e.get("name", "").startswith(marker)]
    out = [""]
    for a, b in sorted(spans):
        out.append(f"step range {marker}: {(b - a) / 1000:.1f} ms wall, GPU idle "
                   f"{((b - a) - _overlap(gpu, a, b)) / 1000:.1f} ms")
    return out


def phase_table(events, steps):
    """Per `phase/*` range (see framework/training/loop.py): CPU time, the part of it spent
    blocked in CUDA synchronisation, and how long the GPU sat idle meanwhile."""
    gpu = _merge([(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"
                  and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")])
    syncs = _merge([(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"
                    and e.get("cat") == "cuda_runtime" and e["name"].startswith(SYNC_CALLS)])
    rows = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "user_annotation":
            continue
        name = e["name"]
        if not (name.startswith("phase/") or name.startswith("train_step_")):
            continue
        key = "train_step (whole)" if name.startswith("train_step_") else name
        a, b = e["ts"], e["ts"] + e.get("dur", 0)
        r = rows[key]
        r[0] += 1
        r[1] += b - a
        r[2] += _overlap(syncs, a, b)
        r[3] += (b - a) - _overlap(gpu, a, b)
    out = ["", f"{'phase':28s} {'calls':>6} {'CPU ms':>9} {'in sync':>9} {'GPU idle':>9}  "
               "(per step)"]
    for k, (n, cpu, sync, idle) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        out.append(f"{k:28s} {n // steps:6d} {cpu / 1000 / steps:9.2f} {sync / 1000 / steps:9.2f}"
                   f" {idle / 1000 / steps:9.2f}")
    return out


def launch_table(events, steps, top):
    """GPU kernel time grouped by the CPU ops that launched it (the innermost three aten or
    autograd ops around the launch call, matched through the trace's correlation ids): says
    which module or autograd node a kernel comes from."""
    import bisect

    launches = {e["args"]["correlation"]: e for e in events if e.get("ph") == "X"
                and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = defaultdict(list)  # (pid, tid) -> [(ts, end, name)] sorted by start
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            ops[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    starts = {}
    for k, v in ops.items():
        v.sort()
        starts[k] = [x[0] for x in v]
    agg = defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        la = launches.get(e.get("args", {}).get("correlation"))
        chain = []
        if la is not None:
            key = (la["pid"], la["tid"])
            v, st = ops.get(key, []), starts.get(key, [])
            i = bisect.bisect_right(st, la["ts"])
            # enclosing ops end after the launch; scan back a bounded window for them
            for a, b, name in reversed(v[max(0, i - 400):i]):
                if b >= la["ts"]:
                    chain.append(name)
                    if len(chain) == 3:
                        break
        agg[(" < ".join(chain) or "?", e["name"][:60])] += e.get("dur", 0.0)
    total = sum(agg.values()) or 1.0
    out = ["", f"{'ms/step':>9} {'%':>6}  launched by (innermost first)  |  kernel"]
    for (chain, kname), dur in sorted(agg.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{dur / 1000 / steps:9.2f} {100 * dur / total:6.1f}  {chain[:150]}  |  "
                   f"{kname}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    summarize(a.trace, a.top)
