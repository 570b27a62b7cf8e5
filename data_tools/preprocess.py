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

Bad input (a missing file, a line that is not JSON, not UTF-8 or lacks a key, bad gzip data, a
line over --max-line-bytes, an input without any text) prints one line on stderr naming the file
and line, and exits with status 2; no output file is left behind (all outputs are built in a
staging directory and moved into place only when every key succeeded). An output path that is a
directory is refused before any tokenizing, and if moving the outputs into place fails, the ones
already moved are taken back and the earlier files restored. An option that no input uses is
refused: `--split` needs a dataset with splits, `--max-line-bytes` a JSON-lines input.
"""
from __future__ import annotations

import argparse
import errno
import gzip
import json
import os
import shutil
import sys
import tempfile
import zlib
from typing import Iterator, List, Optional

import numpy

from data_tools import EXIT_INTERRUPTED, interrupted_line, mark_published, start_run
from framework.config import ConfigError, TokenizerConfig
from framework.paths import unwritable_dir

# framework.data.indexed (megatron-core) and framework.tokenizer (transformers) are imported where
# they are used, so `--help` and argument errors answer at once

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad input; its message is one line naming the file (and line)."""


def _looks_like_file(name: str) -> bool:
    return (name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))
            or name.startswith(("/", "./", "../", "~")))


# Lines are read as bytes with this bound (a file without newlines is not read whole into
# memory) and decoded strictly, so a bad byte is reported with its line number.
DEFAULT_MAX_LINE_BYTES = 64 * 2**20


def _raw_lines(path: str, max_line_bytes: int) -> Iterator[bytes]:
    """The lines of a JSON-lines file (or .gz), as bytes; InputError names the file and line
    for a file that cannot be read, bad gzip data, a truncated .gz or an over-long line."""
    number = 0
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as stream:
            while True:
                line = stream.readline(max_line_bytes + 1)
                if not line:
                    return
                number += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    raise InputError(f"{path}:{number}: line longer than --max-line-bytes="
                                     f"{max_line_bytes}")
                yield line
    except InputError:
        raise
    except EOFError:
        raise InputError(f"{path}: truncated gzip file (it ends inside line {number + 1})") \
            from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: not a valid gzip file, at line {number + 1} ({err})") \
            from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None


def _decode(raw: bytes, path: str, number: int) -> str:
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:200]
        hint = ("; it looks like UTF-16: convert it, e.g. iconv -f UTF-16 -t UTF-8"
                if utf16 else "")
        raise InputError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                         f"column {err.start + 1}){hint}") from None


def _jsonl_texts(path: str, key: str,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[str]:
    for number, raw in enumerate(_raw_lines(path, max_line_bytes), start=1):
        line = _decode(raw, path, number)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg}, column "
                             f"{err.colno})") from None
        except RecursionError:
            raise InputError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
        except ValueError as err:  # an integer over Python's digit limit
            why = (str(err).splitlines() or ["?"])[0][:120]
            if "Exceeds the limit" in why:
                why = f"an integer longer than {sys.get_int_max_str_digits()} digits"
            raise InputError(f"{path}:{number}: not valid JSON ({why})") from None
        if not isinstance(record, dict) or key not in record:
            raise InputError(f"{path}:{number}: no key {key!r} in this JSON line")
        text = record[key]
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: {key!r} is a "
                             f"{type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"{path}:{number}: {key!r} holds a lone surrogate "
                             f"(\\u{ord(text[err.start]):04x}), which is not text") from None
        yield text


def _load_hf(name: str, split: Optional[str]):  # -> (datasets.Dataset, whether split chose it)
    """`split` is None where --split was not given (then "train" where there are splits)."""
    import datasets

    try:
        if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(name, "state.json"))):
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, split=split or "train")
            return data, True
    except Exception as err:  # hub/offline/format errors of many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{name}: cannot load as a datasets dataset ({first})") from None
    if isinstance(data, datasets.DatasetDict):
        if (split or "train") not in data:
            raise InputError(f"{name}: no split {split or 'train'!r} (has {sorted(data)})")
        return data[split or "train"], True
    # a single Dataset saved with save_to_disk: it has no splits to choose from; it may record
    # the split it was made from, which an explicit --split must then name
    saved = None if getattr(data, "split", None) is None else str(data.split)
    if split is not None and saved is not None and split != saved:
        raise InputError(f"{name}: a single dataset (saved with save_to_disk) of split "
                         f"{saved!r}, not --split={split!r}")
    return data, split is not None and saved is not None


class _Source:
    """One --input: a JSON-lines file or a `datasets` dataset, read once per key."""

    def __init__(self, name: str, split: Optional[str] = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.name = name
        self.dataset = None
        self.max_line_bytes = max_line_bytes
        self.uses_split = False  # whether --split chose what this input reads
        if os.path.isfile(name):
            return
        if os.path.exists(name) and not os.path.isdir(name):
            raise InputError(f"{name}: not a regular file")
        if not os.path.isdir(name) and _looks_like_file(name):
            raise InputError(f"{name}: input file does not exist")
        self.dataset, self.uses_split = _load_hf(name, split)

    def kind(self) -> str:
        if self.dataset is None:
            return "a JSON-lines file"
        return "a datasets dataset" if self.uses_split else \
            "a single dataset saved with save_to_disk, without splits"

    def check_key(self, key: str) -> None:
        if self.dataset is not None and key not in self.dataset.column_names:
            raise InputError(f"{self.name}: no column {key!r} (has {self.dataset.column_names})")

    def texts(self, key: str) -> Iterator[str]:
        """The documents under `key`; an input without any text in them (no documents, or only
        empty or blank ones) is an error: it would add no tokens."""
        count = with_text = 0
        for text in self._texts(key):
            count += 1
            with_text += bool(text.strip())
            yield text
        if not with_text:
            what = f"{count} documents, all empty or blank" if count else "no documents"
            raise InputError(f"{self.name}: no text under {key!r} ({what}); it would add no "
                             f"tokens")

    def _texts(self, key: str) -> Iterator[str]:
        if self.dataset is None:
            yield from _jsonl_texts(self.name, key, self.max_line_bytes)
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
    parser.add_argument("--split", default=None,
                        help="split of a datasets dataset (default: train); refused where no "
                             "input has splits")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer name or local directory")
    parser.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    parser.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the EOD (EOS) id to every document")
    parser.add_argument("--prepend-bos", action="store_true",
                        help="start every document with the tokenizer's BOS id (Llama-style "
                             "pretraining data; the tokenizer must have a BOS token)")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one item per sentence (documents become lists of sentences; "
                             "for BERT/T5 data)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--output-prefix", required=True,
                        help="outputs are <prefix>_<key>_document.bin/.idx")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    parser.add_argument("--max-line-bytes", type=int, default=None,
                        help=f"longest JSON line accepted (default: {DEFAULT_MAX_LINE_BYTES}, "
                             f"64 MiB); only for JSON-lines inputs")
    return parser.parse_args(argv)


def _check_outputs(args: argparse.Namespace, names: List[str]) -> None:
    """Refuse, before any work, output paths that cannot be replaced by a file: one that is a
    directory (a symlink is replaced, as before), or a directory to write in that does not take
    a new file."""
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    for name in names:
        for suffix in (".bin", ".idx"):
            final = os.path.join(out_dir, name + suffix)
            if os.path.isdir(final) and not os.path.islink(final):
                raise InputError(f"{final}: an output of --output-prefix={args.output_prefix} is "
                                 f"a directory; remove or rename it")
            # an input whose file is the entry this output replaces would be lost (an output
            # that is a symlink to it, or a hard link, replaces only the link)
            entry = os.path.join(os.path.realpath(out_dir), name + suffix)
            for given in args.input:
                if os.path.realpath(given) == entry:
                    raise InputError(f"--input {given} is also an output of --output-prefix="
                                     f"{args.output_prefix} ({final}), which would replace it; "
                                     f"give another --output-prefix")
    problem = unwritable_dir(out_dir)
    if problem:
        raise InputError(f"--output-prefix={args.output_prefix}: cannot write there ({problem})")


class _PublishError(InputError):
    """Moving the outputs into place failed; `keep_staging` where earlier files could not be put
    back and are still in the staging directory (which must then not be removed)."""

    def __init__(self, message: str, keep_staging: bool) -> None:
        super().__init__(message)
        self.keep_staging = keep_staging


def _publish(staging: str, out_dir: str, names: List[str]) -> List[str]:
    """Move `<staging>/<name>.bin/.idx` to `<out_dir>/`, all or nothing: each file there is first
    kept under the staging directory (a hard link, else renamed away), and if any move fails the
    files already moved are removed and the kept ones put back."""
    moves = [(os.path.join(staging, name + suffix), os.path.join(out_dir, name + suffix))
             for name in names for suffix in (".bin", ".idx")]
    kept_dir = os.path.join(staging, "earlier")
    os.mkdir(kept_dir)
    kept, moved = [], []  # (final, copy of the earlier file); finals written
    current = out_dir
    try:
        for number, (_staged, final) in enumerate(moves):
            current = final
            if not os.path.lexists(final):
                continue
            if os.path.isdir(final) and not os.path.islink(final):  # made since the check
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), final)
            copy = os.path.join(kept_dir, str(number))
            try:
                os.link(final, copy, follow_symlinks=False)
            except OSError:  # no hard links here (or `final` is a symlink): rename it away
                os.rename(final, copy)
            kept.append((final, copy))
        for staged, final in moves:
            current = final
            os.replace(staged, final)
            moved.append(final)
        mark_published()
        return [os.path.join(out_dir, name) for name in names]
    except BaseException as err:
        kept_finals = {final for final, _ in kept}
        for final in moved:
            if final not in kept_finals:
                try:
                    os.remove(final)
                except OSError:
                    pass
        lost = []
        for final, copy in kept:
            try:
                os.replace(copy, final)
            except OSError:
                lost.append(final)
        if not isinstance(err, OSError):
            if lost:  # (an interrupt, say) keep the staging directory: it holds them
                raise _PublishError(f"interrupted while moving the outputs into place; the "
                                    f"earlier {', '.join(lost)} could not be put back and are "
                                    f"kept in {kept_dir}", keep_staging=True) from err
            raise
        why = err.strerror or str(err)
        if lost:
            raise _PublishError(f"{current}: cannot write this output ({why}); the earlier "
                                f"{', '.join(lost)} could not be put back and are kept in "
                                f"{kept_dir}", keep_staging=True) from None
        raise _PublishError(f"{current}: cannot write this output ({why}); no output was "
                            f"changed", keep_staging=False) from None


UNKNOWN_SHARE_NOTED = 0.01


def _note_unknown_tokens(prefix: str, info, tokenizer, key: str) -> None:
    """A note when more than 1% of the tokens written are the tokenizer's unknown token: text
    the tokenizer does not cover (another language or script, or the wrong tokenizer). Only for
    a tokenizer whose unknown token is an id of its own (a word- or character-level vocabulary;
    byte-level BPE encodes any text)."""
    hf = getattr(tokenizer, "hf", None)
    unk = getattr(hf, "unk_token_id", None)
    if unk is None or unk in (tokenizer.eod, tokenizer.bos, getattr(tokenizer, "pad", None)):
        return
    try:  # in chunks: a whole-corpus comparison would need a byte per token at once
        tokens = numpy.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
        step = 1 << 26
        count = sum(int(numpy.count_nonzero(tokens[i:i + step] == unk))
                    for i in range(0, tokens.size, step))
    except (OSError, ValueError, MemoryError):  # a note is not worth failing the run for
        return
    if count > UNKNOWN_SHARE_NOTED * max(1, tokens.size):
        print(f"note: {count} of the {tokens.size} tokens under {key!r} "
              f"({100 * count / tokens.size:.0f}%) are the tokenizer's unknown token "
              f"{hf.unk_token!r}: the tokenizer does not cover this text (is it the right "
              f"--tokenizer?)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> List[str]:
    """Preprocess every key; return the output prefixes. Raises InputError/ConfigError."""
    from framework.data.indexed import preprocess, read_index

    if not 1 <= args.workers <= 1024:
        raise InputError(f"--workers={args.workers} must be in [1, 1024]")
    # None: not given (the parser's default), so not refused where no input would use it
    split = getattr(args, "split", None)
    max_line_bytes = getattr(args, "max_line_bytes", None)
    if max_line_bytes is not None and max_line_bytes < 1:
        raise InputError(f"--max-line-bytes={max_line_bytes} must be >= 1")
    seen = set()
    for key in args.json_keys:
        # each key names an output, <prefix>_<key>_document: one file name, written once
        if key in seen:
            raise InputError(f"--json-keys: {key!r} is given twice (each key writes one output, "
                             f"<prefix>_{key}_document)")
        seen.add(key)
        if os.sep in key or (os.altsep and os.altsep in key):
            raise InputError(f"--json-keys: {key!r} cannot name an output file "
                             f"(<prefix>_<key>_document) because it holds {os.sep!r}")
    if not os.path.basename(args.output_prefix):
        raise InputError(f"--output-prefix={args.output_prefix!r} must end in a file name "
                         f"prefix (outputs are <prefix>_<key>_document.bin/.idx)")
    level = "sentence" if args.split_sentences else "document"
    names = [f"{os.path.basename(args.output_prefix)}_{key}_{level}" for key in args.json_keys]
    _check_outputs(args, names)
    sources = [_Source(name, split, max_line_bytes or DEFAULT_MAX_LINE_BYTES)
               for name in args.input]
    if split is not None and not any(source.uses_split for source in sources):
        raise InputError(f"--split={split}: no input is a datasets dataset with splits "
                         f"({sources[0].name} is {sources[0].kind()}); leave --split out")
    if max_line_bytes is not None and all(source.dataset is not None for source in sources):
        raise InputError(f"--max-line-bytes={max_line_bytes}: applies to JSON-lines inputs "
                         f"only, and {sources[0].name} is a datasets dataset; leave it out")
    for source in sources:
        for key in args.json_keys:
            source.check_key(key)
    tokenizer = _build_tokenizer(args)
    if getattr(args, "prepend_bos", False) and tokenizer.hf.bos_token_id is None:
        raise InputError(f"--prepend-bos: tokenizer {tokenizer.hf.name_or_path or 'embedded'!r} "
                         f"has no BOS token")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
        os.makedirs(out_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".preprocess.", dir=out_dir)
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise InputError(f"--output-prefix={args.output_prefix}: cannot write there ({why})") \
            from None
    keep_staging = False
    try:
        for key, name in zip(args.json_keys, names):
            documents = (text for source in sources for text in source.texts(key))
            preprocess(documents, tokenizer, os.path.join(staging, name),
                       append_eod=args.append_eod, workers=args.workers, progress=progress,
                       prepend_bos=getattr(args, "prepend_bos", False),
                       split_sentences=args.split_sentences)
            info = read_index(os.path.join(staging, name))
            # one EOD ends each document that has a sequence (empty documents have none)
            eods = int((numpy.diff(info.document_indices) > 0).sum()) if args.append_eod else 0
            if info.num_tokens - eods <= 0:  # text that tokenizes to nothing
                raise InputError(f"{', '.join(args.input)}: the text under {key!r} gives no "
                                 f"tokens with this tokenizer")
            _note_unknown_tokens(os.path.join(staging, name), info, tokenizer, key)
        try:
            return _publish(staging, out_dir, names)
        except _PublishError as err:
            keep_staging = err.keep_staging
            raise
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start_run()
    try:
        prefixes = run(args)
    except KeyboardInterrupt as stop:
        print(interrupted_line(stop), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (InputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the output directory filled up, vanished, ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from framework.data.indexed import read_index

    for prefix in prefixes:
        info = read_index(prefix)
        print(f"wrote {prefix}.bin/.idx: {len(info.document_indices) - 1} documents, "
              f"{info.num_sequences} sequences, {info.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
