"""Tests of the data layer: tokenizers, preprocessing, indexed-file checks, the embedded corpus,
mcore dataset building and the resumable micro-batch iterator. CPU only, small data."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import pre_tokenizers
from transformers import GPT2TokenizerFast

from data_tools import preprocess as preprocess_cli
from framework.config import ConfigError, DataConfig, TokenizerConfig
from framework.data import MicroBatchIterator, build_datasets
from framework.data.embedded import (
    embedded_tokenizer_dir,
    heldout_problems,
    prepare_embedded,
    training_documents,
)
from framework.data.indexed import check_indexed, preprocess
from framework.tokenizer import (
    MegatronTokenizerAdapter,
    Tokenizer,
    build_tokenizer,
    embedded_tokenizer,
)
from helpers import start

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "hello world",
    "hello hello world\nworld héllo ✓",
    "",
    "  leading spaces and\ttabs, digits 12345 and symbols !?*",
]
ARITH = ["12+35=47\n7*8=56\n", "93-41=52\n", "", "1 2\n"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _write_gpt2_files(directory: Path) -> Dict[str, str]:
    """A tiny byte-level BPE (all 256 byte symbols + a few merges) in GPT-2's file format."""
    directory.mkdir(parents=True, exist_ok=True)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
              ("Ġw", "or"), ("Ġwor", "l"), ("Ġworl", "d")]
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return {"vocab_file": str(directory / "vocab.json"),
            "merge_file": str(directory / "merges.txt")}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2")
    _write_gpt2_files(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return build_tokenizer(TokenizerConfig(vocab_file=str(gpt2_dir / "vocab.json"),
                                           merge_file=str(gpt2_dir / "merges.txt")))


@pytest.fixture(scope="module")
def embedded() -> Tokenizer:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("embedded"))


def _read_all(prefix: str) -> List[List[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _expected(tokenizer: Tokenizer, texts: List[str], append_eod: bool) -> List[List[int]]:
    """One sequence per document with tokens; a document without any has none (Megatron-LM)."""
    return [ids + ([tokenizer.eod] if append_eod else [])
            for ids in map(tokenizer.encode, texts) if ids]


def _write_jsonl(path: Path, records: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _cli_env() -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
def test_embedded_tokenizer_ids_and_save_roundtrip(embedded, tmp_path):
    assert (embedded.eod, embedded.bos, embedded.pad) == (0, 0, 1)
    assert embedded.vocab_size == 19
    ids = embedded.encode("12+35=47\n")
    assert ids == [4, 5, 13, 6, 8, 16, 7, 10, 18]
    assert embedded.decode(ids) == "12+35=47\n"
    assert embedded.encode("7 x") == [10, 17, 2]  # unknown char -> <unk>

    embedded.save(str(tmp_path / "tok"))
    for loaded in (build_tokenizer(TokenizerConfig(path=str(tmp_path / "tok"))),
                   build_tokenizer(TokenizerConfig(), default_dir=str(tmp_path / "tok"))):
        assert loaded.vocab_size == embedded.vocab_size
        assert (loaded.eod, loaded.pad) == (embedded.eod, embedded.pad)
        for text in ARITH:
            assert loaded.encode(text) == embedded.encode(text)
        assert loaded.fingerprint() == embedded.fingerprint()


def test_gpt2_bpe_matches_transformers(gpt2, gpt2_dir):
    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    assert gpt2.vocab_size == len(reference)
    assert gpt2.eod == gpt2.pad == reference.eos_token_id
    assert gpt2.encode("hello world") == [259, 264]  # merges applied
    for text in TEXTS:
        assert gpt2.encode(text) == reference.encode(text)
        assert gpt2.decode(gpt2.encode(text)) == text
    # a directory holding just vocab.json + merges.txt loads as GPT-2 BPE too
    assert build_tokenizer(TokenizerConfig(path=str(gpt2_dir))).encode(TEXTS[1]) == \
        gpt2.encode(TEXTS[1])


def test_build_tokenizer_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("{not json")
    (garbage / "tokenizer_config.json").write_text("{}")
    cases = [
        (TokenizerConfig(path=str(tmp_path / "missing")), {}, "tokenizer.path"),
        (TokenizerConfig(path="./no/such/dir"), {}, "tokenizer.path"),
        (TokenizerConfig(path=str(garbage)), {}, "tokenizer.path"),
        (TokenizerConfig(vocab_file=str(tmp_path / "v.json"),
                         merge_file=str(tmp_path / "m.txt")), {}, "tokenizer.vocab_file"),
        (TokenizerConfig(), {"default_dir": str(tmp_path / "ckpt" / "tokenizer")}, "tokenizer"),
        (TokenizerConfig(), {}, "tokenizer.path"),
    ]
    for cfg, kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            build_tokenizer(cfg, **kwargs)
        message = str(info.value)
        assert field in message and "\n" not in message
        path = cfg.path or cfg.vocab_file or kwargs.get("default_dir")
        if path:
            assert path in message


def test_megatron_adapter(embedded, gpt2):
    adapter = MegatronTokenizerAdapter(embedded)
    assert (adapter.vocab_size, adapter.eod, adapter.pad) == (19, 0, 1)
    json.dumps(adapter.unique_identifiers)  # mcore hashes it into the cache file names
    with pytest.raises(AttributeError):  # pad == eod: mcore falls back to -1, no warning
        MegatronTokenizerAdapter(gpt2).pad


# --------------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["embedded", "gpt2"])
def test_preprocess_roundtrip(kind, workers, embedded, gpt2, tmp_path):
    tokenizer, texts = (embedded, ARITH) if kind == "embedded" else (gpt2, TEXTS)
    texts = texts * 50
    for append_eod in (True, False):
        prefix = str(tmp_path / f"out_{append_eod}")
        preprocess(iter(texts), tokenizer, prefix, append_eod=append_eod, workers=workers,
                   progress=False)
        assert _read_all(prefix) == _expected(tokenizer, texts, append_eod)
        index = IndexedDataset(prefix)
        assert index.index.dtype == numpy.uint16
        assert len(index.document_indices) == len(texts) + 1
        check_indexed(prefix, tokenizer.vocab_size)
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"out_{e}.{s}" for e in (True, False) for s in ("bin", "idx"))


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_is_atomic(workers, embedded, tmp_path):
    prefix = str(tmp_path / "data")
    preprocess(ARITH, embedded, prefix, progress=False)
    before = {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")}

    def failing():
        yield "1+1=2\n"
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError):
        preprocess(failing(), embedded, prefix, workers=workers, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    assert before == {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")}


CLI_RECORDS = [{"text": t, "title": t.upper()} for t in TEXTS * 20]


@pytest.fixture(scope="module")
def cli_runs(gpt2, gpt2_dir, tmp_path_factory) -> Dict[str, tuple]:
    """Run `python -m data_tools.preprocess` several ways at once (interpreter start-up with
    torch and megatron-core dominates, so the runs share it): name -> (process, out_dir)."""
    tmp = tmp_path_factory.mktemp("cli")
    jsonl = _write_jsonl(tmp / "in.jsonl", CLI_RECORDS)
    bad = _write_jsonl(tmp / "bad.jsonl", [{"text": "hello"}, {"body": "x"}])
    gpt2.save(str(tmp / "saved_tok"))
    bpe_files = ["--vocab-file", str(gpt2_dir / "vocab.json"),
                 "--merge-file", str(gpt2_dir / "merges.txt")]
    runs = {
        "workers1": ([str(jsonl), str(jsonl)], ["--tokenizer", str(tmp / "saved_tok")], 1),
        "workers2": ([str(jsonl), str(jsonl)], bpe_files, 2),
        "bad": ([str(bad)], ["--tokenizer", str(gpt2_dir)], 2),
    }
    procs = {}
    for name, (inputs, tokenizer_args, workers) in runs.items():
        out_dir = tmp / name
        procs[name] = (start(
            "-m", "data_tools.preprocess", "--input", *inputs, "--json-keys", "text", "title",
            *tokenizer_args, "--append-eod", "--workers", str(workers), "--output-prefix",
            str(out_dir / "c"), cwd=REPO, env=_cli_env()), out_dir)
    results = {}
    for name, (proc, out_dir) in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, err, out_dir, str(bad))
    return results


@pytest.mark.parametrize("run", ["workers1", "workers2"])
def test_cli_roundtrip(run, cli_runs, gpt2):
    code, out, err, out_dir, _ = cli_runs[run]
    assert code == 0, err
    for key in ("text", "title"):
        prefix = str(out_dir / f"c_{key}_document")
        texts = [r[key] for r in CLI_RECORDS] * 2
        assert _read_all(prefix) == _expected(gpt2, texts, append_eod=True)
        assert prefix in out


def test_cli_bad_input_subprocess(cli_runs):
    code, _, err, out_dir, bad = cli_runs["bad"]
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{bad}:2" in lines[0] and "'text'" in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_cli_bad_input_messages(gpt2_dir, tmp_path, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "a"}\n{"text": \n')
    wrong_type = _write_jsonl(tmp_path / "typed.jsonl", [{"text": 3}])
    out = tmp_path / "out"
    cases = [
        ([str(good), str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([str(not_json)], f"{not_json}:2"),
        ([str(good), str(wrong_type)], f"{wrong_type}:1"),
    ]
    for inputs, needle in cases:
        code = preprocess_cli.main(["--input", *inputs, "--tokenizer", str(gpt2_dir),
                                    "--output-prefix", str(out / "c")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and "\n" not in err
        assert not out.exists() or os.listdir(out) == []
    code = preprocess_cli.main(["--input", str(good), "--output-prefix", str(out / "c")])
    assert code == 2 and "--tokenizer" in capsys.readouterr().err


def test_cli_datasets_dir(gpt2, gpt2_dir, tmp_path):
    import datasets

    texts = TEXTS * 3
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    code = preprocess_cli.main(["--input", str(tmp_path / "ds"), "--tokenizer", str(gpt2_dir),
                                "--output-prefix", str(tmp_path / "o"), "--append-eod"])
    assert code == 0
    assert _read_all(str(tmp_path / "o_text_document")) == _expected(gpt2, texts, True)


# --------------------------------------------------------------------------------------------
# check_indexed
# --------------------------------------------------------------------------------------------
def test_check_indexed_errors(gpt2, tmp_path):
    def fresh(name: str) -> str:
        prefix = str(tmp_path / name)
        preprocess(TEXTS * 5, gpt2, prefix, progress=False)
        check_indexed(prefix, gpt2.vocab_size)
        return prefix

    def expect(prefix: str, suffix: str, needle: str, vocab_size=None) -> None:
        with pytest.raises(ConfigError) as info:
            check_indexed(prefix, vocab_size)
        message = str(info.value)
        assert prefix + suffix in message and needle in message and "\n" not in message

    prefix = fresh("no_bin")
    os.remove(prefix + ".bin")
    expect(prefix, ".bin", "does not exist")

    prefix = fresh("no_idx")
    os.remove(prefix + ".idx")
    expect(prefix, ".idx", "does not exist")

    prefix = fresh("short_bin")
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    expect(prefix, ".bin", "truncated")

    prefix = fresh("long_bin")
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    expect(prefix, ".bin", "describes")

    prefix = fresh("bad_magic")
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    expect(prefix, ".idx", "header")

    prefix = fresh("bad_version")
    with open(prefix + ".idx", "r+b") as f:
        f.seek(9)
        f.write((7).to_bytes(8, "little"))
    expect(prefix, ".idx", "version")

    prefix = fresh("short_idx")
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    expect(prefix, ".idx", "truncated")

    prefix = fresh("vocab")
    expect(prefix, ".bin", "token id", vocab_size=100)  # ids reach 256+
    check_indexed(prefix)  # no vocab given: ids not checked

    # the id scan is remembered in a cache dir, keyed by the .bin's path, size and mtime
    memo_dir = tmp_path / "memo"
    check_indexed(prefix, gpt2.vocab_size, cache_dir=str(memo_dir))
    assert len(os.listdir(memo_dir)) == 1
    with pytest.raises(ConfigError, match="token id"):
        check_indexed(prefix, 100, cache_dir=str(memo_dir))
    preprocess(["!!"], gpt2, prefix, append_eod=False, progress=False)  # ids: [0, 0]
    check_indexed(prefix, 100, cache_dir=str(memo_dir))  # new data: scanned again
    assert len(os.listdir(memo_dir)) == 2


# --------------------------------------------------------------------------------------------
# embedded corpus
# --------------------------------------------------------------------------------------------
def _prepare_in_child(cache_dir: str, queue) -> None:
    queue.put(prepare_embedded(cache_dir, 300))


def test_embedded_corpus_deterministic_and_cached(tmp_path):
    a = prepare_embedded(str(tmp_path / "a"), 300)
    b = prepare_embedded(str(tmp_path / "b"), 300)
    for suffix in (".bin", ".idx"):
        assert Path(a + suffix).read_bytes() == Path(b + suffix).read_bytes()
    jsonl = Path(a).parent / "corpus.jsonl"
    assert jsonl.read_bytes() == (Path(b).parent / "corpus.jsonl").read_bytes()
    mtime = os.stat(a + ".bin").st_mtime_ns
    assert prepare_embedded(str(tmp_path / "a"), 300) == a
    assert os.stat(a + ".bin").st_mtime_ns == mtime  # reused, not rebuilt
    tok = build_tokenizer(TokenizerConfig(path=embedded_tokenizer_dir(a)))
    docs = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert _read_all(a) == _expected(tok, docs, append_eod=True)
    assert docs == list(training_documents(300))


def test_embedded_prepare_concurrent(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    check_indexed(results[0], embedded_tokenizer().vocab_size)
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == [
        os.path.basename(os.path.dirname(results[0]))]


def test_embedded_heldout_never_in_training():
    heldout = heldout_problems(200)
    assert len(heldout) == len(set(heldout)) == 200
    assert heldout == heldout_problems(200)
    for prompt, answer in heldout:
        assert prompt.endswith("=") and eval(prompt[:-1]) == int(answer)  # noqa: S307
    prompts = {p for p, _ in heldout_problems(1000)}
    seen = set()
    for doc in training_documents(3000):
        lines = doc.splitlines()
        assert 4 <= len(lines) <= 8 and doc.endswith("\n")
        for line in lines:
            prompt, answer = line.split("=")
            assert eval(prompt) == int(answer)  # noqa: S307
            seen.add(prompt + "=")
    assert not prompts & seen
    assert len(seen) > 2000  # the training set covers most non-held-out problems


# --------------------------------------------------------------------------------------------
# build_datasets
# --------------------------------------------------------------------------------------------
def _check_sample(sample: Dict[str, torch.Tensor], seq: int) -> None:
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert "attention_mask" not in sample
    for key, dtype in (("tokens", torch.int64), ("labels", torch.int64),
                       ("loss_mask", torch.float32), ("position_ids", torch.int64)):
        assert sample[key].shape == (seq,) and sample[key].dtype == dtype
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_build_datasets_embedded(embedded, gpt2, corpus_dir):
    cfg = DataConfig(type="embedded", num_documents=400, split="90,10,0")
    train, valid, test = build_datasets(cfg, embedded, seq_length=64, seed=3,
                                        num_samples=(100, 20, 0), cache_dir=corpus_dir)
    assert test is None and len(train) >= 100 and len(valid) >= 20
    for ds in (train, valid):
        _check_sample(ds[0], 64)
    sample = train[0]
    assert torch.equal(sample["position_ids"], torch.arange(64))
    assert int(sample["tokens"].max()) < embedded.vocab_size
    # the cache of mcore's indices goes beside the data
    assert os.listdir(os.path.join(os.path.dirname(train.dataset.path_prefix), "cache"))
    again, _, _ = build_datasets(cfg, embedded, seq_length=64, seed=3,
                                 num_samples=(100, 20, 0), cache_dir=corpus_dir)
    assert torch.equal(again[7]["tokens"], train[7]["tokens"])

    with pytest.raises(ConfigError, match="embedded tokenizer"):
        build_datasets(cfg, gpt2, seq_length=64, seed=3, num_samples=(10, 0, 0),
                       cache_dir=corpus_dir)


def test_build_datasets_reset_and_mask(embedded, corpus_dir):
    # unpacked documents (data=embedded packs one per sample), read as indexed data
    prefix = prepare_embedded(corpus_dir, 400)
    cfg = DataConfig(type="indexed", path=[prefix], split="1,0,0", reset_position_ids=True,
                     eod_mask_loss=True)
    train, _, _ = build_datasets(cfg, embedded, seq_length=64, seed=3,
                                 num_samples=(50, 0, 0), cache_dir=corpus_dir)
    sample = train[0]
    eod = sample["tokens"] == embedded.eod
    assert eod.any()
    assert torch.all(sample["loss_mask"][eod] == 0)
    first = int(torch.nonzero(eod)[0])
    assert int(sample["position_ids"][first + 1]) == 0


def test_build_datasets_mock(embedded):
    train, valid, test = build_datasets(DataConfig(type="mock"), embedded, seq_length=32,
                                        seed=1, num_samples=(64, 8, 0), cache_dir=None)
    assert test is None
    _check_sample(train[0], 32)
    _check_sample(valid[0], 32)


def test_build_datasets_indexed_blend_and_errors(embedded, gpt2, tmp_path):
    docs = list(training_documents(200))
    a, b = str(tmp_path / "a" / "x_text_document"), str(tmp_path / "b" / "y_text_document")
    preprocess(docs[:100], embedded, a, progress=False)
    preprocess(docs[100:], embedded, b, progress=False)

    cfg = DataConfig(type="indexed", path=[a], split="98,2,0")
    train, valid, test = build_datasets(cfg, embedded, seq_length=16, seed=1,
                                        num_samples=(40, 4, 0), cache_dir=None)
    _check_sample(train[0], 16)
    assert os.path.isdir(tmp_path / "a" / "cache")

    cfg = DataConfig(type="indexed", path=["0.25", a, "0.75", b], split="98,2,0",
                     path_to_cache=str(tmp_path / "idx_cache"))
    train, valid, _ = build_datasets(cfg, embedded, seq_length=16, seed=1,
                                     num_samples=(40, 4, 0), cache_dir=None)
    assert len(train) == 40 and len(valid) == 4
    ids = [int(train[i]["dataset_id"]) for i in range(40)]
    assert ids.count(1) == 30
    _check_sample(train[0], 16)

    def fails(needle: str, **kwargs) -> None:
        args = dict(cfg=DataConfig(type="indexed", path=[a]), tokenizer=embedded,
                    num_samples=(40, 4, 0))
        args.update(kwargs)
        with pytest.raises(ConfigError) as info:
            build_datasets(args["cfg"], args["tokenizer"], seq_length=16, seed=1,
                           num_samples=args["num_samples"], cache_dir=None)
        assert needle in str(info.value) and "\n" not in str(info.value)

    # the valid split is needed but empty (by the split string, or for lack of documents)
    fails("data.split", cfg=DataConfig(type="indexed", path=[a], split="100,0,0"))
    fails("data.split", cfg=DataConfig(type="indexed", path=[a], split="949,50,1"),
          num_samples=(40, 4, 4))
    # ... while an empty split nobody needs is fine (mcore would loop forever on it)
    build_datasets(DataConfig(type="indexed", path=[a], split="949,50,1"), embedded,
                   seq_length=16, seed=1, num_samples=(40, 4, 0), cache_dir=None)
    # data made with another tokenizer
    g = str(tmp_path / "g" / "z_text_document")
    preprocess(TEXTS * 20, gpt2, g, progress=False)
    fails(g + ".bin", cfg=DataConfig(type="indexed", path=[g]))
    fails(str(tmp_path / "nope.bin"), cfg=DataConfig(type="indexed", path=[str(tmp_path / "nope")]))
    fails("data.path", cfg=DataConfig(type="indexed", path=["0.5", a, "x", b]))
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails("data.path_to_cache",
          cfg=DataConfig(type="indexed", path=[a], path_to_cache=str(blocker / "sub")))


# --------------------------------------------------------------------------------------------
# MicroBatchIterator
# --------------------------------------------------------------------------------------------
class _IndexDataset(torch.utils.data.Dataset):
    """Sample i is filled with i, to check the sample layout."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"tokens": torch.full((4,), i), "labels": torch.full((4,), i),
                "loss_mask": torch.ones(4), "position_ids": torch.arange(4),
                "attention_mask": None}


def _sample_ids(batch: Dict[str, torch.Tensor]) -> List[int]:
    return batch["tokens"][:, 0].tolist()


def test_micro_batches_layout_and_dp_disjoint():
    data = _IndexDataset(1000)
    gbs, mbs, dp = 24, 3, 2
    per_rank = [MicroBatchIterator(data, micro_batch_size=mbs, global_batch_size=gbs,
                                   dp_rank=r, dp_size=dp, consumed_samples=48)
                for r in range(dp)]
    assert per_rank[0].num_micro_batches == 4
    seen = []
    for it in per_rank:
        ids = [i for batch in it.next_global_batch() for i in _sample_ids(batch)]
        assert it.consumed_samples == 48 + gbs
        seen.append(ids)
    assert seen[0][:3] == [48, 49, 50] and seen[1][:3] == [51, 52, 53]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(48, 48 + gbs))
    batch = next(per_rank[0])
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (mbs, 4) and batch["loss_mask"].dtype == torch.float32

    wrap = MicroBatchIterator(_IndexDataset(10), micro_batch_size=4, global_batch_size=4,
                              consumed_samples=8)
    assert _sample_ids(next(wrap)) == [8, 9, 0, 1]
    with pytest.raises(ConfigError, match="global_batch_size"):
        MicroBatchIterator(data, micro_batch_size=3, global_batch_size=8, dp_size=2)


def test_micro_batches_resume(embedded, corpus_dir):
    cfg = DataConfig(type="embedded", num_documents=400, split="1,0,0")
    train, _, _ = build_datasets(cfg, embedded, seq_length=64, seed=5,
                                 num_samples=(200, 0, 0), cache_dir=corpus_dir)
    kwargs = dict(micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2)
    first = MicroBatchIterator(train, **kwargs)
    for _ in range(3):
        first.next_global_batch()
    consumed = first.consumed_samples
    assert consumed == 24
    expected = [first.next_global_batch() for _ in range(2)]
    for workers in (0, 1):
        resumed = MicroBatchIterator(train, consumed_samples=consumed, num_workers=workers,
                                     **kwargs)
        got = [resumed.next_global_batch() for _ in range(2)]
        for want_gb, got_gb in zip(expected, got):
            for want, have in zip(want_gb, got_gb):
                assert want.keys() == have.keys()
                assert all(torch.equal(want[k], have[k]) for k in want)


@pytest.mark.parametrize("setting, on_gpu, pinned", [
    (None, True, True), (True, True, True), (False, True, False), (None, False, False),
    (True, False, False)])
def test_pin_memory_rule_and_pinned_batches(monkeypatch, setting, on_gpu, pinned):
    """data.pin_memory: null pins on a GPU run, false never, and a CPU run never (no GPU to copy
    to). Pinned batches come from `Tensor.pin_memory` on every tensor of the in-process path
    (CPU torch cannot page-lock, so the call is recorded, not made); the loader-worker path hands
    the flag to torch's DataLoader (GPU test: tests/test_gpu_fast.py, data.num_workers=2)."""
    from types import SimpleNamespace

    from framework.config import TrainConfig
    from framework.training.data import build_train_data

    samples = [{"tokens": [i, i + 1], "labels": [i + 1, i + 2], "loss_mask": [1, 1],
                "position_ids": [0, 1]} for i in range(8)]
    parts = SimpleNamespace(datasets=lambda *a, **k: (samples, samples, None))
    data = build_train_data(DataConfig(type="mock", pin_memory=setting), None,
                            TrainConfig(micro_batch_size=2, global_batch_size=2, max_steps=4,
                                        eval_interval=0), None, parts,
                            dp_rank=0, dp_size=1, on_gpu=on_gpu)
    assert data.pin_memory is pinned
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, *a: calls.append(tuple(self.shape)) or self, raising=False)
    batch = next(data.train_iterators(1, 0)[0])
    assert torch.equal(batch["tokens"], torch.tensor([[0, 1], [1, 2]]))
    assert len(calls) == (len(batch) if pinned else 0)


def test_embedded_gpt_samples_start_with_a_problem_and_train_on_answers(embedded, corpus_dir):
    """data=embedded packs whole lines into documents of seq_length tokens, so each sample
    starts with a problem at position 0 (as a generation prompt does), and its loss mask keeps
    the answers (digits after `=` and the newline) only."""
    from framework.data.embedded import packed_documents

    docs = list(packed_documents(50, 64))
    assert all(len(d) == 63 and d.endswith("\n") for d in docs)
    cfg = DataConfig(type="embedded", num_documents=400, split="90,10,0")
    train, valid, _ = build_datasets(cfg, embedded, seq_length=64, seed=3,
                                     num_samples=(40, 8, 0), cache_dir=corpus_dir)
    for ds in (train, valid):
        for i in range(8):
            s = ds[i]
            _check_sample(s, 64)
            chars = ["\n" if t == embedded.eod else embedded.decode([t])
                     for t in s["tokens"].tolist()]
            text = "".join(chars)
            assert re.match(r"\d+[-+*]\d+=\d+\n", text), text
            # the label of position j is an answer token when the line up to j has its "="
            want = [float("=" in text[:j + 1].rsplit("\n", 1)[-1]) for j in range(64)]
            assert s["loss_mask"].tolist() == want, text
            assert s["loss_mask"].sum() > 10


def test_packed_documents_are_built_in_linear_time_with_the_same_text():
    """packed_documents joins each document's lines once (adding them one by one took minutes at
    model.seq_length=100000): the text is the line-by-line form's, character for character."""
    import random

    from framework.data import embedded

    def by_adding(num_documents, length, seed=embedded.CORPUS_SEED):
        lines = embedded._training_lines(random.Random(seed))
        line = next(lines)
        for _ in range(num_documents):
            text = ""
            while len(text) + len(line) <= length - 1:
                text, line = text + line, next(lines)
            yield text + "\n" * (length - 1 - len(text))

    for n, length in ((50, 12), (40, 64), (10, 1024), (3, 5000)):
        assert list(embedded.packed_documents(n, length)) == list(by_adding(n, length))


def test_embedded_corpus_too_large_to_build_is_refused_before_building():
    """data=embedded packs num_documents x seq_length tokens on the first run: beyond
    EMBEDDED_PACKED_TOKENS_LIMIT (seq_length=100000 at the default 20000 documents: 2B tokens,
    which ran for minutes with no output) it is one line naming both fields and the largest
    num_documents that fits; the 4096-token presets at the default fit."""
    from framework.config import EMBEDDED_PACKED_TOKENS_LIMIT, Config, ModelConfig

    with pytest.raises(ConfigError, match=r"data\.num_documents=20000 documents of model\."
                                          r"seq_length=100000 tokens \(2,000M tokens.*at most "
                                          r"2684, or use data=indexed"):
        Config(model=ModelConfig(seq_length=100000, max_position_embeddings=100000))
    Config(model=ModelConfig(seq_length=4096, max_position_embeddings=4096))
    fits = EMBEDDED_PACKED_TOKENS_LIMIT // 100000
    Config(model=ModelConfig(seq_length=100000, max_position_embeddings=100000),
           data=DataConfig(num_documents=fits))
