"""Megatron indexed files (`.bin`/`.idx`) as Megatron-LM writes them, and corrupted ones refused.

* Empty and whitespace-only documents: Megatron-LM's tools/preprocess_data.py keeps a document
  whose text gives no tokens as a document boundary with no sequence (and no EOD), with and
  without --append-eod. Counted with megatron-core's own `IndexedDataset`.
* Output files follow the umask (they used to be 0600, from mkstemp).
* Corrupted files (truncated, bit-flipped, wrong version or magic), generated with hypothesis:
  `check_indexed` refuses them with one line naming the file, or the damage left a valid dataset
  that megatron-core reads without error (e.g. a flipped token id that is still in the
  vocabulary: the format has no checksum). Never a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools.preprocess import main as preprocess_main
from framework.config import ConfigError
from framework.data.indexed import check_indexed, read_index

# documents: text, empty, whitespace only, text, whitespace only, text
DOCS = ["The cat sat.", "", "   ", "The cats sat! The cat sat.", "\n\t ", "cat"]


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory) -> str:
    """A BERT-style WordPiece tokenizer built offline: whitespace gives no tokens."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s", ".",
             "[EOS]"]
    raw = RawTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 eos_token="[EOS]")
    d = tmp_path_factory.mktemp("wordpiece")
    hf.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory) -> str:
    """The embedded character tokenizer: whitespace gives tokens (one per character)."""
    from framework.tokenizer import embedded_tokenizer

    d = tmp_path_factory.mktemp("embedded")
    embedded_tokenizer().save(str(d))
    return str(d)


def _run(tmp_path, tok, docs, *extra, name="out"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    code = preprocess_main(["--input", str(src), "--tokenizer", tok, "--output-prefix",
                            str(tmp_path / name), "--no-progress",
                            *extra])
    assert code == 0
    level = "sentence" if "--split-sentences" in extra else "document"
    return str(tmp_path / f"{name}_text_{level}")


def _megatron_reference(tok_dir, docs, append_eod, split):
    """Megatron-LM's rule, spelled out: the non-empty token lists of a document's sentences are
    its sequences; --append-eod adds the EOD to the last one, if there is one."""
    from framework.config import TokenizerConfig
    from framework.data.sentences import split_sentences
    from framework.tokenizer import build_tokenizer

    tok = build_tokenizer(TokenizerConfig(path=tok_dir))
    seqs, doc_idx = [], [0]
    for text in docs:
        pieces = [p for p in (tok.encode(s) for s in (split_sentences(text) if split
                                                        else [text])) if p]
        if pieces and append_eod:
            pieces[-1] = pieces[-1] + [tok.eod]
        seqs += pieces
        doc_idx.append(len(seqs))
    return seqs, doc_idx


@pytest.mark.parametrize("split", [False, True], ids=["document", "sentence"])
@pytest.mark.parametrize("eod", [False, True], ids=["no-eod", "append-eod"])
def test_empty_documents_are_boundaries_without_sequences(tmp_path, wordpiece_dir, eod, split):
    extra = (["--append-eod"] if eod else []) + (["--split-sentences"] if split else [])
    prefix = _run(tmp_path, wordpiece_dir, DOCS, *extra)
    ds = IndexedDataset(prefix)
    # 6 documents; the empty one and both whitespace-only ones hold no sequence
    assert len(ds.document_indices) - 1 == 6
    n_seq = 4 if split else 3  # "The cats sat! The cat sat." is two sentences
    assert len(ds) == n_seq
    assert ds.document_indices.tolist() == [0, 1, 1, 1, n_seq - 1, n_seq - 1, n_seq]
    seqs, doc_idx = _megatron_reference(wordpiece_dir, DOCS, eod, split)
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds.document_indices.tolist() == doc_idx
    assert sum(len(s) for s in seqs) == int(ds.sequence_lengths.sum())
    if eod:  # one EOD per document that has a sequence, none for the empty ones
        assert sum(s.count(10) for s in seqs) == 3


@pytest.mark.parametrize("eod", [False, True], ids=["no-eod", "append-eod"])
def test_whitespace_that_tokenizes_is_a_sequence(tmp_path, embedded_dir, eod):
    """With a tokenizer that keeps whitespace, a whitespace-only document has tokens, so it is a
    sequence (Megatron-LM decides by the token list, not by the text)."""
    docs = ["1+1=2\n", "", "   ", "7*8=56\n"]
    prefix = _run(tmp_path, embedded_dir, docs, *(["--append-eod"] if eod else []))
    ds = IndexedDataset(prefix)
    assert ds.document_indices.tolist() == [0, 1, 1, 2, 3]
    seqs, doc_idx = _megatron_reference(embedded_dir, docs, eod, False)
    assert [ds[i].tolist() for i in range(len(ds))] == seqs and len(seqs) == 3


@pytest.mark.parametrize("split", [False, True], ids=["document", "sentence"])
def test_prepend_bos_starts_each_document_with_bos(tmp_path, wordpiece_dir, split, capsys):
    """--prepend-bos: BOS first in every document that has tokens (its first sentence when
    split), EOD last; empty documents stay boundaries. A tokenizer without BOS is refused."""
    from framework.tokenizer import embedded_mlm_tokenizer

    d = tmp_path / "mlm"
    tok = embedded_mlm_tokenizer()
    tok.save(str(d))
    bos, eod = tok.hf.bos_token_id, tok.eod
    assert bos is not None and bos != eod
    docs = ["1+1=2. 3+4=7.", "", "7*8=56"]
    extra = ["--prepend-bos", "--append-eod"] + (["--split-sentences"] if split else [])
    ds = IndexedDataset(_run(tmp_path, str(d), docs, *extra))
    seqs = [ds[i].tolist() for i in range(len(ds))]
    starts = ds.document_indices.tolist()
    firsts = [seqs[starts[k]] for k in range(len(docs)) if starts[k + 1] > starts[k]]
    assert len(firsts) == 2 and all(s[0] == bos for s in firsts)
    assert sum(s.count(bos) for s in seqs) == 2 and seqs[-1][-1] == eod
    plain = IndexedDataset(_run(tmp_path, str(d), docs, *extra[1:], name="plain"))
    assert int(ds.sequence_lengths.sum()) == int(plain.sequence_lengths.sum()) + 2
    src = tmp_path / "nobos.jsonl"
    src.write_text(json.dumps({"text": "the cat"}) + "\n")
    code = preprocess_main(["--input", str(src), "--tokenizer", wordpiece_dir,
                            "--output-prefix", str(tmp_path / "nobos"), "--prepend-bos"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prepend-bos" in err[0] and "no BOS" in err[0]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(tmp_path, embedded_dir, umask, mode):
    old = os.umask(umask)
    try:
        prefix = _run(tmp_path, embedded_dir, ["1+1=2\n", "3+4=7\n"], "--append-eod")
    finally:
        os.umask(old)
    for suffix in (".bin", ".idx"):
        assert oct(os.stat(prefix + suffix).st_mode & 0o777) == oct(mode), suffix
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out_text_document.bin",
                                           "out_text_document.idx"]


# --------------------------------------------------------------------------------------------
# corrupted .idx / .bin files: hypothesis
# --------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
VOCAB = 19  # the embedded tokenizer's
KINDS = Counter()  # (kind, outcome) -> count, printed at the end (pytest -s)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory, embedded_dir):
    tmp = tmp_path_factory.mktemp("good")
    docs = ["12+35=47\n", "", "7*8=56\n", "93-41=52\n", "1 2\n"] * 3
    prefix = _run(tmp, embedded_dir, docs, "--append-eod")
    check_indexed(prefix, VOCAB)
    return {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")}


def _outcome(prefix: str) -> str:
    """'refused' (one ConfigError line naming a file of the pair) or 'valid' (then megatron-core
    must read every sequence without error)."""
    try:
        check_indexed(prefix, VOCAB)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and os.path.basename(prefix) in msg, msg
        return "refused"
    ds = IndexedDataset(prefix)
    total = sum(int(ds[i].shape[0]) for i in range(len(ds)))
    assert total == int(ds.sequence_lengths.sum())
    assert all(0 <= int(ds[i].min(initial=0)) and int(ds[i].max(initial=0)) < VOCAB
               for i in range(len(ds)))
    return "valid"


def _write(d: Path, files) -> str:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for suffix, data in files.items():
        (d / f"x{suffix}").write_bytes(data)
    return str(d / "x")


@st.composite
def corruptions(draw, good):
    kind = draw(st.sampled_from(["truncate", "bitflip", "version", "magic"]))
    which = draw(st.sampled_from([".idx", ".bin"])) if kind in ("truncate", "bitflip") \
        else ".idx"
    data = bytearray(good[which])
    if kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "bitflip":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "version":
        version = draw(st.integers(0, 2**64 - 1).filter(lambda v: v != 1))
        data[9:17] = struct.pack("<Q", version)
    else:
        pos = draw(st.integers(0, 8))
        data[pos] = draw(st.integers(0, 255).filter(lambda b: b != data[pos]))
    files = dict(good)
    files[which] = bytes(data)
    return f"{kind}{which}", files


def test_corrupted_indexed_files_are_refused_in_one_line(good_files, tmp_path):
    # truncation, a wrong version and a wrong magic are always found; a flipped bit is found
    # unless the files still describe a valid dataset (then mcore must read it cleanly)
    must_refuse = {"truncate.idx", "truncate.bin", "version.idx", "magic.idx"}

    @settings(max_examples=max(1, int(400 * SCALE)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(corruptions(good_files))
    def check(case):
        kind, files = case
        out = _outcome(_write(tmp_path / "case", files))
        KINDS[(kind, out)] += 1
        if kind in must_refuse:
            assert out == "refused", kind

    check()
    print("\ncorrupted indexed files:", dict(sorted(KINDS.items())))
    for kind in ("truncate.idx", "truncate.bin", "bitflip.idx", "bitflip.bin", "version.idx"):
        assert any(k == kind for k, _ in KINDS), f"hypothesis never tried {kind}"


def test_every_bit_of_the_index_header_and_arrays(good_files, tmp_path):
    """Exhaustive over the .idx: each single bit flip is refused, except those in the document
    index that leave it a valid (non-decreasing, 0 .. sequence count) index."""
    idx = good_files[".idx"]
    outcomes = Counter()
    info_docs = 16  # 15 documents + 1
    doc_start = len(idx) - 8 * info_docs
    for pos in range(len(idx)):
        for bit in range(8):
            data = bytearray(idx)
            data[pos] ^= 1 << bit
            out = _outcome(_write(tmp_path / "bit", {".bin": good_files[".bin"],
                                                     ".idx": bytes(data)}))
            outcomes[out] += 1
            if out == "valid":
                assert pos >= doc_start, (pos, bit)
    print(f"\n.idx single-bit flips: {dict(outcomes)} of {8 * len(idx)}")
    assert outcomes["refused"] > 0.9 * 8 * len(idx)
