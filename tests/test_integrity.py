"""Checkpoint integrity (issue 26 items 1 and 2): manifest.json in every committed checkpoint,
verified on load and by data_tools.convert; a full disk during a save.

One tiny run saves iterations 1, 2 and 3 (module fixture); each case copies that checkpoint
directory and damages the copy. A case that goes through train.py or convert expects exit 2 and
exactly one `error:` line naming the bad file, the newest earlier checkpoint that verifies and
the option that loads it; the option then works.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import FAST, TRAIN, launch_ranks, run, run_train

TINY = ["model.position_embedding_type=learned_absolute", "model.num_layers=1",
        "model.hidden_size=16", "model.num_attention_heads=2", "model.seq_length=16",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_interval=0"]
TRACKER = "latest_checkpointed_iteration.txt"


def _it(n):
    return f"iter_{n:07d}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    run_train(*TINY, "train.max_steps=3", "checkpoint.save_interval=1", f"checkpoint.dir={d}/ck",
              cwd=d, name="run")
    assert (d / "ck" / TRACKER).read_text().strip() == "3"
    return d / "ck"


def _copy(saved, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    return ck


def _flip(path, where=0.5):
    """Flip one bit of the byte at `where` (a fraction of the file)."""
    size = os.path.getsize(path)
    pos = min(size - 1, int(size * where))
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x10]))


def _largest_shard(iter_path):
    shards = [n for n in os.listdir(iter_path) if n.endswith(".distcp")]
    return iter_path / max(shards, key=lambda n: os.path.getsize(iter_path / n))


def _one_error(r):
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _resume(ck, tmp_path, *extra, steps=4, expect=0, name="resume"):
    return run_train(*TINY, f"train.max_steps={steps}", "checkpoint.save_interval=100",
                     f"checkpoint.dir={ck}", *extra, cwd=tmp_path, name=name, expect=expect)


# --------------------------------------------------------------------------------------------
# the manifest as written
# --------------------------------------------------------------------------------------------
def test_manifest_covers_every_file(saved):
    from framework.checkpoint.manifest import file_digest

    for n in (1, 2, 3):
        path = saved / _it(n)
        doc = json.loads((path / "manifest.json").read_text())
        assert doc["format"] == 1 and doc["hash"] == "xxh3_64"
        on_disk = sorted(os.path.relpath(os.path.join(root, f), path)
                         for root, _d, files in os.walk(path) for f in files)
        assert sorted(doc["files"]) == [f for f in on_disk if f != "manifest.json"]
        assert {".metadata", "common.pt", "framework.json", "metadata.json",
                "tokenizer/tokenizer.json"} <= set(doc["files"])
        for rel, entry in doc["files"].items():
            assert file_digest(str(path / rel)) == (entry["size"], entry["hash"]), rel
        assert json.loads((path / "framework.json").read_text())["manifest"] == "manifest.json"
    assert not [n for n in os.listdir(saved) if ".tmp" in n]


# --------------------------------------------------------------------------------------------
# the reader's rules, without a model
# --------------------------------------------------------------------------------------------
def _verify(ck, n, **kw):
    from framework.checkpoint.manifest import verify_checkpoint

    return verify_checkpoint(str(ck / _it(n)), n, collective=False, **kw)


def _verify_error(ck, n, **kw):
    from framework.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        _verify(ck, n, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_damage_kinds_name_the_file_and_the_earlier_checkpoint(saved, tmp_path):
    cases = 0
    # a bit flip: caught by the checksum only (the size is unchanged)
    ck = _copy(saved, tmp_path / "flip")
    shard = _largest_shard(ck / _it(3))
    _flip(shard)
    msg = _verify_error(ck, 3)
    assert f"{shard} is damaged" in msg and "checksum" in msg
    assert f"is {ck / _it(2)}: load it with checkpoint.load_iteration=2" in msg
    assert _verify(ck, 3, checksums=False)  # sizes only: not seen
    # the earlier one damaged too: the one before it is named
    _flip(ck / _it(2) / "common.pt")
    assert "checkpoint.load_iteration=1" in _verify_error(ck, 3)
    _flip(ck / _it(1) / "framework.json", 0.3)
    assert f"no earlier checkpoint in {ck} verifies" in _verify_error(ck, 3)
    cases += 3
    # truncated, missing, grown, every kind of file
    for kind, rel, damage, phrase in [
            ("truncated shard", "__0_0.distcp", lambda p: os.truncate(p, 1000), "is truncated"),
            ("truncated .metadata", ".metadata", lambda p: os.truncate(p, 10), "is truncated"),
            ("missing common.pt", "common.pt", os.remove, "is missing"),
            ("missing tokenizer file", "tokenizer/tokenizer.json", os.remove, "is missing"),
            ("grown framework.json", "framework.json",
             lambda p: open(p, "a").write(" "), "is damaged"),
            ("bit flip in metadata.json", "metadata.json", _flip, "is damaged")]:
        ck = _copy(saved, tmp_path / kind.replace(" ", "-"))
        damage(str(ck / _it(3) / rel))
        msg = _verify_error(ck, 3, checksums=kind.startswith("bit"))
        assert f"{ck / _it(3) / rel} {phrase}" in msg, (kind, msg)
        assert "checkpoint.load_iteration=2" in msg, (kind, msg)
        cases += 1
    # the manifest itself: damaged, or gone while framework.json says there is one
    ck = _copy(saved, tmp_path / "manifest")
    (ck / _it(3) / "manifest.json").write_text('{"format": 1, "hash": "xxh3_64", "files": [')
    assert "manifest.json is damaged" in _verify_error(ck, 3)
    (ck / _it(3) / "manifest.json").write_text(json.dumps(
        {"format": 1, "hash": "xxh3_64", "files": {"../../etc/passwd": {"size": 1,
                                                                      "hash": "0" * 16}}}))
    assert "not a plain path inside the checkpoint" in _verify_error(ck, 3)
    os.remove(ck / _it(3) / "manifest.json")
    assert "manifest.json is missing" in _verify_error(ck, 3)
    cases += 3
    # files a reader opens, unlisted: shards swapped in from another iteration with their
    # entries removed (resumed iteration 2's state silently), a tokenizer file added (changed
    # the decoded text), an empty file list
    ck = _copy(saved, tmp_path / "unlisted")
    path = ck / _it(3)
    doc = json.loads((path / "manifest.json").read_text())
    shards = sorted(r for r in doc["files"] if r.endswith(".distcp"))
    for r in shards:
        del doc["files"][r]
        shutil.copy(ck / _it(2) / r, path / r)
    (path / "manifest.json").write_text(json.dumps(doc))
    assert f"{path / shards[0]} is not listed in manifest.json (added after the save" \
        in _verify_error(ck, 3)
    ck = _copy(saved, tmp_path / "unlisted-tokenizer")
    (ck / _it(3) / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "0"}')
    assert f"{ck / _it(3) / 'tokenizer' / 'special_tokens_map.json'} is not listed" \
        in _verify_error(ck, 3)
    (ck / _it(3) / "manifest.json").write_text(json.dumps(
        {"format": 1, "hash": "xxh3_64", "files": {}}))
    assert "manifest.json does not list .metadata, which every checkpoint has" \
        in _verify_error(ck, 3)
    cases += 3
    # other files beside them are tolerated: no reader opens a user's notes
    ck = _copy(saved, tmp_path / "extra")
    (ck / _it(3) / "NOTES.txt").write_text("copied from cluster A")
    assert _verify(ck, 3) is True
    print(f"\n{cases} damage kinds refused, 1 extra file tolerated")


# --------------------------------------------------------------------------------------------
# train.py end to end
# --------------------------------------------------------------------------------------------
def test_bit_flip_resume_refused_then_the_named_override_loads(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    shard = _largest_shard(ck / _it(3))
    _flip(shard)
    line = _one_error(_resume(ck, tmp_path, expect=None, name="refused"))
    assert str(shard) in line and "checksum" in line, line
    assert f"{ck / _it(2)}: load it with checkpoint.load_iteration=2" in line, line
    assert (ck / TRACKER).read_text().strip() == "3"  # nothing was changed
    r = _resume(ck, tmp_path, "checkpoint.load_iteration=2", name="override")
    assert f"resumed from {ck / _it(2)} (step 2," in r.stdout, r.stdout[-2000:]
    assert "checkpoint.load_iteration" not in r.stdout.split("train longer:")[-1]
    assert (ck / TRACKER).read_text().strip() == "4" and _verify(ck, 4) is True


def test_truncated_or_missing_file_refused_before_any_worker(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    os.truncate(ck / _it(3) / "common.pt", 7)
    line = _one_error(_resume(ck, tmp_path, expect=None, name="truncated"))
    assert f"{ck / _it(3) / 'common.pt'} is truncated" in line and \
        "checkpoint.load_iteration=2" in line, line
    line = _one_error(_resume(ck, tmp_path, "checkpoint.load_iteration=7", expect=None,
                              name="no-such"))
    assert "checkpoint.load_iteration=7" in line and _it(7) in line, line


def test_verify_false_loads_a_bit_flipped_shard(saved, tmp_path):
    """The trade-off of checkpoint.verify=false: a flipped bit inside tensor data is loaded as
    it is (a slightly different weight); sizes are still checked."""
    ck = _copy(saved, tmp_path)
    _flip(_largest_shard(ck / _it(3)), 0.6)
    r = _resume(ck, tmp_path, "checkpoint.verify=false")
    assert f"resumed from {ck / _it(3)} (step 3," in r.stdout
    os.truncate(_largest_shard(ck / _it(4)), 100)
    line = _one_error(_resume(ck, tmp_path, "checkpoint.verify=false", steps=5, expect=None,
                              name="truncated"))
    assert "is truncated" in line, line


def test_checkpoint_without_manifest_still_loads(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    path = ck / _it(3)
    os.remove(path / "manifest.json")
    meta = json.loads((path / "framework.json").read_text())
    del meta["manifest"]
    (path / "framework.json").write_text(json.dumps(meta))
    r = _resume(ck, tmp_path)
    assert f"resumed from {path} (step 3," in r.stdout
    notes = [l for l in r.stdout.splitlines() if "has no manifest.json" in l]
    assert len(notes) == 1 and "loading it unverified" in notes[0], r.stdout[-2000:]


# --------------------------------------------------------------------------------------------
# data_tools.convert
# --------------------------------------------------------------------------------------------
def test_convert_refuses_a_corrupt_checkpoint(saved, tmp_path, capfd):
    from data_tools import convert

    ck = _copy(saved, tmp_path)
    shard = _largest_shard(ck / _it(3))
    _flip(shard)
    for argv in (["megatron-to-hf", "--load", ck, "--save", tmp_path / "hf"],
                 ["reshape", "--load", ck, "--save", tmp_path / "rs", "--target-tp", 1,
                  "--target-pp", 1],
                 ["megatron-to-hf", "--load", ck / _it(3), "--print-checkpoint-structure"]):
        capfd.readouterr()
        assert convert.main([str(a) for a in argv]) == 2
        err = capfd.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert str(shard) in lines[0] and f"--load {ck / _it(2)}" in lines[0], lines[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "rs").exists()
    assert convert.main(["megatron-to-hf", "--load", str(ck / _it(2)), "--save",
                         str(tmp_path / "hf")]) == 0
    # --no-verify checks sizes only: the flipped bit goes through
    assert convert.main(["reshape", "--load", str(ck), "--save", str(tmp_path / "rs"),
                         "--target-tp", "1", "--target-pp", "1", "--no-verify"]) == 0
    # reshape's output has its own manifest
    from framework.checkpoint.manifest import verify_checkpoint

    assert verify_checkpoint(str(tmp_path / "rs" / _it(3)), 3, collective=False)


# --------------------------------------------------------------------------------------------
# TP2 over gloo: one manifest covering every rank's files; verification shared by the ranks
# --------------------------------------------------------------------------------------------
def test_tp2_manifest_covers_all_ranks(tmp_path):
    ck = tmp_path / "ck"
    run_train(*TINY, "parallel=tp2", "train.max_steps=2", "checkpoint.save_interval=1",
              f"checkpoint.dir={ck}", cwd=tmp_path, name="save")
    for n in (1, 2):
        path = ck / _it(n)
        files = json.loads((path / "manifest.json").read_text())["files"]
        shards = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))
        assert {s.split("_")[2] for s in shards} == {"0", "1"}, shards  # both ranks wrote
        assert set(shards) <= set(files)
        assert _verify(ck, n) is True
    rank1 = max((f for f in os.listdir(ck / _it(2)) if f.startswith("__1_")),
                key=lambda f: os.path.getsize(ck / _it(2) / f))
    _flip(ck / _it(2) / rank1)
    want = f"{ck / _it(2) / rank1} is damaged"
    # self-launched: the launching process checks before any worker starts
    line = _one_error(run_train(*TINY, "parallel=tp2", "train.max_steps=3",
                                f"checkpoint.dir={ck}", cwd=tmp_path, name="resume",
                                expect=None))
    assert want in line and "checkpoint.load_iteration=1" in line, line
    # torchrun-style (each rank its own train.py): the ranks share the hashing and all stop
    # with the same line, whichever rank hashed the bad file
    with pytest.raises(AssertionError) as e:
        launch_ranks(2, TRAIN, *FAST, *TINY, "parallel=tp2", "train.max_steps=3",
                     f"checkpoint.dir={ck}", f"hydra.run.dir={tmp_path}/ext", cwd=tmp_path,
                     timeout=600)
    report = str(e.value)
    for rank in (0, 1):
        part = report.split(f"--- rank {rank}: exit ")[1].split("--- rank")[0]
        assert part.startswith("2") and want in part and "load_iteration=1" in part, part


# --------------------------------------------------------------------------------------------
# item 2: a full disk during a save
# --------------------------------------------------------------------------------------------
# train.py with megatron-core's checkpoint writer failing with ENOSPC on iteration 4's files:
# the error is raised where the bytes are written (in the writer's forked processes, which
# inherit the patch), so it travels the real way back (a queue, torch DCP's wrapper)
FULL_DISK = """
import errno, functools, os, runpy, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
real = fa._write_item
@functools.wraps(real)  # mcore reads its signature
def full(transforms, stream, *a, **k):
    name = str(getattr(stream, "name", ""))
    if "iter_0000004" in name:
        stream.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return real(transforms, stream, *a, **k)
fa._write_item = full
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    overrides = [*TINY, "train.device=cpu", "train.progress_bar=false",
                 "checkpoint.save_interval=2", f"checkpoint.dir={ck}"]
    r = run("-c", FULL_DISK.format(train=TRAIN), *overrides, "train.max_steps=6",
            f"hydra.run.dir={tmp_path}/full", cwd=tmp_path, timeout=600)
    line = _one_error(r)
    assert "No space left on device" in line and "is full" in line, line
    assert str(ck / _it(4)) in line and str(ck) in line, line
    assert sorted(os.listdir(ck)) == [_it(2), TRACKER]  # no half checkpoint, no temp dir
    assert (ck / TRACKER).read_text().strip() == "2"
    assert _verify(ck, 2) is True
    # disk space back: the same command resumes from iteration 2 and finishes
    r = run_train(*TINY, "checkpoint.save_interval=2", f"checkpoint.dir={ck}",
                  "train.max_steps=6", cwd=tmp_path, name="again")
    assert f"resumed from {ck / _it(2)} (step 2," in r.stdout, r.stdout[-2000:]
    assert (ck / TRACKER).read_text().strip() == "6"
    assert sorted(os.listdir(ck)) == [_it(2), _it(4), _it(6), TRACKER]
