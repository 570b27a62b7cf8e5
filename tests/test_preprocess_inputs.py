"""data_tools.preprocess: outputs that cannot be replaced, and options that no input uses.

* A run whose output path is a directory failed only while moving its outputs into place, after
  replacing the outputs of the keys before it, and named a file in its hidden staging directory.
  Now the path is refused before any tokenizing, naming it, and a move that fails anyway is
  rolled back (the earlier files are put back).
* `--split` on JSON-lines inputs or on a single saved dataset, and `--max-line-bytes` on a
  dataset, did nothing (exit 0). Now each is refused in one line naming the option; their
  defaults (the options not given) are not.
"""
import json
import os

import pytest

KEYS = ("text", "b")


@pytest.fixture
def work(tmp_path):
    from framework.tokenizer import embedded_tokenizer

    embedded_tokenizer().save(str(tmp_path / "tok"))
    _jsonl(tmp_path / "two.jsonl", 0)
    return tmp_path


def _jsonl(path, start, n=12):
    path.write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}", "b": f"{i}*3={3 * i}"})
                            + "\n" for i in range(start, start + n)))
    return path


def _preprocess(capsys, *argv):
    from data_tools import preprocess

    capsys.readouterr()
    rc = preprocess.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Fails the test if preprocess starts tokenizing."""
    import framework.data.indexed as indexed

    def refuse(*_args, **_kwargs):
        raise AssertionError("tokenizing started before the bad option was refused")

    monkeypatch.setattr(indexed, "preprocess", refuse)


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


def _first_run(work, capsys, out):
    rc, err = _preprocess(capsys, "--input", work / "two.jsonl", "--tokenizer", work / "tok",
                          "--output-prefix", out / "p", "--json-keys", *KEYS)
    assert rc == 0, err
    return _snapshot(out)


# --------------------------------------------------------------------------------------------
# outputs: checked before tokenizing, published all or nothing
# --------------------------------------------------------------------------------------------
def test_output_path_that_is_a_directory_refused_before_tokenizing(work, capsys, request):
    """The audit's case: `p_b_document.idx` made a directory after a first run; the second run
    replaced `p_text_document.bin/.idx` and `p_b_document.bin`, then failed naming
    `.preprocess._xxxx/p_b_document.idx`."""
    out = work / "o2"
    before = _first_run(work, capsys, out)
    os.remove(out / "p_b_document.idx")
    os.mkdir(out / "p_b_document.idx")
    del before["p_b_document.idx"]
    _jsonl(work / "two.jsonl", 100)  # other text: a replaced output would differ
    request.getfixturevalue("no_tokenizing")
    rc, err = _preprocess(capsys, "--input", work / "two.jsonl", "--tokenizer", work / "tok",
                          "--output-prefix", out / "p", "--json-keys", *KEYS)
    line = _one_line(err)
    assert rc == 2 and f"{out / 'p_b_document.idx'}: " in line and "directory" in line, line
    assert ".preprocess." not in line
    assert _snapshot(out) == before and (out / "p_b_document.idx").is_dir()
    assert not [p for p in os.listdir(out) if p.startswith(".preprocess")]


def test_output_that_is_a_symlink_to_a_directory_is_replaced(work, capsys):
    """An output path that is a symlink (here to a directory) is replaced by the new file, as
    before the directory check: only a real directory is refused; the link's target is kept."""
    out = work / "o3"
    out.mkdir()
    (work / "elsewhere").mkdir()
    (out / "p_text_document.idx").symlink_to(work / "elsewhere")
    _first_run(work, capsys, out)
    idx = out / "p_text_document.idx"
    assert idx.is_file() and not idx.is_symlink() and (work / "elsewhere").is_dir()


@pytest.mark.parametrize("earlier", ["all", "none", "text only"])
@pytest.mark.parametrize("hard_links", [True, False])
def test_failed_publish_restores_the_earlier_outputs(work, capsys, monkeypatch, earlier,
                                                     hard_links):
    """A move into place that fails after the checks (here the last one, `p_b_document.idx`):
    the outputs already moved are taken back and the earlier files put back, byte for byte; the
    error names the real output path."""
    out = work / "out"
    if earlier != "none":
        _first_run(work, capsys, out)
        if earlier == "text only":
            for ext in (".bin", ".idx"):
                os.remove(out / f"p_b_document{ext}")
    out.mkdir(exist_ok=True)
    (out / "other.txt").write_text("kept")
    before = _snapshot(out)
    _jsonl(work / "two.jsonl", 100)
    real_replace, target = os.replace, str(out / "p_b_document.idx")

    def replace(src, dst, *args, **kwargs):
        if str(dst) == target and ".preprocess." in str(src) and "earlier" not in str(src):
            raise OSError(28, "No space left on device", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    if not hard_links:
        def no_link(*_args, **_kwargs):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    rc, err = _preprocess(capsys, "--input", work / "two.jsonl", "--tokenizer", work / "tok",
                          "--output-prefix", out / "p", "--json-keys", *KEYS)
    line = _one_line(err)
    assert rc == 2 and line.startswith(f"error: {target}: ") and "No space left" in line, line
    assert ".preprocess." not in line
    assert _snapshot(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # no staging directory left


def test_successful_rerun_replaces_the_outputs(work, capsys):
    """The all-or-nothing publish still replaces earlier outputs when it succeeds."""
    out = work / "out"
    before = _first_run(work, capsys, out)
    _jsonl(work / "two.jsonl", 100)
    after = _first_run(work, capsys, out)
    assert sorted(after) == sorted(before) == sorted(
        f"p_{k}_document{e}" for k in KEYS for e in (".bin", ".idx"))
    assert all(after[name] != before[name] for name in after if name.endswith(".bin"))
    assert not [p for p in os.listdir(out) if p.startswith(".preprocess")]


# --------------------------------------------------------------------------------------------
# --split and --max-line-bytes where no input uses them
# --------------------------------------------------------------------------------------------
def _saved(path, split=None, dict_splits=None):
    import datasets

    rows = {"text": [f"{i}+{i}={2 * i}" for i in range(8)]}
    if dict_splits:
        datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in dict_splits}) \
            .save_to_disk(str(path))
    else:
        datasets.Dataset.from_dict(rows, split=split).save_to_disk(str(path))
    return path


def _refused(capsys, work, inputs, *extra, needle):
    out = work / "out"
    rc, err = _preprocess(capsys, "--input", *inputs, "--tokenizer", work / "tok",
                          "--output-prefix", out / "p", *extra)
    line = _one_line(err)
    assert rc == 2 and needle in line, line
    assert not out.exists() or not os.listdir(out)


def _accepted(capsys, work, inputs, *extra):
    rc, err = _preprocess(capsys, "--input", *inputs, "--tokenizer", work / "tok",
                          "--output-prefix", work / "ok" / "p", *extra)
    assert rc == 0, err
    assert (work / "ok" / "p_text_document.idx").is_file()


def test_split_on_jsonl_refused(work, capsys, no_tokenizing):
    _refused(capsys, work, [work / "two.jsonl"], "--split", "validation",
             needle="--split=validation: no input is a datasets dataset with splits")


def test_split_on_single_saved_dataset_refused(work, capsys, no_tokenizing):
    """A folder of one Dataset (save_to_disk) has no splits: --split nosuch did nothing.
    One that records the split it was made from is refused another split's name."""
    plain = _saved(work / "plain")
    _refused(capsys, work, [plain], "--split", "nosuch",
             needle="--split=nosuch: no input is a datasets dataset with splits")
    _refused(capsys, work, [work / "two.jsonl", plain], "--split", "train",
             needle="--split=train: no input is a datasets dataset with splits")
    validation = _saved(work / "validation", split="validation")
    _refused(capsys, work, [validation], "--split", "train",
             needle=f"{validation}: a single dataset (saved with save_to_disk) of split "
                    f"'validation', not --split='train'")


def test_split_accepted_where_an_input_has_it(work, capsys):
    """--split naming a split of a DatasetDict (also beside a JSON-lines input), or the split a
    single saved dataset records; and no --split at all on each kind of input."""
    both = _saved(work / "both", dict_splits=["train", "validation"])
    validation = _saved(work / "validation", split="validation")
    _accepted(capsys, work, [both], "--split", "validation")
    _accepted(capsys, work, [work / "two.jsonl", both], "--split", "validation")
    _accepted(capsys, work, [validation], "--split", "validation")
    for inputs in ([work / "two.jsonl"], [both], [validation], [_saved(work / "plain")]):
        _accepted(capsys, work, inputs)


def test_split_missing_from_dataset_dict_still_refused(work, capsys, no_tokenizing):
    both = _saved(work / "both", dict_splits=["train", "validation"])
    _refused(capsys, work, [both], "--split", "nosuch", needle=f"{both}: no split 'nosuch'")


def test_max_line_bytes_on_dataset_refused(work, capsys, no_tokenizing):
    plain = _saved(work / "plain")
    both = _saved(work / "both", dict_splits=["train"])
    for inputs in ([plain], [plain, both]):
        _refused(capsys, work, inputs, "--max-line-bytes", "5",
                 needle="--max-line-bytes=5: applies to JSON-lines inputs only")


def test_max_line_bytes_accepted_with_a_jsonl_input(work, capsys):
    plain = _saved(work / "plain")
    _accepted(capsys, work, [plain, work / "two.jsonl"], "--max-line-bytes", "1000")
    _accepted(capsys, work, [plain])  # the default is not refused on a dataset
    _refused(capsys, work, [plain], "--max-line-bytes", "0",
             needle="--max-line-bytes=0 must be >= 1")


def test_an_input_that_an_output_would_replace_is_refused(work, capsys, no_tokenizing):
    """--input named like one of the outputs (here a JSON-lines file called p_text_document.bin)
    was tokenized and then replaced by the token data: the input was lost. Now refused before any
    tokenizing; an output that is only a symlink to the input replaces the link, as before."""
    out = work / "o5"
    out.mkdir()
    given = out / "p_text_document.bin"
    _jsonl(given, 0)
    before = given.read_bytes()
    rc, err = _preprocess(capsys, "--input", given, "--tokenizer", work / "tok",
                          "--output-prefix", out / "p")
    line = _one_line(err)
    assert rc == 2 and f"--input {given} is also an output of --output-prefix=" in line, line
    assert given.read_bytes() == before


def test_ctrl_c_removes_the_staging_files_and_keeps_earlier_outputs(work, capsys):
    """Ctrl-C (SIGINT) printed a KeyboardInterrupt traceback. Now one line, exit 130, no staging
    directory (its `finally` removes it), the earlier outputs as they were. (SIGTERM still ends
    the tool at once and leaves the staging directory: turning it into an interrupt made forked
    pool workers print tracebacks or, reset in the workers, hang the pool.)"""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    out = work / "o6"
    before = _first_run(work, capsys, out)
    big = work / "big.jsonl"
    line = json.dumps({"text": "12+34=46 " * 50}) + "\n"
    big.write_text(line * 40000)
    p = subprocess.Popen([sys.executable, "-m", "data_tools.preprocess", "--input", str(big),
                          "--tokenizer", str(work / "tok"), "--output-prefix", str(out / "p"),
                          "--workers", "1"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         # a background job (CI under nohup) starts with SIGINT ignored, which
                         # Python then keeps: give the tool Ctrl-C as a terminal would
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and \
            not [n for n in os.listdir(out) if n.startswith(".preprocess")]:
        time.sleep(0.05)
    assert p.poll() is None, "preprocess ended before it could be stopped"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("error: interrupted (SIGINT)") and "Traceback" not in err, err
    assert not [n for n in os.listdir(out) if n.startswith(".preprocess")]
    assert _snapshot(out) == before


def test_text_the_tokenizer_does_not_cover_is_noted(work, capsys):
    """English text through the embedded arithmetic tokenizer: 85% of the tokens were <unk>,
    silently. Now a note says so (the outputs are still written); arithmetic text gets none."""
    (work / "eng.jsonl").write_text(json.dumps({"text": "hello world this is english"}) + "\n")
    rc, err = _preprocess(capsys, "--input", work / "eng.jsonl", "--tokenizer", work / "tok",
                          "--output-prefix", work / "o7" / "e")
    assert rc == 0 and "of the 27 tokens under 'text' (85%) are the tokenizer's unknown token" \
        in err, err
    rc, err = _preprocess(capsys, "--input", work / "two.jsonl", "--tokenizer", work / "tok",
                          "--output-prefix", work / "o7" / "a")
    assert rc == 0 and "unknown token" not in err, err


def test_an_interrupt_after_the_outputs_are_in_place_says_so():
    """A Ctrl-C while the tool cleans up after publishing (removing a replaced checkpoint can
    take seconds) must not say "earlier outputs are kept", which is then false."""
    from data_tools import interrupted_line, mark_published, start_run

    start_run()
    assert "earlier outputs are kept" in interrupted_line(KeyboardInterrupt())
    mark_published()
    line = interrupted_line(KeyboardInterrupt())
    assert line.startswith("error: interrupted (SIGINT) after the outputs were in place"), line
    start_run()  # a new run starts unpublished
    assert "earlier outputs are kept" in interrupted_line(KeyboardInterrupt())
