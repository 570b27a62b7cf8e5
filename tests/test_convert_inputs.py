"""data_tools.convert input handling: an unwritable --save is named as --save (not the staging
directory), reshape --with-optimizer of a checkpoint without optimizer state is refused, and no
option is silently ignored (--allow-symlinks / --no-verify on hf-to-megatron, --overwrite
without --save). Each refusal is one `error:` line, exit 2, before anything is written."""
import json
import os

import pytest

from data_tools import convert
from helpers import save_tiny_hf_gpt2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`hf`: a tiny HF GPT-2; `m1`: our checkpoint of it (hf-to-megatron: weights only)."""
    d = tmp_path_factory.mktemp("convert_inputs")
    save_tiny_hf_gpt2(d / "hf")
    assert convert.main(["hf-to-megatron", "--load", str(d / "hf"), "--save", str(d / "m1")]) \
        == 0
    return d


def _convert(capsys, *argv):
    capsys.readouterr()
    rc = convert.main([str(a) for a in argv])
    return rc, capsys.readouterr()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["hf-to-megatron", "megatron-to-hf"])
def test_unwritable_save_names_save_not_the_staging_dir(models, tmp_path, capsys, command,
                                                        monkeypatch):
    """--save /proc/z5 said `error: No such file or directory: /proc/.z5.tmp-...`; --save under
    a regular file said `File exists: <file>`. Both are now found before any loading."""
    def no_heavy_work():
        raise AssertionError("the model was loaded before --save was checked")

    monkeypatch.setattr(convert, "single_process_world", no_heavy_work)
    load = models / ("hf" if command == "hf-to-megatron" else "m1")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for save in ("/proc/z5", blocker / "out", blocker / "a" / "b"):
        rc, out = _convert(capsys, command, "--load", load, "--save", save)
        line = _one_line(out.err)
        assert rc == 2 and line.startswith(f"error: --save={save}: cannot write there ("), line
        assert ".tmp-" not in line and ".probe-" not in line, line
    assert blocker.read_text() == "keep me" and os.listdir(tmp_path) == ["file"]
    assert not [p for p in os.listdir("/proc") if p.startswith(".z5")]


def test_unwritable_save_is_checked_for_reshape(models, capsys):
    rc, out = _convert(capsys, "reshape", "--load", models / "m1", "--save", "/proc/z5",
                       "--target-tp", 1, "--target-pp", 1)
    assert rc == 2 and _one_line(out.err).startswith("error: --save=/proc/z5: cannot write")


def test_empty_save_is_named(models, capsys):
    """--save '' said "--save and --load overlap" (the empty path is the current directory)."""
    rc, out = _convert(capsys, "megatron-to-hf", "--load", models / "m1", "--save", "")
    assert rc == 2 and _one_line(out.err) == "error: --save is empty: name the output directory"


def test_save_that_is_a_symlink_or_the_current_directory_refused(models, tmp_path, capsys,
                                                                 monkeypatch):
    """A dangling --save symlink failed after the conversion, naming the staging directory; a
    symlink to an empty directory was replaced by a real one (its target left empty, a `.old-`
    directory left behind); --save=. failed after the conversion (`Device or resource busy`).
    All three are refused before any loading, and nothing is changed."""
    def no_heavy_work():
        raise AssertionError("the model was loaded before --save was checked")

    monkeypatch.setattr(convert, "single_process_world", no_heavy_work)
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "link").symlink_to(target)
    for save in (tmp_path / "dangling", tmp_path / "link"):
        rc, out = _convert(capsys, "hf-to-megatron", "--load", models / "hf", "--save", save)
        assert rc == 2 and _one_line(out.err).startswith(
            f"error: --save={save} is a symbolic link; name the directory itself"), out.err
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    rc, out = _convert(capsys, "hf-to-megatron", "--load", models / "hf", "--save", ".")
    assert rc == 2 and _one_line(out.err).startswith("error: --save=. is the current directory")
    assert sorted(os.listdir(tmp_path)) == ["cwd", "dangling", "link", "target"]
    assert os.listdir(target) == [] and os.listdir(empty) == []


def test_reshape_with_optimizer_needs_optimizer_state(models, tmp_path, capsys):
    """A checkpoint written by hf-to-megatron (no optimizer state) reshaped with
    --with-optimizer said `wrote ...: ... tensors with optimizer state` and recorded
    with_optimizer: true."""
    out_dir = tmp_path / "r2"
    rc, out = _convert(capsys, "reshape", "--load", models / "m1", "--save", out_dir,
                       "--target-tp", 1, "--target-pp", 1, "--with-optimizer")
    line = _one_line(out.err)
    assert rc == 2 and line.startswith("error: --with-optimizer: ") and \
        "holds no optimizer state" in line, line
    assert "wrote" not in out.out and not out_dir.exists() and os.listdir(tmp_path) == []
    # the same without --with-optimizer is a weights-only reshape, recorded as such
    rc, out = _convert(capsys, "reshape", "--load", models / "m1", "--save", out_dir,
                       "--target-tp", 1, "--target-pp", 1)
    assert rc == 0 and "(weights only)" in out.out, out
    meta = json.loads((out_dir / "iter_0000000" / "framework.json").read_text())
    assert meta["with_optimizer"] is False


@pytest.mark.parametrize("option", ["--allow-symlinks", "--no-verify"])
def test_hf_to_megatron_refuses_options_for_our_checkpoints(models, tmp_path, capsys, option):
    """hf-to-megatron accepted --allow-symlinks and --no-verify and did nothing with them (an
    HF directory has no manifest, and its symlinks -- the hub cache -- are always followed)."""
    rc, out = _convert(capsys, "hf-to-megatron", "--load", models / "hf", "--save",
                       tmp_path / "out", option)
    line = _one_line(out.err)
    assert rc == 2 and line.startswith(f"error: {option} is for our checkpoints"), line
    assert not (tmp_path / "out").exists()
    # and hf-to-megatron's --help does not offer them; the other commands still do
    for command, offered in (("hf-to-megatron", False), ("megatron-to-hf", True),
                             ("reshape", True)):
        with pytest.raises(SystemExit):
            convert.main([command, "--help"])
        assert (option in capsys.readouterr().out) == offered, command


def test_hf_to_megatron_follows_symlinks_in_an_hf_directory(models, tmp_path, capsys):
    """Why --allow-symlinks is not an hf-to-megatron option: a hub-cache snapshot is symlinks to
    blobs, and it converts without any flag."""
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for name in os.listdir(models / "hf"):
        os.symlink(models / "hf" / name, snap / name)
    rc, out = _convert(capsys, "hf-to-megatron", "--load", snap, "--save", tmp_path / "out")
    assert rc == 0 and "wrote" in out.out, out


def test_output_options_without_save_are_refused(models, capsys):
    """--overwrite, --max-shard-size, --target-dtype, --with-optimizer... with only
    --print-checkpoint-structure (nothing written) were ignored."""
    for command, load in (("megatron-to-hf", "m1"), ("reshape", "m1"), ("hf-to-megatron", "hf")):
        extra = ["--target-tp", 1, "--target-pp", 1] if command == "reshape" else []
        rc, out = _convert(capsys, command, "--load", models / load,
                           "--print-checkpoint-structure", "--overwrite", *extra)
        line = _one_line(out.err)
        assert rc == 2 and line.startswith("error: --overwrite describes the output, and --save "
                                           "is not given"), line
        assert out.out == "", command  # refused before anything is printed
    # every other option about the output too, named together; the input's options are not
    for command, load, options in (
            ("megatron-to-hf", "m1", ["--max-shard-size", "1GB", "--target-dtype", "bf16"]),
            ("reshape", "m1", ["--target-tp", 1, "--target-pp", 1, "--with-optimizer"]),
            ("hf-to-megatron", "hf", ["--target-tp", 2, "--allow-pickle"])):
        rc, out = _convert(capsys, command, "--load", models / load,
                           "--print-checkpoint-structure", *options)
        line = _one_line(out.err)
        named = [o for o in options if isinstance(o, str) and o.startswith("--")
                 and o not in ("--allow-pickle", "--target-pp")
                 and not (command == "reshape" and o == "--target-tp")]
        assert rc == 2 and all(o in line for o in named) and "--allow-pickle" not in line, line
    rc, out = _convert(capsys, "reshape", "--load", models / "m1", "--print-checkpoint-structure",
                       "--target-tp", 2, "--target-pp", 1)  # required: not refused
    assert rc == 0 and out.out, out.err


def test_full_disk_is_one_line_and_leaves_save_untouched(models, tmp_path, capsys, monkeypatch):
    """A write that fails because the disk is full (torch and safetensors say so in their own
    errors, not as an OSError) is one `error:` line naming --save and the free space; the
    partial output is removed and an existing --save keeps its contents. Another failure while
    writing, on a disk with room, is not reworded."""
    from framework import interop

    real = interop.save_hf_checkpoint

    def fill_then_fail(tmp, *a, **k):
        real(tmp, *a, **k)  # a partial output in the staging directory
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(interop, "save_hf_checkpoint", fill_then_fail)
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    usage = convert.shutil.disk_usage
    monkeypatch.setattr(convert.shutil, "disk_usage",
                        lambda p: usage(p)._replace(free=3 * 2**20))
    rc, out = _convert(capsys, "megatron-to-hf", "--load", models / "m1", "--save", save,
                       "--overwrite")
    line = _one_line(out.err)
    assert rc == 2 and f"--save={save}" in line and "no space left on the device (3 MiB free)" \
        in line, line
    assert sorted(os.listdir(save)) == ["keep.txt"] and (save / "keep.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]
    monkeypatch.setattr(convert.shutil, "disk_usage", usage)  # room left: not a full disk
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        convert.main(["megatron-to-hf", "--load", str(models / "m1"), "--save", str(save),
                      "--overwrite"])
    assert sorted(os.listdir(save)) == ["keep.txt"]


def test_full_disk_in_the_checkpoint_writer_is_the_same_line(models, tmp_path, capsys,
                                                             monkeypatch):
    """hf-to-megatron writes through the training checkpoint writer, which turns a full disk into
    its own error (with training advice): convert still names --save and the full device, from
    the OSError behind it, and nothing is left at --save."""
    import errno

    from megatron.core import dist_checkpointing

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", full)
    save = tmp_path / "m"
    rc, out = _convert(capsys, "hf-to-megatron", "--load", models / "hf", "--save", save)
    line = _one_line(out.err)
    assert rc == 2 and f"--save={save}" in line and "no space left on the device" in line, line
    assert "keep_last" not in line and not save.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".m.tmp-")]
