"""What a new user meets on a first run (issue 22), through the real `train.py` / `generate.py`:

1. a run with nothing to train says so (and how to go on), and both ways on work;
3. every error a CPU user can hit names a remedy, and following the remedies gets a run;
4. generate.py does not warn about its own defaults; the default job learns (slow test);
6. the output is quiet, rates are labelled per device, train.log holds the console lines, the run
   ends with a summary, and the data tools answer `--help` quickly with defaults and help texts.
(2 and 5, Hydra's own errors and the test-suite time, are covered elsewhere.)

One tiny run is trained once per module and copied where a test changes it.

Processes start through tests/helpers.py. Where a test reads everything a process prints (the
module's run, the resumed "train longer" run, generate.py's defaults, the first error of each
chain of remedies) it is a fresh interpreter, so that import-time output would show; elsewhere
it is forked from the warm server.
"""
import os
import re
import shlex
import shutil

import pytest

from helpers import GENERATE, ROOT, run, run_train
# what the module's run uses; the batch sizes name its checkpoint directory
FAST = ["train.progress_bar=false", "train.micro_batch_size=8", "train.global_batch_size=16",
        "train.eval_iters=2", "train.log_interval=2", "train.eval_interval=2",
        "checkpoint.save_interval=2", "train.max_steps=4"]
CKPT_NAME = "train.global_batch_size=16,train.micro_batch_size=8"
NOISE = ("Megatron-FSDP", "GPTDatasetConfig(", "Warning", "warnings.warn", "[INFO]")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONWARNINGS")}
    env.update(extra)
    return env


def _generate(cwd, args, expect=0, fresh=False):
    r = run(GENERATE, *args, cwd=cwd, timeout=900, env=_env(), fresh=fresh)
    if expect is not None:
        assert r.returncode == expect, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r


def _train(cwd, args, expect=0, run_dir="run", fresh=False):
    return run_train(*args, cwd=cwd, name=run_dir, fast=False, expect=expect, env=_env(),
                     timeout=900, fresh=fresh)


def _set(args, overrides):
    """`args` with each `key=value` of `overrides` replacing the same key (a new key appended)."""
    out = list(args)
    for o in overrides:
        key = o.split("=", 1)[0]
        out = [a for a in out if a.split("=", 1)[0] != key] + [o]
    return out


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def _remedies(line):
    """`python train.py ...` commands of a nothing-to-train line: (train longer, start fresh)."""
    m = re.search(r"to train longer: python train\.py (.*?) ; to start a fresh run: "
                  r"python train\.py (.*)$", line)
    assert m, line
    return shlex.split(m.group(1)), shlex.split(m.group(2))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """`python train.py <FAST>` as a user would run it (default checkpoint naming)."""
    cwd = tmp_path_factory.mktemp("first")
    r = _train(cwd, FAST, fresh=True)  # its whole output is checked below
    return cwd, r


def _copy(first, tmp_path):
    shutil.copytree(first[0] / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


# --------------------------------------------------------------------------------------------
# 1. never silent
# --------------------------------------------------------------------------------------------
def test_rerun_of_a_finished_run_says_so_and_exits_0(first, tmp_path):
    cwd = _copy(first, tmp_path)
    r = _train(cwd, FAST, expect=0)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(f"nothing to train: the checkpoint checkpoints/{CKPT_NAME}/"
                               f"iter_0000004 (step 4) is already at train.max_steps=4; "), lines
    longer, fresh = _remedies(lines[0])
    assert "train.max_steps=8" in longer and any(a.startswith("checkpoint.dir=") for a in fresh)
    assert "resumed" not in r.stdout and "iter " not in r.stdout
    assert "nothing to train" in open(cwd / "run" / "train.log").read()


def test_fewer_steps_than_the_checkpoint_is_one_error_and_both_ways_on_work(first, tmp_path):
    """The issue's `logging=tensorboard train.max_steps=30` against a longer checkpoint."""
    cwd = _copy(first, tmp_path)
    r = _train(cwd, [*FAST, "logging=tensorboard", "train.max_steps=2"], expect=2)
    line = _one_error_line(r)
    assert line.startswith(f"error: the checkpoint checkpoints/{CKPT_NAME}/iter_0000004 (step 4) "
                           f"is past train.max_steps=2: nothing to train; "), line
    longer, fresh = _remedies(line)

    # train longer: the same checkpoint directory goes on from step 4, logged to TensorBoard
    r = _train(cwd, longer, run_dir="longer", fresh=True)
    for noise in NOISE:  # loading a checkpoint is quiet too
        assert noise not in r.stdout + r.stderr, (noise, r.stdout[-3000:] + r.stderr[-3000:])
    assert f"resumed from {cwd}/checkpoints/{CKPT_NAME}/iter_0000004 (step 4" in r.stdout
    assert "note: the learning-rate schedule is the checkpoint's: it decays over 4 steps" \
        in r.stdout
    assert re.findall(r"^iter +(\d+)/8", r.stdout, re.M) == ["6", "8"]
    assert os.listdir(cwd / "checkpoints") == [CKPT_NAME]
    assert (cwd / "checkpoints" / CKPT_NAME / "latest_checkpointed_iteration.txt").read_text() \
        == "8"
    assert any(f.startswith("events.") for f in os.listdir(cwd / "longer" / "tensorboard"))

    # start fresh: a new directory from step 0
    r = _train(cwd, fresh, run_dir="fresh")
    assert "resumed" not in r.stdout
    assert re.findall(r"^iter +(\d+)/2", r.stdout, re.M) == ["2"]
    new = cwd / "checkpoints" / "fresh-2"  # the name needs no quoting in an override
    assert (new / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_checkpoint_dir_ignores_overrides_that_only_control_the_run():
    from framework.cli import checkpoint_overrides

    assert checkpoint_overrides([]) == ""
    same = ["train.max_steps=3000", "logging=wandb", "logging.wandb_project=p",
            "train.log_interval=5", "train.eval_interval=0", "train.eval_iters=1",
            "train.progress_bar=false", "train.profile.steps=[1,2]", "checkpoint.save_interval=9",
            "checkpoint.keep_last=2", "train.device=cpu", "train.max_minutes=5"]
    assert checkpoint_overrides(same) == ""
    assert checkpoint_overrides(["optimizer.lr=3e-3", "train.max_steps=10", "model=gpt2_small",
                                 "checkpoint.load=ck"]) == \
        "checkpoint.load=ck,model=gpt2_small,optimizer.lr=3e-3"
    # in a sweep, jobs of different lengths get their own directories
    assert checkpoint_overrides(["train.max_steps=10", "logging=wandb"], multirun=True) == \
        "train.max_steps=10"


# --------------------------------------------------------------------------------------------
# 3. CPU guidance: every remedy a message names works (followed here until the run starts)
# --------------------------------------------------------------------------------------------
def _follow(run_script, cwd, args, expected, extra=()):
    """Run; on each one-line error apply the backticked remedy it names; return the messages.
    The first run is a fresh interpreter (nothing but the error line on stderr, imports
    included), the others are forked."""
    seen = []
    for i in range(len(expected) + 1):
        r = run_script(cwd, [*args, *extra], expect=None, fresh=i == 0)
        if r.returncode == 0:
            break
        assert r.returncode == 2, (args, r.stdout[-2000:], r.stderr[-3000:])
        line = _one_error_line(r)
        seen.append(line)
        fix = re.findall(r"`([^`]+)`", line)
        assert fix, line
        args = _set(args, fix[0].split())
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    assert len(seen) == len(expected), seen
    for line, want in zip(seen, expected):
        assert want in line, (want, line)
    return r, args


def test_train_cpu_errors_lead_to_a_run(tmp_path):
    """The README's headline command (TP2 x PP2, gpt2-large) and friends on a CPU machine."""
    r, args = _follow(
        lambda cwd, a, **kw: _train(cwd, a, run_dir="run", **kw), tmp_path,
        ["parallel=tp2_pp2", "model=gpt2_large", "train.bf16=true", "train.device=cuda",
         "model.cudnn_attention=true"],
        ["train.device=cuda but no CUDA device is visible; `train.device=auto`",
         "parallel=tp2_pp2 needs GPUs for pipeline parallelism (parallel.pipeline_model_parallel"
         "_size=2: megatron-core's pipeline schedules are CUDA-only), and this run is on the CPU",
         "train.bf16=true needs a GPU; a CPU run trains in fp32: `train.bf16=false` works here",
         "model.cudnn_attention=true needs a CUDA device"],
        extra=[*FAST, "train.max_steps=1", "checkpoint.save=false", "train.eval_interval=0"])
    assert "parallel=tp2" in args and "model=gpt_tiny" in args
    assert "model.cudnn_attention=null" in args
    assert re.search(r"^iter +1/1", r.stdout, re.M)


@pytest.mark.parametrize("layout,fix", [("guide", "`parallel=tp2`"),
                                        ("dp_distopt", "`parallel=single`"),
                                        ("tp2_sp", "`parallel=tp2`")])
def test_every_gpu_only_layout_names_a_cpu_layout(layout, fix):
    """The same message for the other GPU-only layouts (its remedy is the run above)."""
    from framework.config import Config, ConfigError, ParallelConfig

    presets = {"guide": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                             sequence_parallel=True, use_distributed_optimizer=True),
               "dp_distopt": dict(use_distributed_optimizer=True, overlap_param_gather=True),
               "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}
    cfg = Config(parallel=ParallelConfig(name=layout, **presets[layout]))
    with pytest.raises(ConfigError, match=re.escape(fix) + " works here"):
        cfg.resolve_world(cfg.parallel.model_parallel_size, on_gpu=False)


def test_generate_cpu_errors_lead_to_a_run(first, tmp_path):
    ckpt = first[0] / "checkpoints" / CKPT_NAME
    r, args = _follow(
        _generate, tmp_path, ["parallel=pp2", "bf16=true", "device=cuda"],
        ["device=cuda but no CUDA device is visible; `device=auto`",
         "on a CPU a layout without PP works: `parallel=tp2`",
         "bf16=true needs a GPU; CPU generation runs in fp32: `bf16=false`"],
        extra=[f"load='{ckpt}'", "num_heldout=4"])  # quoted: the name has "=" and ","
    assert "parallel=tp2" in args and "held-out arithmetic accuracy: " in r.stdout


# --------------------------------------------------------------------------------------------
# 4. generate.py's defaults
# --------------------------------------------------------------------------------------------
def test_generate_defaults_print_no_warning(first, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    os.symlink(first[0] / "checkpoints" / CKPT_NAME, tmp_path / "checkpoints" / "default")
    r = _generate(tmp_path, [], fresh=True)  # what the README says to run after train.py
    out = r.stdout + r.stderr
    assert "held-out arithmetic accuracy: " in r.stdout and "/200 = " in r.stdout
    assert "capped" not in out and "cut to" not in out and "arn" not in out, out[-3000:]
    assert r.stderr == "", r.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# 6. quiet, labelled, logged, summarized
# --------------------------------------------------------------------------------------------
def test_output_is_quiet_labelled_logged_and_summarized(first):
    cwd, r = first
    out = r.stdout + r.stderr
    for noise in NOISE:
        assert noise not in out, (noise, out[-3000:])
    iters = [l for l in r.stdout.splitlines() if l.startswith("iter ")]
    assert len(iters) == 2 and all(" tok/s | " in l and "/gpu" not in l and "MFU" not in l
                                   for l in iters), iters
    # train.log in the run dir holds every console line, iteration and eval lines included
    log = open(cwd / "run" / "train.log").read().splitlines()
    assert [l for l in r.stdout.splitlines() if l.strip()] == [l for l in log if l.strip()]
    assert sum(l.startswith("eval at iter") for l in log) == 2
    # the summary: losses, where things are, how to continue
    tail = r.stdout.strip().splitlines()[-5:]
    assert re.match(r"done: step 4/4 \| loss \d+\.\d+ \(step 4\) \| eval loss \d+\.\d+ "
                    r"\(step 4\)$", tail[0]), tail
    assert tail[1].strip() == "metrics:     run/metrics.jsonl"
    assert tail[2].strip() == "log:         run/train.log"
    assert tail[3].strip() == f"checkpoint:  checkpoints/{CKPT_NAME}/iter_0000004"
    assert tail[4].strip() == "train longer: python train.py " + " ".join(
        a for a in FAST if not a.startswith("train.max_steps")) + " train.max_steps=8"


def test_data_tools_help_is_fast_with_defaults_and_texts():
    # --help imports neither megatron-core nor transformers (it answered in 5.5 s before)
    code = ("import sys, data_tools.preprocess, data_tools.convert; "
            "print(sorted(m for m in ('megatron', 'transformers', 'torch') if m in sys.modules))")
    r = run("-c", code, timeout=300, env=_env(), fresh=True)  # fresh: nothing imported yet
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = run("-m", "data_tools.preprocess", "--help", timeout=300, env=_env(), fresh=True)
    assert r.returncode == 0 and "(default: ['text'])" in r.stdout and "(default: 1)" in r.stdout
    assert "(default: None)" not in r.stdout

    from data_tools.convert import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.option_strings)


def test_readme_paths_match_the_run_and_sweep_dirs():
    from framework.cli import _run_dir

    readme = open(os.path.join(ROOT, "README.md")).read()
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", _run_dir("multirun"))
    assert "`multirun/<date>/<time>/<job number>/`" in readme
    assert "`outputs/<date>/<time>/`" in readme


def test_ci_runs_the_readme_set_up_then_the_slow_tier():
    """.ci/run runs the README's two set-up commands as written, then the slow tier."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2 and "pytest" in commands[1], commands
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))
          if line.strip() and not line.startswith("#")]
    at = ci.index(commands[0])
    assert ci[at + 1] == commands[1], ci
    assert 'python -m pytest -q -m "slow and not gpu"' in ci[at + 2:], ci


# --------------------------------------------------------------------------------------------
# 4. the default job learns (the README's numbers)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_job_learns_arithmetic(tmp_path):
    """`python train.py` then `python generate.py`, exactly as the README says."""
    r = _train(tmp_path, ["train.progress_bar=false"], run_dir=None)
    assert "done: step" in r.stdout
    r = _generate(tmp_path, [])
    m = re.search(r"held-out arithmetic accuracy: (\d+)/200", r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) >= MIN_HELDOUT_CORRECT, r.stdout


# of 200: the default run scored 187 (README); the issue asks for at least 100 (50%)
MIN_HELDOUT_CORRECT = 140


def test_gpu_only_switches_on_a_cpu_run_are_named_not_ignored(tmp_path):
    """model.torch_compile / cuda_graph / bias_activation_fusion / swiglu_kernel=true choose GPU
    kernels only; a CPU run asked for them says in one line that it goes without, and trains."""
    r = run_train("model.torch_compile=true", "model.cuda_graph=true", "model.activation=swiglu",
                  "model.bias_activation_fusion=true", "model.add_bias_linear=false",
                  "model.swiglu_kernel=true", "train.max_steps=1",
                  "train.eval_interval=0", "checkpoint.save=false", cwd=tmp_path)
    notes = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("note: model.")]
    assert notes == ["note: model.torch_compile=true, model.cuda_graph=true, "
                     "model.bias_activation_fusion=true, model.swiglu_kernel=true: GPU-only, so "
                     "this CPU run goes without "
                     "(the same model and loss; only the kernels differ)"], r.stdout + r.stderr
    plain = run_train("train.max_steps=1", "train.eval_interval=0", "checkpoint.save=false",
                      cwd=tmp_path, name="plain")
    assert "GPU-only" not in plain.stdout + plain.stderr
    # options of the flex ALiBi kernel (a GPU kernel) are named too
    flex = run_train("model.position_embedding_type=alibi",
                     "model.flex_kernel_options={BLOCK_M:64}", "train.max_steps=1",
                     "train.eval_interval=0", "checkpoint.save=false", cwd=tmp_path, name="flex")
    assert "note: model.flex_kernel_options: GPU-only" in flex.stdout + flex.stderr
    # page-locked batches (for copies to a GPU) too
    pinned = run_train("data.pin_memory=true", "train.max_steps=1", "train.eval_interval=0",
                       "checkpoint.save=false", cwd=tmp_path, name="pinned")
    assert "note: data.pin_memory=true: page-locked batches speed up copies to a GPU, so this " \
        "CPU run goes without" in pinned.stdout + pinned.stderr
