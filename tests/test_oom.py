"""Out of GPU memory in training: one line with torch's figures and this run's levers
(framework/training/oom.py), the checkpoints already written intact."""
import os
import textwrap

import pytest
import torch

from framework.cli import register_resolvers
from framework.config import register_configs
from framework.training.oom import kept_logits_bytes, levers, oom_error, torch_figures
from tests.helpers import FAST, ROOT, TRAIN, load_config, run

register_configs()
register_resolvers()

# torch 2.x's CUDA out-of-memory text, as the caching allocator words it
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 7.83 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    "which 3.12 GiB is free. Including non-PyTorch memory, this process has 76.06 GiB memory in "
    "use. Of the allocated memory 70.20 GiB is allocated by PyTorch, and 4.91 GiB is reserved "
    "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
    "#environment-variables)")


def test_torch_figures_keep_the_sizes_on_one_line():
    got = torch_figures(torch.OutOfMemoryError(TORCH_OOM))
    assert "Tried to allocate 7.83 GiB" in got and "3.12 GiB is free" in got
    assert "76.06 GiB memory in use" in got
    assert "\n" not in got and "documentation" not in got and "PYTORCH_" not in got


def _cfg(*overrides):
    return load_config("model=gpt_tiny", "train.micro_batch_size=8",
                       "train.global_batch_size=32", *overrides)


def test_kept_logits_are_named_with_their_size():
    cfg = _cfg("model.fused_ce_keep_logits=true", "parallel=tp2")
    padded = 50304
    kept = kept_logits_bytes(cfg, padded, half=True, device=torch.device("cpu"),
                             is_last_stage=True)
    assert kept == 8 * cfg.model.seq_length * (padded // 2) * 2
    err = oom_error(torch.OutOfMemoryError(TORCH_OOM), cfg, step=7, rank=1,
                    padded_vocab=padded, half=True, device=torch.device("cpu"),
                    is_last_stage=True, dp_size=1)
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith("out of memory at step 7 on rank 1 (CUDA out of memory. Tried to "
                          "allocate 7.83 GiB.")
    assert f"model.fused_ce_keep_logits=false (the output layer keeps {kept / 2**30:.1f} GiB" \
        in msg and "chosen by model.fused_ce_keep_logits=true" in msg
    # first lever: the cheapest one
    assert msg.index("fused_ce_keep_logits=false") < msg.index("recompute_granularity")


def test_no_logits_lever_where_none_are_kept():
    cfg = _cfg("model.fused_ce_keep_logits=true")
    cpu = torch.device("cpu")
    assert kept_logits_bytes(cfg, 50304, True, cpu, is_last_stage=False) is None  # not last stage
    assert kept_logits_bytes(_cfg("model.fused_ce_keep_logits=false"), 50304, True, cpu,
                             True) is None
    assert kept_logits_bytes(_cfg(), 50304, True, cpu, True) is None  # auto: never on CPU
    assert kept_logits_bytes(_cfg("model.fused_cross_entropy=false"), 50304, True, cpu,
                             True) is None
    assert not any("fused_ce_keep_logits" in x for x in levers(_cfg(), None, 1))


def test_levers_follow_the_config():
    base = levers(_cfg(), None, 1)
    assert base[0].startswith("parallel.recompute_granularity=selective")
    assert "train.global_batch_size=32 keeps the global batch" in base[1]
    assert not any("distributed_optimizer" in x for x in base)
    sel = levers(_cfg("parallel.recompute_granularity=selective",
                      "parallel.recompute_modules=[mlp_act]"), None, 4)
    assert sel[0] == ("parallel.recompute_granularity=full "
                      "parallel.recompute_method=uniform")
    assert sel[1].startswith("parallel.use_distributed_optimizer=true") and "4 data-parallel" \
        in sel[1]
    full = levers(_cfg("parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
                       "train.micro_batch_size=1",
                       "parallel.use_distributed_optimizer=true"), None, 4)
    assert full == ["more parallel.tensor_model_parallel_size / pipeline_model_parallel_size"]


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "auto_keeps"])
def test_train_py_reports_an_oom_in_one_line_and_keeps_its_checkpoints(tmp_path, keep):
    """A worker whose step 3 runs out of memory (raised by a patched train step, in a forked
    worker that inherits the patch) ends train.py with exit 2 and the one line; the step-2
    checkpoint stays the latest and whole. Where the auto rule keeps the logits (patched as on a
    GPU), the run says so at the start and the line names them first."""
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        import framework.training.loop as loop
        real = loop.Trainer.train_step
        def train_step(self, iterators, step):
            if step == 3:
                raise torch.OutOfMemoryError({TORCH_OOM!r})
            return real(self, iterators, step)
        loop.Trainer.train_step = train_step
        if {keep!r}:  # the auto rule as on a GPU where the logits are small
            import framework.fast.fused_ce as fused_ce
            fused_ce.keep_logits_auto = lambda *a, **k: True
        sys.argv = [{TRAIN!r}] + sys.argv[1:]
        import runpy
        runpy.run_path({TRAIN!r}, run_name="__main__")
    """)
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, FW_WORKER_START_METHOD="fork")
    r = run("-c", code, *FAST, "train.max_steps=5", "checkpoint.save_interval=2",
            f"checkpoint.dir={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env,
            timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: out of memory")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: out of memory at step 3 on rank 0 (CUDA out of memory. "
                               "Tried to allocate 7.83 GiB.")
    assert "parallel.recompute_granularity=selective" in lines[0]
    note = "note: the output layer keeps each micro-batch's logits for its backward"
    if keep:
        assert note in r.stdout, r.stdout[-3000:]
        assert lines[0].split("to fit, try: ")[1].startswith(
            "model.fused_ce_keep_logits=false (the output layer keeps 0.0 GiB of logits per "
            "micro-batch, chosen by the auto rule)")
    else:
        assert note not in r.stdout and "fused_ce_keep_logits" not in lines[0]
    assert "Traceback" not in r.stderr
    from framework import checkpoint as ck

    assert ck.latest_iteration(str(ckpt)) == 2
