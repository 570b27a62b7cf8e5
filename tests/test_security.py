"""Safe by default: malicious checkpoint pickles are refused (the payload never runs), `_target_`
only at plugin points, secrets masked, no escaping paths from checkpoint metadata."""
import io
import json
import os
import pickle
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from framework.config import ConfigError
from framework.errors import UnsafeCheckpointError
from framework.security.masking import is_secret_name, mask_hydra_output, mask_secrets
from framework.security.plugins import check_plugin_targets
from framework.security.unpickling import (_restricted_pickle_load, safe_checkpoint_load,
                                           safe_relpath)
from helpers import GENERATE, ROOT, run, run_train

FAST = ["train.progress_bar=false", "train.micro_batch_size=8", "train.global_batch_size=16",
        "train.device=cpu"]


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("seed")
    run_train(*FAST, "train.max_steps=0", f"checkpoint.dir={d}/ck", cwd=d, fast=False)
    return d / "ck"


def _copy(src, dst):
    """A copy without manifest.json (as a checkpoint written before manifests, or by whoever
    tampered with it and dropped the manifest): the unpickling guard is what is tested here, not
    the manifest (tests/test_integrity.py covers that)."""
    shutil.copytree(src, dst)
    path = dst / "iter_0000000"
    os.remove(path / "manifest.json")
    meta = json.loads((path / "framework.json").read_text())
    meta.pop("manifest")
    (path / "framework.json").write_text(json.dumps(meta, indent=1))
    return dst


def test_malicious_common_pt_refused_by_train_resume(seed_ckpt, tmp_path):
    ck = _copy(seed_ckpt, tmp_path / "ck")
    marker = tmp_path / "PWNED"
    common = ck / "iter_0000000" / "common.pt"
    sd = torch.load(common, weights_only=True)
    sd["scheduler"] = Payload(marker)
    torch.save(sd, common)
    r = run_train(*FAST, "train.max_steps=1", f"checkpoint.dir={ck}", cwd=tmp_path, fast=False,
                  expect=2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "refused" in last and "common.pt" in last, last
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr[-3000:]
    assert not marker.exists()


def test_malicious_dcp_metadata_refused_by_generate(seed_ckpt, tmp_path):
    ck = _copy(seed_ckpt, tmp_path / "ck")
    marker = tmp_path / "PWNED"
    with open(ck / "iter_0000000" / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    r = run(GENERATE, f"load={ck}", "device=cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "refusing to unpickle" in errors[0] and ".metadata" in errors[0], errors[0]
    assert not marker.exists()


def test_byte_items_load_weights_only(tmp_path):
    """torch DCP reads byte items with weights_only=False; inside the guard it is True."""
    import random

    import numpy as np
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    marker = tmp_path / "PWNED"
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="x"))
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    evil.seek(0)
    with safe_checkpoint_load():
        with pytest.raises(UnsafeCheckpointError):
            planner.load_bytes(item, evil)
        # what our checkpoints do store loads: python and numpy RNG state
        ok = io.BytesIO()
        torch.save({"random": random.getstate(), "np": np.random.get_state(),
                    "torch": torch.get_rng_state()}, ok)
        ok.seek(0)
        planner.load_bytes(item, ok)
    assert planner.state_dict["x"]["np"][0] == "MT19937"
    assert not marker.exists()
    assert torch.load.__name__ == "load"  # restored


def test_metadata_storage_paths_must_stay_inside(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    for bad in ("../../evil.distcp", "/etc/passwd", "a/../../b"):
        md = Metadata(state_dict_metadata={},
                      storage_data={MetadataIndex("w"): _StorageInfo(bad, 0, 1)})
        with pytest.raises(ConfigError, match="refusing path"):
            _restricted_pickle_load(io.BytesIO(pickle.dumps(md)))
    md = Metadata(state_dict_metadata={},
                  storage_data={MetadataIndex("w"): _StorageInfo("__0_0.distcp", 0, 1)})
    assert _restricted_pickle_load(io.BytesIO(pickle.dumps(md))).storage_data
    assert safe_relpath("tokenizer/vocab.json", "x") == "tokenizer/vocab.json"
    for bad in ("..", "a/..", "/x", "C:\\x", "a\\..\\..\\b"):
        with pytest.raises(ConfigError):
            safe_relpath(bad, "x")


def test_target_only_at_plugin_points():
    check_plugin_targets({"train": {"step": {"_target_": "examples.m.Step", "alpha": 1}}})
    check_plugin_targets({"train": {"step": {"_target_": None}}})
    with pytest.raises(ConfigError, match="only allowed at the plugin points"):
        check_plugin_targets({"data": {"x": [{"_target_": "os.system", "command": "true"}]}})
    with pytest.raises(ConfigError, match="outside the allowed plugin prefixes"):
        check_plugin_targets({"train": {"step": {"_target_": "os.system"}}})
    check_plugin_targets({"train": {"step": {"_target_": "mypkg.S",
                                             "_allowed_prefixes_": ["mypkg."]}}})


def test_train_refuses_target_os_system(tmp_path):
    marker = tmp_path / "PWNED"
    r = run_train(*FAST, f"+data.hook={{_target_:os.system,command:'touch {marker}'}}",
                  cwd=tmp_path, fast=False, expect=2)
    assert "data.hook._target_='os.system'" in r.stderr and "plugin points" in r.stderr
    r = run_train(*FAST, "train.step._target_=os.system", cwd=tmp_path, fast=False, expect=2)
    assert "outside the allowed plugin prefixes" in r.stderr
    assert not marker.exists()


def test_mask_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "env-secret-1")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "env-secret-2")
    cfg = {"train": {"step": {"hf_token": "cfg-secret", "alpha": 0.25}},
           "logging": {"wandb_name": "run-env-secret-1"}, "keep": ["a", "env-secret-2"],
           "tokenizer": {"path": "gpt2"}}
    out = mask_secrets(cfg)
    assert out["train"]["step"] == {"hf_token": "***", "alpha": 0.25}
    assert out["logging"]["wandb_name"] == "run-***" and out["keep"] == ["a", "***"]
    assert out["tokenizer"]["path"] == "gpt2"
    assert cfg["train"]["step"]["hf_token"] == "cfg-secret"  # the input is unchanged
    for name in ("WANDB_API_KEY", "hf_token", "AWS_SECRET", "db.password", "api_key"):
        assert is_secret_name(name), name
    for name in ("keytoken_ids", "tokenizer", "vocab_file", "keep_last", "TOKENIZERS_PARALLELISM"):
        assert not is_secret_name(name), name
    text = "- +train.step.hf_token=abcd1234\n- x=1\nname: run\nhf_token: abcd1234\n" \
           "override_dirname: +train.step.hf_token=abcd1234,x=1\n"
    masked = mask_hydra_output(text, ["+train.step.hf_token=abcd1234", "x=1"])
    assert "abcd1234" not in masked and "- x=1" in masked and "name: run" in masked


def test_no_world_writable_modes_in_source():
    pat = re.compile(r"chmod\([^)]*0o[0-7]*[2367]\b(?![^)]*umask)")
    hits = []
    for d in ("framework", "data_tools", "examples"):
        for root, _dirs, files in os.walk(os.path.join(ROOT, d)):
            for n in files:
                if n.endswith(".py"):
                    for i, line in enumerate(open(os.path.join(root, n)), 1):
                        if pat.search(line):
                            hits.append(f"{n}:{i}: {line.strip()}")
    assert not hits, hits


def test_wandb_run_id_from_checkpoint_cannot_be_a_path():
    from framework.training.metrics import valid_wandb_id

    assert valid_wandb_id("92bty9g3") and valid_wandb_id("run_1-a")
    for bad in ("../../x", "/abs", "a/b", "", "x" * 200, "a\nb"):
        assert not valid_wandb_id(bad), bad


def test_files_beside_the_checkpoints_are_never_written_through_a_symlink(tmp_path):
    """A symlink put at checkpoint.dir/.run.lock or wandb_run_id.txt had its target overwritten
    (the lock's pid line, the W&B id); a directory at .run.lock turned the lock off without a
    word, and a FIFO there was a traceback. Now the lock refuses them in one line and the id file
    is replaced, not written through (a directory, a FIFO or bytes that are not an id: a
    warning, and a new W&B run)."""
    from framework.errors import ConfigError
    from framework.locking import run_lock
    from framework.training import metrics

    target = tmp_path / "precious.txt"
    target.write_text("precious")
    ck = tmp_path / "ck"
    ck.mkdir()
    for make in (lambda p: p.symlink_to(target), lambda p: p.mkdir(), lambda p: os.mkfifo(p)):
        lock = ck / ".run.lock"
        make(lock)
        with pytest.raises(ConfigError, match=r"\.run\.lock is not a regular file"):
            with run_lock(str(ck)):
                pass
        assert target.read_text() == "precious"
        lock.rmdir() if lock.is_dir() and not lock.is_symlink() else lock.unlink()
    with run_lock(str(ck)):  # a plain run takes it, and leaves nothing behind
        assert (ck / ".run.lock").is_file()
    assert not (ck / ".run.lock").exists()

    id_file = ck / "wandb_run_id.txt"
    id_file.symlink_to(target)
    assert metrics._read_run_id(str(id_file)) is None
    metrics._write_run_id(str(id_file), "abc123")
    assert target.read_text() == "precious" and not id_file.is_symlink()
    assert metrics._read_run_id(str(id_file)) == "abc123"
    id_file.write_bytes(b"\xff\xfe")
    assert metrics._read_run_id(str(id_file)) is None
    id_file.unlink()
    id_file.mkdir()
    assert metrics._read_run_id(str(id_file)) is None
    metrics._write_run_id(str(id_file), "abc123")  # a warning; the directory stays
    assert id_file.is_dir()
    id_file.rmdir()
    os.mkfifo(id_file)
    assert metrics._read_run_id(str(id_file)) is None  # no open that would block


def test_generate_py_masks_cfg_and_refuses_targets(tmp_path):
    env = dict(os.environ, MY_API_TOKEN="secret-xyz")
    r = run(GENERATE, "--cfg", "job", "+hf_token=secret-xyz", cwd=tmp_path, env=env,
            timeout=120)
    assert "hf_token" in r.stdout and "secret-xyz" not in r.stdout + r.stderr
    r = run(GENERATE, "+evil._target_=os.system", cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "_target_" in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_code_shipped_with_a_tokenizer_never_runs(tmp_path, monkeypatch):
    """A tokenizer directory (tokenizer.path, a checkpoint's tokenizer/, preprocess's
    --tokenizer) whose tokenizer_config.json maps AutoTokenizer to a class in a .py file beside
    it: one line naming the directory, and the file's code never runs (transformers is called
    with trust_remote_code=False; before, it asked on stdin, and a "y" ran the code). The same
    auto_map beside a tokenizer class transformers has loads, without running the file."""
    from dataclasses import replace

    from framework import tokenizer as tk
    from framework.config import TokenizerConfig

    d = tmp_path / "tok"
    tk.embedded_tokenizer().save(str(d))
    marker = tmp_path / "PWNED"
    (d / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTok(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    builtin = cfg.get("tokenizer_class")
    cfg.update(tokenizer_class="EvilTok", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTok"]},
               trust_remote_code=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))
    with pytest.raises(ConfigError) as e:
        tk.build_tokenizer(replace(TokenizerConfig(), path=str(d)))
    assert f"tokenizer.path={str(d)!r}: cannot load a tokenizer" in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()
    cfg["tokenizer_class"] = builtin
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tk.build_tokenizer(replace(TokenizerConfig(), path=str(d)))
    assert tok.encode("12+35=") and not marker.exists()
