"""Resume and load cases that used to lose checkpoints or change the model silently: committed
checkpoints without a tracker (the run started afresh and replaced them), a damaged tracker (the
error now says how to go on), a changed vocabulary (megatron-core zero-fills or cuts the
embedding's rows), and re-saving the tracker's own iteration (commit's rename order)."""
import os
import shutil

import pytest

from helpers import run_train

FAST = ["train.progress_bar=false", "checkpoint.save_interval=2"]
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    run_train(*FAST, "train.max_steps=4", f"checkpoint.dir={d}/ck", cwd=d, name="base",
              fast=False)
    return d


def _copy(base, name):
    dst = base / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base / "ck", dst)
    return dst


def _one_error(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def _tree(path):
    return sorted(os.path.relpath(os.path.join(root, f), path)
                  for root, _d, files in os.walk(path) for f in files)


def test_checkpoints_without_a_tracker_are_kept_and_the_fix_is_named(base):
    ck = _copy(base, "notracker")
    os.remove(ck / TRACKER)
    before = _tree(ck)
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", cwd=base, name="nt",
                  fast=False, expect=2)
    line = _one_error(r)
    assert f"checkpoint.dir={ck} holds committed checkpoints (iterations 2, 4) but no " \
           f"{TRACKER}" in line and f"write 4 into {ck}/{TRACKER}" in line, line
    assert _tree(ck) == before
    (ck / TRACKER).write_text("4")  # the fix it names works
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", cwd=base, name="nt2",
                  fast=False)
    assert f"resumed from {ck}/iter_0000004" in r.stdout


def test_a_folder_named_as_a_checkpoint_is_refused_and_kept(base):
    """A folder of the user's named `iter_0000006` in checkpoint.dir (not a checkpoint: no
    framework.json) was replaced by the save of that iteration without a word, and an
    `iter_0000001` one was deleted by checkpoint.keep_last. Now the run is refused in one line
    naming it, and nothing in the directory changes; retention itself only ever deletes
    committed checkpoints."""
    from framework.checkpoint.retention import prune_checkpoints

    ck = _copy(base, "foreign")
    (ck / "iter_0000006").mkdir()
    (ck / "iter_0000006" / "important.txt").write_text("precious")
    before = _tree(ck)
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", cwd=base, name=None,
                  fast=False, expect=2)
    line = _one_error(r)
    assert f"checkpoint.dir={ck} holds iter_0000006, named as this run's checkpoints are but " \
           f"not one of them (no framework.json)" in line, line
    assert _tree(ck) == before
    (ck / "iter_0000001").mkdir()
    assert prune_checkpoints(str(ck), 1) == [str(ck / "iter_0000002")]
    assert (ck / "iter_0000001").is_dir() and (ck / "iter_0000006" / "important.txt").is_file()
    # one that cannot be removed (read-only: rmtree ignores its errors) is not reported as
    # removed (it was, twice) but as failed
    import framework.checkpoint.retention as retention

    ck = _copy(base, "readonly")
    failed = []
    real, retention.shutil.rmtree = retention.shutil.rmtree, lambda *a, **k: None
    try:
        removed = prune_checkpoints(str(ck), 1, failed)
    finally:
        retention.shutil.rmtree = real
    assert removed == [] and failed == [str(ck / "iter_0000002.tmp-pruned")]
    # (renamed first: what is left is a staging directory the next save removes, not an
    # iter_N without framework.json that a resume would refuse)
    assert not (ck / "iter_0000002").exists()


def test_a_tracker_behind_a_newer_committed_checkpoint_is_refused(base):
    """The tracker names 2 while iteration 4 is committed (a kill between a commit's rename and
    its tracker write): the run resumed from 2 and replaced iteration 4 with no word. Now it is
    refused in one line naming both ways on, and checkpoint.load_iteration=2 (the explicit
    choice) goes on from 2."""
    ck = _copy(base, "behind")
    (ck / TRACKER).write_text("2")
    before = _tree(ck)
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", cwd=base, name=None,
                  fast=False, expect=2)
    line = _one_error(r)
    assert "names iteration 2, but iteration 4 is committed there too" in line and \
        f"write 4 into {ck}/{TRACKER}" in line and "checkpoint.load_iteration=2" in line, line
    assert _tree(ck) == before
    r = run_train(*FAST, "train.max_steps=4", f"checkpoint.dir={ck}",
                  "checkpoint.load_iteration=2", cwd=base, name=None, fast=False)
    assert f"resumed from {ck}/iter_0000002" in r.stdout
    # a newer-numbered checkpoint committed before the tracker's (a run that went on from
    # checkpoint.load_iteration and saved past it, then stopped) is that run's own branch:
    # the printed resume command goes on
    ck = _copy(base, "branch")
    (ck / TRACKER).write_text("2")
    later = os.path.getmtime(ck / "iter_0000004" / "framework.json") + 10
    os.utime(ck / "iter_0000002" / "framework.json", (later, later))
    r = run_train(*FAST, "train.max_steps=3", f"checkpoint.dir={ck}", cwd=base, name=None,
                  fast=False)
    assert f"resumed from {ck}/iter_0000002" in r.stdout


def test_an_iteration_directory_as_checkpoint_dir_is_refused(base):
    """checkpoint.dir=<ck>/iter_0000004 started afresh (no tracker there) and saved new
    iterations inside the committed checkpoint. Now one line names the two ways on."""
    ck = _copy(base, "iterdir")
    before = _tree(ck)
    r = run_train(*FAST, "train.max_steps=2", f"checkpoint.dir={ck}/iter_0000004", cwd=base,
                  name=None, fast=False, expect=2)
    line = _one_error(r)
    assert f"checkpoint.dir={ck}/iter_0000004 is one committed checkpoint (iter_0000004), not a " \
           f"directory of them" in line and f"give checkpoint.dir={ck}," in line, line
    assert _tree(ck) == before


@pytest.mark.parametrize("tracker, want", [
    ("abc", "tracker does not hold an iteration number ('abc'); the newest committed iteration "
            "is 4: to go on from there, write 4 into it"),
    ("9", "names iteration 9, but {ck}/iter_0000009 is missing or incomplete (no framework.json);"
          " the newest committed iteration before it is 4: to go on from there, write 4 into"),
])
def test_a_damaged_tracker_names_the_newest_committed_iteration(base, tracker, want):
    ck = _copy(base, f"tracker_{tracker}")
    (ck / TRACKER).write_text(tracker)
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", cwd=base, name=None,
                  fast=False, expect=2)
    assert want.format(ck=ck) in _one_error(r)


def test_a_changed_vocabulary_is_refused_on_resume_and_noted_on_load(base):
    ck = _copy(base, "vocab")
    before = _tree(ck)
    for override, rows in (("model.vocab_size=100", 104),
                           ("model.make_vocab_size_divisible_by=64", 64)):
        r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", override, cwd=base,
                      name=None, fast=False, expect=2)
        line = _one_error(r)
        assert f"{ck}/iter_0000004 has 24 vocabulary rows and this config {rows}" in line, line
        assert f"resuming would load it with {rows - 24} rows zero-filled" in line, line
    assert _tree(ck) == before
    r = run_train(*FAST, "train.max_steps=1", f"checkpoint.dir={base}/fresh",
                  f"checkpoint.load={ck}", "model.make_vocab_size_divisible_by=64", cwd=base,
                  name="load", fast=False)
    assert "checkpoint.load gives the embedding and output layer 40 zero-filled rows" in r.stdout


def test_resaving_the_trackers_iteration_replaces_it_whole(tmp_path):
    from framework.checkpoint.commit import commit, stage
    from framework.checkpoint.reader import latest_iteration

    ck = str(tmp_path / "ck")
    for content in ("first", "second"):
        tmp = stage(ck, 3)
        with open(os.path.join(tmp, "framework.json"), "w") as f:
            f.write(content)
        commit(tmp, ck, 3)
    assert latest_iteration(ck) == 3
    assert open(os.path.join(ck, "iter_0000003", "framework.json")).read() == "second"
    assert sorted(os.listdir(ck)) == ["iter_0000003", TRACKER]


def test_a_resume_with_another_tokenizer_is_refused(tmp_path):
    import json

    from framework.data.indexed import preprocess
    from framework.tokenizer import embedded_tokenizer

    tok = embedded_tokenizer()
    tok.save(str(tmp_path / "tok"))
    preprocess(["1+2=3\n" * 20] * 50, tok, str(tmp_path / "data"), progress=False)
    data = ["data=indexed", f"data.path=[{tmp_path}/data]", "data.split='90,10,0'"]
    ck = tmp_path / "ck"
    run_train(*FAST, *data, f"tokenizer.path={tmp_path}/tok", "train.max_steps=2",
              f"checkpoint.dir={ck}", cwd=tmp_path, name="a", fast=False)
    # the same ids for the same tokens: resumes
    run_train(*FAST, *data, f"tokenizer.path={tmp_path}/tok", "train.max_steps=3",
              f"checkpoint.dir={ck}", cwd=tmp_path, name="b", fast=False)
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "tok", swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["+"], vocab["="] = vocab["="], vocab["+"]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    before = _tree(ck)
    r = run_train(*FAST, *data, f"tokenizer.path={swapped}", "train.max_steps=5",
                  f"checkpoint.dir={ck}", cwd=tmp_path, name="c", fast=False, expect=2)
    line = _one_error(r)
    assert f"tokenizer {swapped} is not the tokenizer of the checkpoint this run resumes" in line
    assert "2 tokens have other ids" in line, line
    assert _tree(ck) == before


def test_a_resume_names_the_settings_it_changes(base):
    ck = _copy(base, "moved")
    r = run_train(*FAST, "train.max_steps=5", f"checkpoint.dir={ck}", cwd=base, name="same",
                  fast=False)
    assert "not trained with" not in r.stdout  # nothing changed: nothing to say
    r = run_train(*FAST, "train.max_steps=6", f"checkpoint.dir={ck}", "train.seed=7",
                  "model.hidden_dropout=0.2", cwd=base, name="moved", fast=False)
    assert ("note: resuming with settings the checkpoint was not trained with: train.seed=7 "
            "(checkpoint: 1234); model.hidden_dropout=0.2 (checkpoint: 0) (the data position, "
            "160 samples, is the checkpoint's, and so are the random-number states at the same "
            "layout)") in r.stdout, \
        r.stdout[-2000:]


def test_loading_an_iteration_directory_names_the_option_that_does(base):
    r = run_train(*FAST, "train.max_steps=1", f"checkpoint.dir={base}/fresh2",
                  f"checkpoint.load={base}/ck/iter_0000004", cwd=base, name=None, fast=False,
                  expect=2)
    assert (f"for that iteration of {base}/ck, give checkpoint.load={base}/ck "
            f"checkpoint.load_iteration=4") in _one_error(r)


def test_a_checkpoint_saved_with_the_ignored_post_ln_flag_still_loads():
    """model.apply_residual_connection_post_layernorm is refused now (megatron-core's layer never
    read it); a checkpoint saved while it was accepted is the pre-LN model it trained."""
    from framework.checkpoint.reader import stored_model_config

    meta = {"config": {"model": {"type": "gpt", "num_layers": 2, "hidden_size": 64,
                                 "num_attention_heads": 4, "seq_length": 32,
                                 "apply_residual_connection_post_layernorm": True}}}
    assert stored_model_config(meta).apply_residual_connection_post_layernorm is False
