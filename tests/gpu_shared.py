"""Helpers shared by the GPU test files."""
import json
import os

from helpers import ROOT


def shared_once(key, build):
    """`build(dir)` once per suite run, even with pytest-xdist workers (`-n 4`): the first
    worker builds under a file lock, the others wait and reuse. Returns build's JSON result."""
    import fcntl
    import tempfile

    base = os.path.join(tempfile.gettempdir(), f"gpu_suite_{os.getpid()}_{key}")
    if os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        base = os.path.join(tempfile.gettempdir(),
                            f"gpu_suite_{os.environ['PYTEST_XDIST_TESTRUNUID']}_{key}")
    os.makedirs(base, exist_ok=True)
    with open(base + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = os.path.join(base, "result.json")
        if not os.path.exists(done):
            result = build(base)
            with open(done, "w") as f:
                json.dump(result, f)
        with open(done) as f:
            return json.load(f)


def log_parity(line: str) -> None:
    """Print a result line and append it to results/gpu/parity.log (kept by
    tests/run_gpu_suite.sh)."""
    print(line)
    os.makedirs(os.path.join(ROOT, "results", "gpu"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "gpu", "parity.log"), "a") as f:
        f.write(line + "\n")


def compare(ref, got, rtol, label):
    """Per-step losses of a layout against the reference: max relative difference <= rtol, and
    the reference learns. The line also goes to results/gpu/parity.log."""
    steps = sorted(ref)
    assert sorted(got) == steps
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    line = (f"{label}: {len(steps)} steps, max rel diff {worst:.2e} (tol {rtol}), "
            f"loss {ref[steps[0]]:.4f}->{ref[steps[-1]]:.4f} ref, {got[steps[-1]]:.4f} got")
    log_parity(line)
    assert worst <= rtol, line
    assert ref[steps[-1]] < ref[steps[0]] - 0.3  # it learns


# 20 steps of gpt_tiny on the embedded corpus, one GPU: the short training runs that compare a
# GPU switch with its reference from the same initial weights (test_gpu_fp8, test_gpu_swiglu)
TINY_STEPS = 20
TINY_RUN = ["model=gpt_tiny", "data=embedded", f"train.max_steps={TINY_STEPS}",
            "train.log_interval=1", "train.eval_interval=0", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.progress_bar=false", "optimizer.lr_warmup_steps=5",
            "train.bf16=true", "parallel=single", "parallel.data_parallel_size=1"]


def tiny_run(d, name, *overrides):
    """TINY_RUN + overrides on GPU 0, run under <d>/<name>: the finished run (helpers.run_train:
    losses, stdout, records)."""
    from helpers import run_train

    run = os.path.join(str(d), name)
    return run_train(*TINY_RUN, "checkpoint.save=false", f"checkpoint.dir={run}/ckpt",
                     *overrides, cwd=d, name=f"{name}/out", fast=False, timeout=900,
                     env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))


def tiny_losses(d, name, *overrides):
    """Per-step losses of TINY_RUN + overrides on GPU 0, run under <d>/<name>."""
    return tiny_run(d, name, *overrides).losses


def tiny_seed(d, *overrides):
    """Save TINY_RUN's initial weights (+ overrides) under d; returns the override that loads
    them, so that the runs compared start from the same weights."""
    from helpers import run_train

    run_train(*TINY_RUN, *overrides, "train.max_steps=0", f"checkpoint.dir={d}/ckpt", cwd=d,
              name="out", fast=False, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    return f"checkpoint.load={d}/ckpt"


def tiny_perturbed_seed(d, *overrides):
    """tiny_seed, with every model tensor of the saved weights perturbed (non-zero biases,
    non-unit norms: tests/perturb.py), so that the runs compared start from weights on which a
    dropped bias or norm weight shows."""
    from perturb import perturb_checkpoint

    load = tiny_seed(d, *overrides)
    perturb_checkpoint(f"{d}/ckpt")
    return load
