"""Checkpoint reading is safe and clean in every entry point (issue 27: "one safe loading path",
"a checkpoint is a closed tree", tampered checkpoints; issue 26 item 6: corrupted checkpoint
files refused with one line).

One tiny checkpoint is trained in-process once (module fixture); every case copies it and
tampers with the copy. The entry points run in-process through the same error reporting as the
command line (`report_errors` for train.py and generate.py, `convert.main` for
data_tools.convert): a case passes when it ends in exit 2 with exactly one `error:` line, no
traceback, within the time limit, and a pickled payload never ran. A few real subprocesses check
the exit code end to end.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import signal

import pytest
import torch

from framework.cli import register_resolvers, report_errors
from framework.config import ConfigError, register_configs
from framework.errors import CheckpointError, UnsafeCheckpointError
from helpers import run as run_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IT = "iter_0000001"
TRACKER = "latest_checkpointed_iteration.txt"
# learned positions: the checkpoint also goes through `convert megatron-to-hf` (GPT-2)
TINY = ["model.position_embedding_type=learned_absolute", "model.num_layers=1",
        "model.hidden_size=16", "model.num_attention_heads=2", "model.seq_length=16",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.device=cpu",
        "train.progress_bar=false", "train.eval_interval=0"]
CASE_TIMEOUT_S = 120  # a case still running after this counts as a hang

register_configs()
register_resolvers()


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A committed checkpoint (iteration 1, optimizer state and tokenizer) and the config that
    resumes it (one more step)."""
    from framework.runner import run

    d = tmp_path_factory.mktemp("trained")
    run(_compose(*TINY, "train.max_steps=1", "checkpoint.save_interval=1",
                 f"checkpoint.dir={d}/ck", f"run_dir={d}/run"))
    assert (d / "ck" / IT / "framework.json").is_file()
    # one step past the checkpoint: at its step the run would stop at "nothing to train"
    # without loading it (tracker only), and the loaders would go untested
    resume_cfg = _compose(*TINY, "train.max_steps=2", "checkpoint.save=false",
                          f"checkpoint.dir={d}/unused", f"run_dir={d}/run2")
    return d / "ck", resume_cfg


def _copy(trained, tmp_path):
    """A copy without manifest.json (as a checkpoint written before manifests, or by whoever
    tampered with it and dropped the manifest): the reader's own checks are what is tested here
    (a manifest is no defence against tampering; tests/test_integrity.py covers it)."""
    ck = tmp_path / "ck"
    shutil.copytree(trained[0], ck, symlinks=True)
    path = ck / IT
    os.remove(path / "manifest.json")
    meta = json.loads((path / "framework.json").read_text())
    meta.pop("manifest")
    (path / "framework.json").write_text(json.dumps(meta, indent=1))
    return ck


# --------------------------------------------------------------------------------------------
# entry points, in-process
# --------------------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang()


def _enter(entry, ck, out, resume_cfg, extra=()):
    from data_tools import convert

    if entry == "resume":
        from framework.runner import run

        cfg = copy.deepcopy(resume_cfg)
        cfg.checkpoint.dir = str(ck)
        cfg.checkpoint.allow_symlinks = "allow" in extra
        report_errors(lambda: run(cfg))
        return 0
    if entry == "generate":
        from framework.inference import GenerateConfig, run_generate

        cfg = GenerateConfig(load=str(ck), prompts=["1+1="], max_new_tokens=1, device="cpu",
                             allow_symlinks="allow" in extra)
        report_errors(lambda: run_generate(cfg))
        return 0
    argv = {"megatron-to-hf": ["megatron-to-hf", "--load", ck, "--save", out / "hf"],
            "reshape": ["reshape", "--load", ck, "--save", out / "rs", "--target-tp", 1,
                        "--target-pp", 1],
            "print-structure": ["megatron-to-hf", "--load", ck,
                                "--print-checkpoint-structure"]}[entry]
    return convert.main([str(a) for a in argv] + (["--allow-symlinks"] if "allow" in extra
                                                  else []))


def _teardown_world():
    """What a failed in-process entry may leave: an initialised process group, launch's env."""
    import torch.distributed as dist

    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def run_entry(entry, ck, out, resume_cfg, capfd, extra=()):
    """(outcome, stderr): outcome is 'exit N', 'traceback: ...' or 'hang'."""
    capfd.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        outcome = f"exit {_enter(entry, ck, out, resume_cfg, extra)}"
    except SystemExit as e:
        outcome = f"exit {e.code}"
    except _Hang:
        outcome = "hang"
    except BaseException as e:  # noqa: BLE001 - a traceback is what the test counts
        outcome = f"traceback: {type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        _teardown_world()
    return outcome, capfd.readouterr().err


def one_line_error(outcome, err):
    """The error as the user sees it, or why it is not one clean line."""
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    if outcome != "exit 2":
        return None, outcome
    if "Traceback" in err or len(lines) != 1:
        return None, f"{len(lines)} error lines, traceback={'Traceback' in err}: {err[-800:]}"
    return lines[0], None


# --------------------------------------------------------------------------------------------
# tampering
# --------------------------------------------------------------------------------------------
def _f(ck, name):
    return ck / IT / name


def _truncate(p, frac=0.5):
    with open(p, "r+b") as fh:
        fh.truncate(int(os.path.getsize(p) * frac))


def _overwrite_head(p, n=64):
    with open(p, "r+b") as fh:
        fh.write(bytes((i * 37 + 11) % 256 for i in range(n)))


def _json(ck, fn):
    p = _f(ck, "framework.json")
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


def _dcp_metadata(ck, fn):
    from framework.security.unpickling import _restricted_pickle_load

    with open(_f(ck, ".metadata"), "rb") as fh:
        md = _restricted_pickle_load(fh)
    fn(md)
    with open(_f(ck, ".metadata"), "wb") as fh:
        pickle.dump(md, fh)


def _escape_paths(md):
    for info in md.storage_data.values():
        info.relative_path = "../../outside.distcp"


def _double_vocab(md):
    t = md.state_dict_metadata["embedding.word_embeddings.weight"]
    t.size = torch.Size([t.size[0] * 2, *t.size[1:]])


def _evil_metadata(ck, marker):
    with open(_f(ck, ".metadata"), "wb") as fh:
        pickle.dump(Payload(marker), fh)


def _evil_common(ck, marker):
    sd = torch.load(_f(ck, "common.pt"), weights_only=True)
    sd["scheduler"] = Payload(marker)
    torch.save(sd, _f(ck, "common.pt"))


def _move_out(ck, rel):
    """Move `rel` out of the checkpoint and leave a symlink to it in its place."""
    src = ck / rel
    dst = ck.parent / ("outside-" + rel.replace("/", "-"))
    shutil.move(src, dst)
    os.symlink(dst, src)


def _tracker_elsewhere(ck):
    other = ck.parent / "other-tracker.txt"
    other.write_text("1")
    (ck / TRACKER).unlink()
    os.symlink(other, ck / TRACKER)


def _fifo(p):
    os.remove(p)
    os.mkfifo(p)


# kind -> (tamper(ck, marker), a phrase the one-line error must hold)
TAMPER = {
    "metadata truncated": (lambda ck, m: _truncate(_f(ck, ".metadata")), "truncated"),
    "metadata garbage": (lambda ck, m: _overwrite_head(_f(ck, ".metadata"), 4096),
                         ".metadata"),
    "metadata not DCP metadata": (lambda ck, m: _f(ck, ".metadata").write_bytes(
        pickle.dumps({"a": 1})), "not DCP metadata"),
    "metadata storage path escapes": (lambda ck, m: _dcp_metadata(ck, _escape_paths),
                                      "leaving its directory"),
    "metadata shape != stored pieces": (lambda ck, m: _dcp_metadata(ck, _double_vocab),
                                        "stored pieces hold"),
    "metadata missing": (lambda ck, m: _f(ck, ".metadata").unlink(), ".metadata is missing"),
    "distcp truncated": (lambda ck, m: _truncate(_f(ck, "__0_0.distcp")), "truncated"),
    "distcp header garbage": (lambda ck, m: _overwrite_head(_f(ck, "__0_0.distcp")),
                              "damaged"),
    "distcp missing": (lambda ck, m: _f(ck, "__0_0.distcp").unlink(), "missing"),
    "common.pt truncated": (lambda ck, m: _truncate(_f(ck, "common.pt")), "common.pt"),
    "common.pt garbage": (lambda ck, m: _overwrite_head(_f(ck, "common.pt"), 2048),
                          "common.pt"),
    "common.pt missing": (lambda ck, m: _f(ck, "common.pt").unlink(), "common.pt is missing"),
    "common.pt a FIFO": (lambda ck, m: _fifo(_f(ck, "common.pt")), "FIFO"),
    "framework.json truncated": (lambda ck, m: _truncate(_f(ck, "framework.json")),
                                 "not valid JSON"),
    "framework.json invalid UTF-8": (lambda ck, m: _f(ck, "framework.json").write_bytes(
        b'{"iteration": "\xff\xfe"}'), "not valid JSON"),
    "framework.json not an object": (lambda ck, m: _f(ck, "framework.json").write_text("[1]"),
                                     "not an object"),
    "framework.json deeply nested": (lambda ck, m: _f(ck, "framework.json").write_text(
        '{"config": ' + "[" * 100000 + "]" * 100000 + "}"), "not valid JSON"),
    "framework.json bad model types": (lambda ck, m: _json(
        ck, lambda d: d["config"]["model"].update(num_layers="two")), "config.model"),
    "framework.json train not an object": (lambda ck, m: _json(
        ck, lambda d: d["config"].update(train="x")), "'config.train' is not an object"),
    "framework.json disagrees with tensors": (lambda ck, m: _json(
        ck, lambda d: d["config"]["model"].update(hidden_size=32)), "hidden_size"),
    "metadata.json other backend": (lambda ck, m: _f(ck, "metadata.json").write_text(
        json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1})), "zarr"),
    "tracker non-ASCII digits": (lambda ck, m: (ck / TRACKER).write_text("١"), "tracker"),
    "tracker garbage": (lambda ck, m: (ck / TRACKER).write_bytes(b"\xff\xfe\x00junk"),
                        "tracker"),
    "tracker huge number": (lambda ck, m: (ck / TRACKER).write_text("9" * 5000), "tracker"),
    "symlinked .distcp": (lambda ck, m: _move_out(ck, f"{IT}/__0_0.distcp"), "symlink"),
    "symlinked iter_ dir": (lambda ck, m: _move_out(ck, IT), "symlink"),
    "tracker symlinked elsewhere": (lambda ck, m: _tracker_elsewhere(ck), "symlink"),
    "symlinked tokenizer file": (lambda ck, m: _move_out(ck, f"{IT}/tokenizer/tokenizer.json"),
                                 "symlink"),
}
# the table's "disagrees with tensors" kind: resume compares framework.json with its config
HIDDEN_WORDS = {"resume": "model.hidden_size", "generate": "does not hold the model",
                "megatron-to-hf": "does not hold the model"}


@pytest.mark.parametrize("entry", ["resume", "generate", "megatron-to-hf"])
def test_tampered_checkpoints_give_one_line(trained, tmp_path, capfd, entry):
    """~27 kinds of damage or tampering: each is exit 2 with one `error:` line naming what is
    wrong; never a traceback, a hang or a silent success."""
    bad, counts = [], {"cases": 0, "tracebacks": 0, "hangs": 0, "accepted": 0}
    for i, (kind, (tamper, phrase)) in enumerate(TAMPER.items()):
        case = tmp_path / f"case{i}"
        case.mkdir()
        ck = _copy(trained, case)
        tamper(ck, case / "PWNED")
        outcome, err = run_entry(entry, ck, case, trained[1], capfd)
        counts["cases"] += 1
        counts["tracebacks"] += outcome.startswith("traceback") or "Traceback" in err
        counts["hangs"] += outcome == "hang"
        counts["accepted"] += outcome == "exit 0"
        line, why = one_line_error(outcome, err)
        if kind == "framework.json disagrees with tensors":
            phrase = HIDDEN_WORDS[entry]
        if line is None:
            bad.append(f"{kind}: {why}")
        elif phrase not in line:
            bad.append(f"{kind}: {phrase!r} not in {line!r}")
        shutil.rmtree(case, ignore_errors=True)
    print(f"\n{entry}: {counts['cases']} tamper kinds tried, {counts['tracebacks']} tracebacks, "
          f"{counts['hangs']} hangs, {counts['accepted']} accepted with exit 0")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# pickled payloads: never run, in any entry point
# --------------------------------------------------------------------------------------------
ENTRIES = ["resume", "generate", "python-api", "megatron-to-hf", "reshape", "print-structure"]


def _python_api(ck):
    """framework.inference.load_for_inference, as a library user calls it."""
    from data_tools.convert import single_process_world
    from framework.config import ParallelConfig
    from framework.checkpoint import stored_model_config
    from framework.inference import checkpoint_vocab, load_for_inference
    from framework.tokenizer import embedded_tokenizer
    from framework.checkpoint import read_meta

    meta = read_meta(str(ck))
    model_cfg = stored_model_config(meta)
    _vocab, padded = checkpoint_vocab(meta, model_cfg, embedded_tokenizer())
    with single_process_world():
        load_for_inference(str(ck), model_cfg, ParallelConfig(), padded_vocab=padded,
                           device=torch.device("cpu"), bf16=False)


@pytest.mark.parametrize("payload", [".metadata", "common.pt"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_pickled_payload_never_runs(trained, tmp_path, capfd, entry, payload):
    ck = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    (_evil_metadata if payload == ".metadata" else _evil_common)(ck, marker)
    if entry == "python-api":
        with pytest.raises(UnsafeCheckpointError) as e:
            _python_api(ck)
        _teardown_world()
        msg = str(e.value)
        assert "\n" not in msg and payload in msg, msg
    else:
        outcome, err = run_entry(entry, ck, tmp_path, trained[1], capfd)
        line, why = one_line_error(outcome, err)
        assert line is not None, why
        assert payload in line and re.search(r"refus", line), line
    assert not marker.exists(), "the pickled payload ran"


def test_convert_subprocess_refuses_malicious_metadata(trained, tmp_path):
    """The command line end to end (the bug of issue 27: `convert megatron-to-hf` ran it)."""
    ck = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    _evil_metadata(ck, marker)
    r = run_process("-m", "data_tools.convert", "megatron-to-hf", "--load", str(ck), "--save",
                    str(tmp_path / "hf"), cwd=ROOT, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ".metadata" in errors[0] and "refusing to unpickle" in errors[0], errors[0]
    assert not marker.exists() and not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------
# symlinks: refused by default, followed when the user opts in
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["resume", "generate", "print-structure"])
def test_symlinks_followed_only_when_allowed(trained, tmp_path, capfd, entry):
    ck = _copy(trained, tmp_path)
    _move_out(ck, f"{IT}/__0_0.distcp")
    outcome, err = run_entry(entry, ck, tmp_path, trained[1], capfd)
    line, why = one_line_error(outcome, err)
    assert line is not None and "is a symlink" in line and "allow" in line, why or line
    outcome, err = run_entry(entry, ck, tmp_path, trained[1], capfd, extra=("allow",))
    assert outcome == "exit 0", err[-3000:]


# --------------------------------------------------------------------------------------------
# the reader's own rules, without a model
# --------------------------------------------------------------------------------------------
def test_tracker_holds_ascii_digits_only(tmp_path):
    from framework.checkpoint.reader import latest_iteration

    (tmp_path / "iter_0000012").mkdir()
    (tmp_path / "iter_0000012" / "framework.json").write_text("{}")
    for good in ("12", "12\n", " 12 "):
        (tmp_path / TRACKER).write_text(good)
        assert latest_iteration(str(tmp_path)) == 12
    for bad in ("١٢", "１２", "12a", "", "-12", "+12", "1_2", "0x0c", "9" * 11):
        (tmp_path / TRACKER).write_text(bad)
        with pytest.raises(CheckpointError, match="tracker does not hold an iteration"):
            latest_iteration(str(tmp_path))
    assert "١٢".isdigit()  # why str.isdigit() was not enough


def test_closed_tree_rules(tmp_path):
    from framework.checkpoint.reader import check_closed_tree

    root = tmp_path / "iter_0000001"
    (root / "tokenizer").mkdir(parents=True)
    (root / "a.distcp").write_bytes(b"x")
    check_closed_tree(str(root))
    os.symlink(tmp_path, root / "tokenizer" / "loop")  # a loop, fine once followed only once
    with pytest.raises(CheckpointError, match="is a symlink"):
        check_closed_tree(str(root))
    check_closed_tree(str(root), allow_symlinks=True)
    os.unlink(root / "tokenizer" / "loop")
    os.symlink(tmp_path / "nowhere", root / "b.distcp")
    with pytest.raises(CheckpointError, match="broken symlink"):
        check_closed_tree(str(root), allow_symlinks=True)
    os.unlink(root / "b.distcp")
    os.mkfifo(root / "c.distcp")
    with pytest.raises(CheckpointError, match="FIFO"):
        check_closed_tree(str(root), allow_symlinks=True)


def _dotted(node) -> str:
    import ast

    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_checkpoint_read_goes_through_the_reader():
    """Nothing outside framework/checkpoint/reader.py calls megatron-core's or torch
    DCP's readers, unpickles, or torch.loads a file; the one exception is hf_files.py's
    torch.load(weights_only=True) of Hugging Face .bin files (behind --allow-pickle)."""
    import ast

    names = {"load_sharded_metadata", "load_common_state_dict", "load_tensors_metadata",
             "read_metadata", "FileSystemReader", "Unpickler", "safe_checkpoint_load"}
    dotted = ("dist_checkpointing.load", "pickle.load", "pickle.loads", "torch.load")
    allowed = {os.path.join("framework", "checkpoint", "reader.py"),
               os.path.join("framework", "security", "unpickling.py")}
    found = []
    for top in ("framework", "data_tools", "examples", "benchmarks", "train.py", "generate.py"):
        paths = [os.path.join(ROOT, top)] if top.endswith(".py") else [
            os.path.join(r, n) for r, _d, fs in os.walk(os.path.join(ROOT, top))
            for n in fs if n.endswith(".py")]
        for path in paths:
            rel = os.path.relpath(path, ROOT)
            if rel in allowed:
                continue
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    hit = [a.name for a in node.names if a.name in names]
                elif isinstance(node, ast.Call):
                    name = _dotted(node.func)
                    hit = [name] if name.split(".")[-1] in names or name.endswith(dotted) \
                        else []
                    weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", 0)
                                       is True for k in node.keywords)
                    if hit and rel.endswith("hf_files.py") and weights_only:
                        hit = []
                else:
                    continue
                found += [f"{rel}:{node.lineno}: {h}" for h in hit]
    assert not found, ("checkpoint reads outside framework/checkpoint/reader.py:\n"
                       + "\n".join(found))


def test_checkpoint_error_is_one_line():
    e = CheckpointError("a\nb\rc")
    assert "\n" not in str(e) and "\r" not in str(e) and isinstance(e, ConfigError)


def test_resume_from_a_checkpoint_saved_before_any_step(trained, tmp_path, capfd):
    """train.max_steps=0 saves a checkpoint before Adam has moments; resuming it used to end in
    a KeyError traceback. Now the optimizer starts fresh (exactly its state at step 0): with the
    checkpoint's weights perturbed (non-zero biases, non-unit norms: tests/perturb.py), the
    resumed first two steps have the losses of a run that starts from the same weights with a
    fresh optimizer (`checkpoint.load=`: same config, weights, data and RNG). The learning-rate
    schedule is given (optimizer.lr_decay_steps): a resumed run keeps the checkpoint's, and the
    seed checkpoint's default would be that of its train.max_steps=0 (README, "Resume")."""
    from framework.runner import run
    from perturb import perturb_checkpoint_resumable

    def losses(run_dir):
        recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
        return [r["loss"] for r in recs if "loss" in r and "step" in r]

    sched = ("optimizer.lr_decay_steps=2",)
    run(_compose(*TINY, *sched, "train.max_steps=0", f"checkpoint.dir={tmp_path}/b",
                 f"run_dir={tmp_path}/rb0"))
    perturb_checkpoint_resumable(str(tmp_path / "b"))  # resumed below: RNG states kept
    two = (*sched, "train.max_steps=2", "train.log_interval=1", "checkpoint.save=false")
    capfd.readouterr()
    run(_compose(*TINY, *two, f"checkpoint.dir={tmp_path}/b", f"run_dir={tmp_path}/rb"))
    assert f"resumed from {tmp_path / 'b'}" in capfd.readouterr().out
    run(_compose(*TINY, *two, f"checkpoint.dir={tmp_path}/fresh", f"checkpoint.load={tmp_path}/b",
                 f"run_dir={tmp_path}/rl"))
    fresh = losses(tmp_path / "rl")
    assert len(fresh) == 2 and losses(tmp_path / "rb") == fresh
    # the perturbed weights were used: not the fixture's first step from the fresh init
    assert fresh[0] != losses(trained[0].parent / "run")[0]


def test_check_compatible_reads_stored_fields_as_typed_values():
    """framework.json's num_attention_heads as "4" (a hand edit that keeps the file's size) was
    a TypeError traceback in check_compatible; it is the typed 4, and a real difference is still
    named."""
    from framework.checkpoint.state import check_compatible
    from framework.config import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4)
    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": "4"}
    check_compatible({"config": {"model": model}}, cfg, "ck")
    with pytest.raises(ConfigError, match="model.num_attention_heads: checkpoint=8 config=4"):
        check_compatible({"config": {"model": dict(model, num_attention_heads="8")}}, cfg, "ck")
