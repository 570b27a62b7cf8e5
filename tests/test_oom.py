"""Out of GPU memory in training: one line with torch's figures, the step and phase, and this
run's levers, each of which the config accepts (framework/training/oom.py); the checkpoints
already written intact; with several ranks, the line printed once by the failing rank and the
run ended promptly; generate.py's batches likewise."""
import os
import time

import pytest
import torch

from framework.cli import register_resolvers
from framework.config import register_configs
from framework.errors import ConfigError
from framework.training.oom import (is_oom, kept_logits_bytes, lever_text, levers, oom_error,
                                    torch_figures)
from tests.helpers import load_config, run_train
from tests.oom_step import TORCH_OOM

register_configs()
register_resolvers()
CPU = torch.device("cpu")
OOM_STEP = ["train.step._target_=tests.oom_step.OomAt", "+train.step._allowed_prefixes_=[tests.]"]


def test_torch_figures_keep_the_sizes_on_one_line():
    got = torch_figures(torch.OutOfMemoryError(TORCH_OOM))
    assert got.startswith("CUDA out of memory. Tried to allocate 7.83 GiB.")
    for part in ("3.12 GiB is free", "76.06 GiB memory in use",
                 "4.91 GiB is reserved by PyTorch but unallocated"):
        assert part in got, got
    assert "\n" not in got and "documentation" not in got
    assert torch_figures(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")) \
        .startswith("CUBLAS_STATUS_ALLOC_FAILED")


class _CheckpointException(BaseException):  # torch.distributed.checkpoint's form
    def __init__(self, failures):
        super().__init__("checkpoint failed")
        self.failures = failures


def test_is_oom_finds_it_through_wrappers():
    assert is_oom(torch.OutOfMemoryError(TORCH_OOM))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED calling `cublasCreate`"))
    try:
        try:
            raise torch.OutOfMemoryError(TORCH_OOM)
        except torch.OutOfMemoryError as inner:
            raise ValueError("compile failed") from inner
    except ValueError as wrapped:
        assert is_oom(wrapped)
    assert is_oom(_CheckpointException({1: (torch.OutOfMemoryError(TORCH_OOM), None)}))
    assert not is_oom(_CheckpointException({1: (OSError("disk full"), None)}))
    for other in (RuntimeError("shape mismatch"), KeyboardInterrupt(), SystemExit(2),
                  ValueError("bad")):
        assert not is_oom(other)


def test_kept_logits_bytes_is_what_the_fused_ce_keeps():
    """The bytes computed from the config equal the logits tensor that
    fused_ce.linear_cross_entropy saves for backward (all tokens, the rank's vocab rows, the
    weight's dtype)."""
    from framework.fast.fused_ce import linear_cross_entropy

    cfg = load_config("model=gpt_tiny", "train.micro_batch_size=2", "train.global_batch_size=2",
                      "model.fused_ce_keep_logits=true")
    s, b, vocab, h = cfg.model.seq_length, 2, 512, cfg.model.hidden_size
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(s, b, h, dtype=dtype, requires_grad=True)
        weight = torch.randn(vocab, h, dtype=dtype, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, vocab, (b, s)),
                                    keep_logits=True)
        node = loss.grad_fn  # the custom Function's node, below the reshape views
        while node is not None and not hasattr(node, "saved_tensors"):
            node = node.next_functions[0][0]
        saved = max(t.nbytes for t in node.saved_tensors)  # the logits: the largest
        want = kept_logits_bytes(cfg, vocab, half=dtype != torch.float32, device=CPU,
                                 is_last_stage=True)
        assert want == saved == s * b * vocab * dtype.itemsize


def _cfg(*overrides):
    return load_config("model=gpt_tiny", "train.micro_batch_size=8",
                       "train.global_batch_size=32", *overrides)


def test_the_error_names_step_phase_and_kept_logits_first():
    cfg = _cfg("model.fused_ce_keep_logits=true", "parallel=tp2")
    padded = 50304
    kept = kept_logits_bytes(cfg, padded, half=True, device=CPU, is_last_stage=True)
    assert kept == 8 * cfg.model.seq_length * (padded // 2) * 2
    msg = str(oom_error(torch.OutOfMemoryError(TORCH_OOM), cfg, step=7,
                        phase="forward/backward", rank=1, padded_vocab=padded, half=True,
                        device=CPU, is_last_stage=True, dp_size=1))
    assert "\n" not in msg
    assert msg.startswith("out of memory on rank 1 at step 7 (forward/backward): CUDA out of "
                          "memory. Tried to allocate 7.83 GiB.")
    ways = msg.split("To fit, try: ")[1]
    assert ways.startswith("the environment variable PYTORCH_CUDA_ALLOC_CONF=expandable_"
                           "segments:True")
    assert ("model.fused_ce_keep_logits=false (the output layer keeps 25 MiB of logits per "
            "micro-batch, chosen by model.fused_ce_keep_logits=true)") in ways
    assert ways.index("fused_ce_keep_logits") < ways.index("sequence_parallel=true") \
        < ways.index("recompute_granularity")


def test_eval_and_save_phases_get_their_own_step_and_no_training_levers():
    cfg = _cfg("model.fused_ce_keep_logits=true")
    common = dict(rank=0, padded_vocab=50304, half=True, device=CPU, is_last_stage=True,
                  dp_size=1)
    msg = str(oom_error(torch.OutOfMemoryError(TORCH_OOM), cfg, step=2,
                        phase="evaluation (the number is the eval batch)", done_steps=40,
                        **common))
    assert msg.startswith("out of memory on rank 0 at step 40 (evaluation, eval batch 2): ")
    assert "fused_ce_keep_logits" not in msg and "recompute" not in msg
    assert "train.micro_batch_size=4" in msg
    msg = str(oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB."),
                        cfg, step=40, phase="checkpoint save", **common))
    assert "at step 40 (checkpoint save)" in msg and "recompute" not in msg


# run configs and the levers each must get, every lever's overrides accepted with the run's
BASES = [
    ([], ["parallel.recompute_granularity=selective", "train.micro_batch_size=4"]),
    (["parallel.recompute_granularity=selective", "parallel.recompute_modules=[mlp_act]"],
     ["parallel.recompute_modules=[]"]),
    (["parallel=tp2"], ["parallel.sequence_parallel=true"]),
    (["model.fused_cross_entropy=false"], ["model.fused_cross_entropy=true"]),
    (["model.cuda_graph=true"], ["model.cuda_graph=false"]),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
      "train.micro_batch_size=1", "train.global_batch_size=8"], []),
]


@pytest.mark.parametrize("base,expected", BASES, ids=["default", "selective_mlp_act", "tp2",
                                                      "unfused_ce", "cuda_graph", "full_mb1"])
def test_every_lever_is_accepted_by_the_config(base, expected):
    from framework.models.transformer import transformer_config

    cfg = _cfg(*base)
    ways = levers(cfg, 2**30, dp_size=4)
    text = "; ".join(lever_text(w) for w in ways)
    for e in expected:
        assert e in text, text
    for overrides, why in ways:
        if not overrides:
            continue
        try:
            new = _cfg(*base, *overrides)
            transformer_config(new.model, new.parallel, bf16=True, fp16=False, on_gpu=True)
        except (ConfigError, ValueError, AssertionError) as e:
            raise AssertionError(f"lever {overrides} on {base}: {e}") from None
    if "parallel.recompute_granularity=full" in base:
        assert not any("recompute_granularity" in " ".join(o) for o, _ in ways)


def test_fp8_fused_activation_gets_no_mlp_recompute():
    cfg = _cfg()
    cfg.model.fp8_fused_act = True  # a GPU-only setting: set on the composed config
    text = "; ".join(lever_text(w) for w in levers(cfg, None, 1))
    assert "recompute_modules=[layernorm]" in text
    assert "mlp_act" not in text and "recompute_granularity=full" not in text


def test_train_py_reports_an_oom_in_one_line_and_keeps_its_checkpoints(tmp_path):
    """One rank: step 3's forward raises (micro-batches 5 and 6 make step 3); exit 2, the one
    line, no traceback, and the step-2 checkpoint stays the latest and verifies."""
    from framework.checkpoint.manifest import verify_checkpoint
    from framework import checkpoint as ck

    ckpt = tmp_path / "ckpt"
    r = run_train(*OOM_STEP, "+train.step.at=5", "train.max_steps=5",
                  "checkpoint.save_interval=2", f"checkpoint.dir={ckpt}", cwd=tmp_path,
                  expect=2)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: out of memory")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: out of memory on rank 0 at step 3 (forward/backward): "
                               "CUDA out of memory. Tried to allocate 7.83 GiB.")
    assert "parallel.recompute_granularity=selective" in lines[0]
    assert "fused_ce_keep_logits" not in lines[0]  # the auto rule keeps nothing on a CPU
    assert "Traceback" not in r.stderr
    assert "note: the output layer keeps" not in r.stdout
    assert ck.latest_iteration(str(ckpt)) == 2
    assert verify_checkpoint(ck.iter_dir(str(ckpt), 2), 2, collective=False)


def test_start_note_only_for_the_auto_rule(tmp_path):
    """The auto rule's choice is said at the start; an explicit true is not (the user chose it).
    The auto rule as on a GPU is patched in through a forked in-process run."""
    code = (
        "import sys, runpy\n"
        "import framework.fast.fused_ce as f\n"
        "f.keep_logits_auto = lambda *a, **k: True\n"
        f"sys.argv = [{os.path.join(os.path.dirname(os.path.dirname(__file__)), 'train.py')!r}]"
        " + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    from tests.helpers import FAST, run

    for keep, said in ((None, True), (True, False)):
        extra = [] if keep is None else ["model.fused_ce_keep_logits=true"]
        r = run("-c", code, *FAST, "train.max_steps=1", "checkpoint.save=false", *extra,
                f"hydra.run.dir={tmp_path}/run{keep}", cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        note = "note: the output layer keeps each micro-batch's logits for its backward"
        assert (note in r.stdout) is said, r.stdout[-2000:]


@pytest.mark.slow
def test_one_rank_out_of_memory_ends_a_tp2_run_promptly(tmp_path):
    """TP2 over gloo, spawned workers: rank 1's forward runs out of memory at step 3. Its line is
    printed once, before any teardown that would wait for rank 0; the launcher names rank 1 and
    exit 2, and the run ends well within the watchdog's limit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FW_WORKER_START_METHOD="spawn")
    t0 = time.time()
    r = run_train(*OOM_STEP, "+train.step.at=5", "+train.step.rank=1", "parallel=tp2",
                  "train.max_steps=5", "checkpoint.save=false", "train.watchdog_seconds=300",
                  cwd=tmp_path, expect=None, env=env, timeout=400)
    elapsed = time.time() - t0
    assert r.returncode not in (0, None), r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: out of memory")]
    assert len(lines) == 1 and lines[0].startswith(
        "error: out of memory on rank 1 at step 3 (forward/backward)"), r.stderr[-3000:]
    assert "parallel.sequence_parallel=true" in lines[0]
    assert "worker failed (rank 1, exit 2): stopped on the error printed above" in r.stderr, \
        r.stderr[-3000:]
    assert elapsed < 240, elapsed


def test_generate_py_reports_an_oom_in_one_line(tmp_path):
    """generate.py: a batch that runs out of memory ends with one line naming the batch and the
    levers (batch_size, beams, max_new_tokens, TP), exit 2, no traceback."""
    from tests.helpers import ROOT, run

    ckpt = tmp_path / "ckpt"
    run_train("train.max_steps=1", f"checkpoint.dir={ckpt}", cwd=tmp_path)
    code = (
        "import sys, runpy, torch\n"
        "import framework.inference as inf\n"
        "from tests.oom_step import TORCH_OOM\n"
        "def oom(*a, **k):\n"
        "    raise torch.OutOfMemoryError(TORCH_OOM)\n"
        "inf.generate = oom\n"
        f"sys.argv = [{os.path.join(ROOT, 'generate.py')!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = run("-c", code, f"load={ckpt}", "prompts=[\"12+35=\",\"7+8=\"]", "num_beams=4",
            "max_new_tokens=8", "device=cpu", f"hydra.run.dir={tmp_path}/gen", cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: out of memory")]
    assert len(lines) == 1, r.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: out of memory on rank 0 generating 2 prompts of up to ")
    assert "Tried to allocate 7.83 GiB" in line
    assert "batch_size=1 (this batch: 2 prompts, 8 rows with the beams)" in line
    assert "fewer num_beams (now 4" in line and "max_new_tokens" in line
    assert "Traceback" not in r.stderr


def test_end_after_oom_closes_the_trace_and_marks_the_wandb_run_failed():
    """One rank: the profiler's trace is written and the metrics logger closed with exit code 2
    (W&B's finish(exit_code=2) marks the run failed), then the caller raises the error."""
    from framework.training.metrics import MetricsLogger
    from framework.training.oom import end_after_oom

    calls = []

    class Profiler:
        def finish(self):
            calls.append("trace")

    class Wandb:
        def finish(self, exit_code=0):
            calls.append(("wandb", exit_code))

    class File:
        def close(self):
            calls.append("file")

    logger = MetricsLogger.__new__(MetricsLogger)
    logger.file, logger.wandb, logger.tb = File(), Wandb(), None
    end_after_oom(ConfigError("x"), Profiler(), logger, world_size=1)
    assert calls == ["trace", "file", ("wandb", 2)]
