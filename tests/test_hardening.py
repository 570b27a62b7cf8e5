"""Issue 27 (input and config half) and issue 22 item 2: each finding reproduced, with the new
behaviour asserted. Bad input gives one `error:` line naming the field or file, exit 2, before
any model is built; nothing hangs; secrets never reach a tracker."""
from __future__ import annotations

import gzip
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from framework.cli import register_resolvers
from framework.config import ConfigError, register_configs

ROOT = Path(__file__).resolve().parents[1]
from helpers import config_error, load_config, run, run_train  # noqa: E402

register_configs()
register_resolvers()


load = load_config


def _script(name, *args, cwd, env=None, timeout=300, fresh=False):
    """`python <name> *args` (train.py through helpers.run_train); exit code not checked."""
    full = dict(os.environ, **(env or {}))
    if name == "train.py":
        return run_train(*args, cwd=cwd, name=None, fast=False, expect=None, env=full,
                         timeout=timeout, fresh=fresh)
    return run(str(ROOT / name), *args, cwd=cwd, env=full, timeout=timeout, fresh=fresh)


def _one_error_line(r) -> str:
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1, r.stderr[-2000:]
    return errors[0]


# --------------------------------------------------------------------------------------------
# 1. numeric fields: finite, in range, 0 never taken as "unset"
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,field", [
    ("optimizer.lr=inf", "optimizer.lr"),  # finding: trained, skipped every step, saved
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.min_lr=-inf", "optimizer.min_lr"),
    ("optimizer.adam_beta1=1.0", "optimizer.adam_beta1"),
    ("optimizer.adam_beta2=-0.1", "optimizer.adam_beta2"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("optimizer.clip_grad=inf", "optimizer.clip_grad"),
    ("optimizer.sgd_momentum=1.5", "optimizer.sgd_momentum"),
    ("optimizer.lr_decay_steps=0", "optimizer.lr_decay_steps"),
    ("optimizer.initial_loss_scale=inf", "optimizer.initial_loss_scale"),
    ("model.init_method_std=0", "model.init_method_std"),
    ("model.init_method_std=nan", "model.init_method_std"),
    ("model.hidden_dropout=1.0", "model.hidden_dropout"),
    ("model.attention_dropout=-0.1", "model.attention_dropout"),
    ("model.layernorm_epsilon=0", "model.layernorm_epsilon"),
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size"),  # finding: taken as unset
    ("model.vocab_size=0", "model.vocab_size"),  # finding: taken as unset
    ("model.kv_channels=0", "model.kv_channels"),
    ("model.max_position_embeddings=0", "model.max_position_embeddings"),
    ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by"),
    ("model.hidden_size=3000000000", "model.hidden_size"),
    ("model.softmax_scale=inf", "model.softmax_scale"),
    ("train.max_steps=1000000001", "train.max_steps"),  # finding: no upper bound
    ("train.seed=-1", "train.seed"),
    ("train.max_minutes=inf", "train.max_minutes"),
    ("train.profile.steps=[5,2]", "train.profile.steps"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes"),
    ("parallel.recompute_num_layers=0", "parallel.recompute_num_layers"),
    ("data.num_documents=0", "data.num_documents"),
    ("data.masking_probability=nan", "data.masking_probability"),
    ("logging.wandb_mode=sometimes", "logging.wandb_mode"),
])
def test_numeric_and_choice_fields_refused_naming_the_field(override, field):
    assert field in config_error(override)


def test_null_still_means_unset():
    cfg = load("model.ffn_hidden_size=null", "model.vocab_size=null", "model.kv_channels=null")
    assert cfg.model.ffn == 4 * cfg.model.hidden_size and cfg.model.vocab_size is None


def test_lr_inf_train_py_refuses_before_training(tmp_path):
    r = _script("train.py", "optimizer.lr=inf", "train.max_steps=2", cwd=tmp_path)
    assert "optimizer.lr=inf" in _one_error_line(r)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# 2. preflight: output directories, locks, model settings, index memory
# --------------------------------------------------------------------------------------------
def _prepared(tmp_path, *overrides):
    """framework.plan.make_plan on a composed config (the checks train.py runs before launch);
    returns the world size."""
    from framework.plan import make_plan as prepare

    cfg = load(f"checkpoint.dir={tmp_path}/ckpt", *overrides)
    cfg.run_dir = str(tmp_path / "run")
    return prepare(cfg).world_size


def test_unwritable_checkpoint_dir_is_found_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(f"checkpoint.dir={tmp_path}/file/ckpt", "is not a directory"),
             ("checkpoint.dir=/proc/fw-test/ckpt", "cannot be created in /proc")]
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    cases.append((f"checkpoint.dir={tmp_path}/dangling/ckpt", "symbolic link"))
    # an empty path (the current directory to os.path) and a name too long for the filesystem
    # failed only at the first save, after the training
    cases += [("checkpoint.dir=''", "is empty: name a directory"),
              (f"checkpoint.dir={tmp_path}/{'x' * 300}/ck", "is 300 bytes long; this filesystem "
                                                           "takes at most")]
    for override, why in cases:
        with pytest.raises(ConfigError) as e:
            _prepared(tmp_path, override)
        assert str(e.value).startswith("checkpoint.dir=") and why in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]  # the probes left nothing


def test_unwritable_cache_dir_is_one_line_not_a_hang(tmp_path):
    from framework.data.embedded import prepare_embedded

    with pytest.raises(ConfigError, match="data.path_to_cache=/proc"):
        _prepared(tmp_path, "data.path_to_cache=/proc")
    # the hang itself: filelock retried for ever on a lock file it could not create
    start = time.monotonic()
    with pytest.raises(ConfigError, match="cannot take the file lock /proc/"):
        prepare_embedded("/proc", 10)
    assert time.monotonic() - start < 30


def test_file_lock_held_elsewhere_is_waited_for_then_given_up(tmp_path, capsys):
    from filelock import FileLock

    from framework.locking import file_lock

    path = str(tmp_path / "x.lock")
    holder = FileLock(path)
    holder.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match="gave up"):
            with file_lock(path, "a test", poll_s=0.2, wait_s=1.0):
                pass
        assert time.monotonic() - start < 10
        assert "waiting for" in capsys.readouterr().out
    finally:
        holder.release()
    with file_lock(path, "a test", poll_s=0.2):  # free again: taken at once
        pass


def test_preflight_model_checks(tmp_path):
    with pytest.raises(ConfigError, match="GiB"):
        _prepared(tmp_path, "model.hidden_size=1048576", "model.num_attention_heads=16")
    with pytest.raises(ConfigError, match="model.vocab_size=5 is smaller"):
        _prepared(tmp_path, "model.vocab_size=5")
    with pytest.raises(ConfigError, match="worker processes"):
        _prepared(tmp_path, "parallel.tensor_model_parallel_size=64",
                  "model.num_attention_heads=64", "model.hidden_size=128")
    assert _prepared(tmp_path) == 1
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "run").exists()


def test_absurd_max_steps_refused_before_indexing():
    """The indices for max_steps x global_batch_size samples are refused when they cannot fit
    in memory, instead of stalling in mcore's index building."""
    from framework.config import DataConfig
    from framework.data import build_datasets
    from framework.tokenizer import embedded_tokenizer

    with pytest.raises(ConfigError, match="train.max_steps"):
        build_datasets(DataConfig(type="mock"), embedded_tokenizer(), seq_length=64, seed=1,
                       num_samples=(10**9 * 32, 0, 0), cache_dir=None)


# --------------------------------------------------------------------------------------------
# 3. secrets masked by value in every tracker
# --------------------------------------------------------------------------------------------
SECRET = "s3cr3t-Value-4242"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("wandb")
    d = tmp_path_factory.mktemp("tracked")
    r = _script("train.py", "train.max_steps=2", "train.log_interval=1", "train.eval_interval=0",
                "train.progress_bar=false", "train.device=cpu", "logging.wandb=true",
                "logging.tensorboard=true", "logging.wandb_name=${oc.env:MY_API_TOKEN}",
                "logging.wandb_tags=['run-${oc.env:MY_API_TOKEN}',plain]",
                "logging.wandb_notes='notes ${oc.env:MY_API_TOKEN}'",
                f"hydra.run.dir={d}/run", f"checkpoint.dir={d}/ckpt", cwd=d,
                env={"MY_API_TOKEN": SECRET, "WANDB_MODE": "offline",
                     "WANDB_NOTES": f"env {SECRET}"}, timeout=900)
    return d, r


@pytest.mark.slow
def test_secret_run_name_tags_notes_never_written(tracked_run):
    d, r = tracked_run
    assert r.returncode == 0, r.stderr[-3000:]
    found, wandb_files = [], []
    for path in Path(d).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if SECRET.encode() in data or SECRET.encode("utf-16-le") in data:
                found.append(str(path))
            if path.suffix == ".wandb":
                wandb_files.append(data)
    assert not found, found
    assert wandb_files and any(b"***" in w for w in wandb_files)  # the name was masked, not lost
    events = list(Path(d).rglob("events.out.tfevents*"))
    assert events and any(b"optimizer" in e.read_bytes() for e in events)  # config text in TB


# --------------------------------------------------------------------------------------------
# 4. data_tools.preprocess: empty and malformed inputs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from framework.tokenizer import embedded_tokenizer

    d = tmp_path_factory.mktemp("tok")
    embedded_tokenizer().save(str(d))
    return str(d)


def _preprocess(capsys, inputs, out, tok, *extra):
    from data_tools.preprocess import main

    code = main(["--input", *map(str, inputs), "--tokenizer", tok, "--output-prefix", str(out),
                 *extra])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("eod", [[], ["--append-eod"]])
def test_preprocess_input_without_text_is_an_error(tmp_path, tok_dir, capsys, eod):
    """Finding: no documents, or only empty ones, wrote an empty dataset with exit 0."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "1+1=2"}\n')
    cases = {"none.jsonl": "", "empty.jsonl": '{"text": ""}\n{"text": ""}\n',
             "blank.jsonl": '{"text": "  "}\n\n', "gz.jsonl.gz": None}
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(gzip.compress(b""))
        else:
            path.write_text(content)
        for inputs in ([path], [good, path]):
            code, err = _preprocess(capsys, inputs, tmp_path / "out" / "c", tok_dir, *eod)
            assert code == 2 and f"{path}: no text" in err and "\n" not in err, err
            assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


MALFORMED = {
    "badjson.jsonl": (b'{"text": "1"}\n{"text": \n', ":2: not valid JSON"),
    "nokey.jsonl": (b'{"text": "1"}\n{"body": "x"}\n', ":2: no key 'text'"),
    "nonstring.jsonl": (b'{"text": ["1"]}\n', ":1: 'text' is a list"),
    "deep.jsonl": (b'{"text": "1", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}\n",
                   ":1: not valid JSON (nested too deeply)"),
    "bigint.jsonl": (b'{"text": "1", "n": ' + b"9" * 5000 + b"}\n", ":1: not valid JSON (an integer"),
    "utf8.jsonl": (b'{"text": "1"}\n{"text": "\xc3\x28"}\n', ":2: not valid UTF-8"),
    "utf16.jsonl": ('{"text": "1+1=2"}\n'.encode("utf-16"), ":1: not valid UTF-8 (byte 0xff"),
    "surrogate.jsonl": (b'{"text": "1"}\n{"text": "a\\udc00"}\n', ":2: 'text' holds a lone"),
    "huge.jsonl": (b'{"text": "1"}\n{"text": "' + b"1" * 300000 + b'"}\n', ":2: line longer"),
    "notgzip.jsonl.gz": (b'{"text": "1"}\n', ": not a valid gzip file"),
    "trunc.jsonl.gz": (gzip.compress(b"".join(b'{"text": "%d+%d=%d"}\n' % (i, i, 2 * i)
                                              for i in range(3000)))[:-40], ": truncated gzip"),
}


def test_preprocess_malformed_inputs_one_line_each(tmp_path, tok_dir, capsys):
    for name, (data, needle) in MALFORMED.items():
        path = tmp_path / name
        path.write_bytes(data)
        for workers in ("1", "2"):
            code, err = _preprocess(capsys, [path], tmp_path / "out" / "c", tok_dir,
                                    "--max-line-bytes", "200000", "--workers", workers)
            assert code == 2 and err.startswith("error: ") and "\n" not in err, (name, err)
            assert f"{path}{needle}" in err, (name, err)
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_preprocess_output_prefix_that_cannot_be_created(tmp_path, tok_dir, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "1+1=2"}\n')
    (tmp_path / "file").write_text("x")
    for prefix in (tmp_path / "file" / "c", Path("/proc/fw-test/c"), str(tmp_path) + "/"):
        code, err = _preprocess(capsys, [good], prefix, tok_dir)
        assert code == 2 and "--output-prefix" in err and "\n" not in err, err


# --------------------------------------------------------------------------------------------
# 5. Hydra's own errors: one line, exit 2 (issue 22 item 2); sweeps
# --------------------------------------------------------------------------------------------
HYDRA_CASES = [
    ("train.py", ["model=gpt3"], ["model=gpt3", "gpt_tiny", "gpt2_small"], ["model_schema"]),
    ("train.py", ["train.max_step=10"], ["did you mean train.max_steps?"], ["+train"]),
    ("train.py", ["optimizer.lr=abc"], ["optimizer.lr=abc", "not a number"], []),
    ("train.py", ["model=model_schema"], ["is the schema"], []),
    ("train.py", ["train.max_steps=["], ["cannot parse"], []),
    # a whole section removed ran the schema's defaults (300 steps, where 2 were asked for);
    # run_dir=... was ignored (Hydra's run dir is used)
    ("train.py", ["~train"], ["~train removes the whole train section"], []),
    ("train.py", ["~train", "train.max_steps=2"], ["none of its fields can be set after it"],
     ["did you mean"]),
    ("train.py", ["run_dir=/tmp/x"], ["set it with hydra.run.dir=<dir>"], []),
    # the data indices' memory names the setting at fault (a huge eval_iters blamed max_steps)
    # (checkpoint.save=false: the cases run two at a time, and both would name the default
    # checkpoint directory, whose run lock the other may hold)
    ("train.py", ["train.eval_interval=1", "train.eval_iters=200000000", "train.max_steps=2",
                  "checkpoint.save=false"],
     ["held-out samples (train.eval_iters x train.global_batch_size)",
      "lower train.eval_iters"], ["max_steps"]),
    ("train.py", ["train.max_steps=900000000", "train.eval_interval=0", "checkpoint.save=false"],
     ["training samples (train.max_steps x", "lower train.max_steps"], []),
    ("generate.py", ["parallel=gpt3"], ["parallel=gpt3", "tp2"], ["parallel_schema"]),
    ("generate.py", ["max_new_token=3"], ["did you mean max_new_tokens?"], []),
]


def test_hydra_errors_are_one_line_exit_2(tmp_path):
    def go(case):  # fresh interpreters: stderr must be the one line, imports included
        script, args, _, _ = case
        return _script(script, *args, "hydra.run.dir=" + str(tmp_path / "r"), cwd=tmp_path,
                       fresh=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(go, HYDRA_CASES))
    for (script, args, want, never), r in zip(HYDRA_CASES, results):
        line = _one_error_line(r)
        assert r.stderr.strip() == line, (args, r.stderr)
        for w in want:
            assert w in line, (args, line)
        for n in never:
            assert n not in line, (args, line)
    full = _script("train.py", "model=gpt3", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"},
                   fresh=True)
    assert full.returncode != 0 and "Traceback" in full.stderr and "model_schema" in full.stderr


def test_sweep_records_failed_jobs_and_goes_on(tmp_path):
    # what only the job can find (files: here a checkpoint to load that is not there) fails
    # that job when it starts; the next job still runs
    r = _script("train.py", "-m", f"checkpoint.load={tmp_path}/nope0,{tmp_path}/nope1",
                f"hydra.sweep.dir={tmp_path}/sw", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]  # every job ran; the sweep says it failed
    for job in ("0", "1"):
        status = json.loads((tmp_path / "sw" / job / "job_status.json").read_text())
        assert status["status"] == "failed" and f"nope{job}" in status["error"], status
    assert "2 of 2 jobs did not complete" in r.stderr
    # a value our config checks refuse (not finite): refused before any job runs, in one line
    r = _script("train.py", "-m", "optimizer.lr=inf,nan", f"hydra.sweep.dir={tmp_path}/sw3",
                cwd=tmp_path)
    assert "job 0 (optimizer.lr=inf) of this sweep: optimizer.lr" in _one_error_line(r)
    assert not (tmp_path / "sw3").exists()
    # a value Hydra cannot compose: refused before any job runs, in one line
    r = _script("train.py", "-m", "optimizer.lr=1e-3,abc", f"hydra.sweep.dir={tmp_path}/sw2",
                cwd=tmp_path)
    assert "optimizer.lr=abc" in _one_error_line(r)
    assert not (tmp_path / "sw2" / "0").exists()



def test_preflight_cpu_bound_counts_the_optimizer_moments(monkeypatch):
    """On a CPU the bound holds torch's Adam moments (in the weights' dtype) as well as weights
    and gradients: gpt2-xl in fp32 needs 16 bytes a parameter (23.5 GiB at micro-batch 1), so a
    20 GiB host refuses it in one line naming the optimizer state; the weights and gradients
    alone fit, and the run was OOM-killed with no message."""
    from framework import preflight
    from framework.cli import register_resolvers
    from framework.config import register_configs
    from helpers import load_config

    register_configs()
    register_resolvers()
    cfg = load_config("model=gpt2_xl", "train.micro_batch_size=1", "train.global_batch_size=1",
                      "parallel.data_parallel_size=1", "train.device=cpu")
    vocab = cfg.model.vocab_size
    need, params = preflight.min_memory_bytes(cfg, vocab, half=False, on_gpu=False)
    acts = cfg.model.seq_length * cfg.model.hidden_size * cfg.model.num_layers * 4
    assert need - acts == pytest.approx(params * 16)
    seed = load_config("model=gpt2_xl", "train.max_steps=0", "train.device=cpu")
    assert preflight.min_memory_bytes(seed, vocab, False, False)[0] == pytest.approx(params * 8)
    monkeypatch.setattr(preflight, "device_memory_bytes", lambda device, world: (
        20 * 2**30, "of host memory per worker (20 GiB / 1)"))
    with pytest.raises(ConfigError, match=r"needs at least 2\d\.\d GiB per rank .*weights, "
                                          r"gradients and optimizer state.*20\.0 GiB of host"):
        preflight.check_model(cfg, vocab, "cpu")


def test_preflight_gpu_bound_counts_fp32_grads_and_optimizer_state(monkeypatch):
    """On a GPU the lower bound holds megatron-core's fp32 gradient buffer and its optimizer's
    fp32 state (main params + Adam moments: 18 bytes a parameter in bf16, the state split over
    DP with the distributed optimizer), so Llama-3.1-8B on one 80 GB card is refused before any
    GPU work instead of running out of memory at its first step."""
    from framework import preflight
    from framework.cli import register_resolvers
    from framework.config import register_configs
    from helpers import load_config

    register_configs()
    register_resolvers()
    cfg = load_config("model=llama3_1_8b", "train.micro_batch_size=1",
                      "train.global_batch_size=1", "parallel.data_parallel_size=1")
    vocab = cfg.model.vocab_size
    cpu, params = preflight.min_memory_bytes(cfg, vocab, half=True, on_gpu=False)
    gpu, _ = preflight.min_memory_bytes(cfg, vocab, half=True, on_gpu=True)
    assert 7.9e9 < params < 8.1e9  # Llama-3.1-8B's 8.03B
    acts = cfg.model.seq_length * cfg.model.hidden_size * cfg.model.num_layers * 2
    assert gpu - acts == pytest.approx(params * 18)
    assert cpu - acts == pytest.approx(params * 8)  # weights, grads, Adam's moments: bf16
    sgd = load_config("model=llama3_1_8b", "optimizer.optimizer=sgd", "train.micro_batch_size=1",
                      "train.global_batch_size=1")
    assert preflight.min_memory_bytes(sgd, vocab, True, True)[0] - acts == \
        pytest.approx(params * 14)  # 2 + 4 + fp32 main params 4 + momentum 4
    cfg.parallel.use_distributed_optimizer = True
    cfg.parallel.data_parallel_size = 8
    assert preflight.min_memory_bytes(cfg, vocab, True, True)[0] - acts == \
        pytest.approx(params * (6 + 12 / 8))
    cfg.parallel.use_distributed_optimizer = False
    cfg.parallel.data_parallel_size = 1
    seed = load_config("model=llama3_1_8b", "train.max_steps=0")  # a seed checkpoint: no step
    assert preflight.min_memory_bytes(seed, vocab, True, True)[0] == pytest.approx(params * 10)
    monkeypatch.setattr(preflight, "device_memory_bytes", lambda device, world: (80 * 2**30,
                                                                                 "of H100"))
    with pytest.raises(ConfigError, match=r"the model needs at least 1\d\d\.\d GiB per rank .*"
                                          r"optimizer state.*more than the 80\.0 GiB of H100.*"
                                          r"use_distributed_optimizer=true"):
        preflight.check_model(cfg, vocab, "cuda")
    preflight.check_model(seed, vocab, "cuda")  # 10 bytes a parameter: 75 GiB
    # the same model fits the bound on a 141 GB card only with the state sharded over 8 ranks
    monkeypatch.setattr(preflight, "device_memory_bytes", lambda device, world: (141 * 10**9,
                                                                                 "of H200"))
    cfg.parallel.use_distributed_optimizer = True
    cfg.parallel.data_parallel_size = 8
    preflight.check_model(cfg, vocab, "cuda")


def test_a_comma_in_a_single_runs_value_names_the_three_remedies():
    """`train.py data.split=98,2,0` (no -m): Hydra's error puts its remedies on the lines after
    the first; the one line names them with the user's own key and value."""
    from hydra.errors import ConfigCompositionException

    from framework.cli import hydra_error_line
    from framework.config import Config

    ex = ConfigCompositionException(
        "Ambiguous value for argument 'data.split=98,2,0'\n1. To use it as a list, use "
        "key=[value1,value2]\n2. To use it as string, quote the value: key=\\'value1,value2\\'\n"
        "3. To sweep over it, add --multirun to your command line")
    assert hydra_error_line(ex, Config) == (
        "data.split=98,2,0: a comma makes a value a sweep; quote it for a string "
        "(data.split='98,2,0'), bracket it for a list (data.split=[98,2,0]), or pass -m to sweep "
        "over it")
