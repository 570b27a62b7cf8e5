"""Tokenize text into Megatron indexed datasets (`.bin` + `.idx`), one per JSON key.

    python -m data_tools.preprocess --input corpus.jsonl [more.jsonl ...] --json-keys text \\
        --tokenizer gpt2 | --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 8 --output-prefix data/corpus

writes `data/corpus_text_document.bin/.idx` (`<prefix>_<key>_document`, as Megatron-LM's
tools/preprocess_data.py names them). With `--split-sentences` (BERT and T5 data) each sentence
is one item of the indexed dataset and documents are lists of sentences
(`<prefix>_<key>_sentence.bin/.idx`, Megatron-LM's name); the splitter is rule-based and works
offline (`framework.data.sentences`). Inputs are JSON-lines files (optionally .gz), streamed
line by line, or a Hugging Face `datasets` dataset: a local `save_to_disk` directory, a local
dataset directory, or a hub name (`--split`, default train). Several inputs are concatenated.

Bad input (a missing file, a line that is not JSON or lacks a key) prints one line on stderr
and exits with status 2; no output file is left behind (all outputs are built in a staging
directory and moved into place only when every key succeeded).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from typing import IO, Iterator, List, Optional

from framework.config import ConfigError, TokenizerConfig

# framework.data.indexed (megatron-core) and framework.tokenizer (transformers) are imported where
# they are used, so `--help` and argument errors answer at once

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad input; its message is one line naming the file (and line)."""


def _looks_like_file(name: str) -> bool:
    return (name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))
            or name.startswith(("/", "./", "../", "~")))


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _jsonl_texts(path: str, key: str) -> Iterator[str]:
    with _open_text(path) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or key not in record:
                raise InputError(f"{path}:{number}: no key {key!r} in this JSON line")
            if not isinstance(record[key], str):
                raise InputError(f"{path}:{number}: {key!r} is a "
                                 f"{type(record[key]).__name__}, not a string")
            yield record[key]


def _load_hf(name: str, split: str):  # -> datasets.Dataset
    import datasets

    try:
        if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(name, "state.json"))):
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, split=split)
    except Exception as err:  # hub/offline/format errors of many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{name}: cannot load as a datasets dataset ({first})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{name}: no split {split!r} (has {sorted(data)})")
        data = data[split]
    return data


class _Source:
    """One --input: a JSON-lines file or a `datasets` dataset, read once per key."""

    def __init__(self, name: str, split: str) -> None:
        self.name = name
        self.dataset = None
        if os.path.isfile(name):
            return
        if not os.path.isdir(name) and _looks_like_file(name):
            raise InputError(f"{name}: input file does not exist")
        self.dataset = _load_hf(name, split)

    def check_key(self, key: str) -> None:
        if self.dataset is not None and key not in self.dataset.column_names:
            raise InputError(f"{self.name}: no column {key!r} (has {self.dataset.column_names})")

    def texts(self, key: str) -> Iterator[str]:
        if self.dataset is None:
            yield from _jsonl_texts(self.name, key)
            return
        for number, text in enumerate(self.dataset.select_columns([key]), start=1):
            value = text[key]
            if not isinstance(value, str):
                raise InputError(f"{self.name}: row {number}: {key!r} is a "
                                 f"{type(value).__name__}, not a string")
            yield value


def _build_tokenizer(args: argparse.Namespace):  # -> framework.tokenizer.Tokenizer
    from framework.tokenizer import build_tokenizer

    if (args.tokenizer is None) == (args.vocab_file is None and args.merge_file is None):
        raise ConfigError("give --tokenizer, or --vocab-file with --merge-file")
    cfg = TokenizerConfig(path=args.tokenizer, vocab_file=args.vocab_file,
                          merge_file=args.merge_file)
    return build_tokenizer(cfg)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" for options that have a default (not for None, False or required
    ones, which would only say "None")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.preprocess", description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelp)
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSON-lines files, a local dataset dir or a datasets hub name")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="keys (columns) to tokenize; one output per key")
    parser.add_argument("--split", default="train", help="split of a datasets dataset")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer name or local directory")
    parser.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    parser.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the EOD (EOS) id to every document")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one item per sentence (documents become lists of sentences; "
                             "for BERT/T5 data)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--output-prefix", required=True,
                        help="outputs are <prefix>_<key>_document.bin/.idx")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> List[str]:
    """Preprocess every key; return the output prefixes. Raises InputError/ConfigError."""
    from framework.data.indexed import preprocess

    if args.workers < 1:
        raise InputError(f"--workers={args.workers} must be >= 1")
    sources = [_Source(name, args.split) for name in args.input]
    for source in sources:
        for key in args.json_keys:
            source.check_key(key)
    tokenizer = _build_tokenizer(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".preprocess.", dir=out_dir)
    try:
        prefixes = []
        for key in args.json_keys:
            level = "sentence" if args.split_sentences else "document"
            name = f"{os.path.basename(args.output_prefix)}_{key}_{level}"
            documents = (text for source in sources for text in source.texts(key))
            preprocess(documents, tokenizer, os.path.join(staging, name),
                       append_eod=args.append_eod, workers=args.workers, progress=progress,
                       split_sentences=args.split_sentences)
            prefixes.append(name)
        finals = []
        for name in prefixes:
            final = os.path.join(out_dir, name)
            for suffix in (".bin", ".idx"):
                os.replace(os.path.join(staging, name + suffix), final + suffix)
            finals.append(final)
        return finals
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        prefixes = run(args)
    except (InputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from framework.data.indexed import read_index

    for prefix in prefixes:
        info = read_index(prefix)
        print(f"wrote {prefix}.bin/.idx: {len(info.document_indices) - 1} documents, "
              f"{info.num_sequences} sequences, {info.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
