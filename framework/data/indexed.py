"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`): writing and checking.

`preprocess` tokenizes documents into the format with megatron-core's `IndexedDatasetBuilder`.
`check_indexed` validates a pair before megatron-core opens it (mcore only `assert`s, or reads
garbage), turning every problem into a one-line `ConfigError` that names the file.

The `.idx` layout (megatron/core/datasets/indexed_dataset.py, `_IndexWriter`), little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    8 bytes   version, uint64 == 1
    1 byte    dtype code of the tokens in .bin (DType: 1 uint8 ... 4 int32, 5 int64, 8 uint16)
    8 bytes   sequence count S, uint64
    8 bytes   document-index count D (= documents + 1), uint64
    S x int32 sequence lengths (tokens)
    S x int64 sequence pointers (byte offsets into .bin)
    D x int64 document indices (sequence index where each document ends; first is 0)
    [S x int8 sequence modes, multimodal datasets only]

The `.bin` is the concatenation of all sequences' tokens in that dtype.
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from framework.errors import ConfigError
from framework.tokenizer import Tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index count


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
class _Encoder:
    """Tokenizes one document into a numpy array (+ EOD) and its sequence lengths; lives in the
    main or a worker process. With `split_sentences` each sentence is one sequence (Megatron's
    sentence-split layout: a document is a list of sentences, the EOD ends its last one)."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool, dtype: type,
                 split_sentences: bool = False, prepend_bos: bool = False) -> None:
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.prepend_bos = prepend_bos
        self.dtype = dtype
        self.split_sentences = split_sentences

    def __call__(self, text: str) -> Tuple[numpy.ndarray, List[int], int]:
        """(token ids, sequence lengths, UTF-8 bytes read). A document without any tokens (empty,
        or whitespace the tokenizer drops) has no sequence and no EOD: as in Megatron-LM's
        tools/preprocess_data.py, it stays a document boundary only."""
        nbytes = len(text.encode("utf-8"))
        if not self.split_sentences:
            ids = self.tokenizer.encode(text)
            if ids and self.prepend_bos:
                ids.insert(0, self.tokenizer.bos)
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            return numpy.asarray(ids, dtype=self.dtype), [len(ids)] if ids else [], nbytes
        from framework.data.sentences import split_sentences

        pieces = [ids for ids in (self.tokenizer.encode(s) for s in split_sentences(text)) if ids]
        if pieces and self.prepend_bos:
            pieces[0].insert(0, self.tokenizer.bos)
        if pieces and self.append_eod:
            pieces[-1].append(self.tokenizer.eod)
        flat = [i for ids in pieces for i in ids]
        return numpy.asarray(flat, dtype=self.dtype), [len(ids) for ids in pieces], nbytes


# The encoder of a pool worker process, set once by the pool initializer so the tokenizer is
# pickled once per worker rather than once per task. Never set in the parent process.
_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder



def _encode_in_worker(text: str) -> Tuple[numpy.ndarray, List[int], int]:
    assert _WORKER_ENCODER is not None, "pool worker not initialised"
    return _WORKER_ENCODER(text)


@contextlib.contextmanager
def _encoded(documents: Iterable[str], encoder: _Encoder, workers: int
             ) -> Iterator[Iterator[Tuple[numpy.ndarray, List[int], int]]]:
    """Yield an iterator of encoded documents, in input order, from `workers` processes."""
    if workers <= 1:
        yield map(encoder, documents)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        yield pool.imap(_encode_in_worker, documents, chunksize=64)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_path(final: str) -> str:
    """A new empty file beside `final`, with the mode open() would give it (mkstemp makes 0600,
    which os.replace would carry over to the final name)."""
    directory, name = os.path.split(os.path.abspath(final))
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return path


def preprocess(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str,
    *,
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
    split_sentences: bool = False,
    prepend_bos: bool = False,
) -> None:
    """Tokenize `documents` into `<output_prefix>.bin/.idx` (one mcore document each).

    `prepend_bos` starts every document that has tokens with the tokenizer's BOS id (what HF
    Llama tokenizers add by default); `append_eod` ends it with the EOD (EOS) id.

    With `split_sentences` (BERT/T5 data) each sentence of a document is one sequence of the
    indexed dataset (`framework.data.sentences.split_sentences`) and the document index records
    where documents end. A document without any tokens is a document with no sequence (and no
    EOD), byte for byte what Megatron-LM's tools/preprocess_data.py writes.

    Tokens are stored in the smallest dtype that holds the vocabulary
    (`DType.optimal_dtype`: uint16 below 65500 ids, else int32). With `workers > 1` documents
    are tokenized in a process pool, in order. Both files are built under temporary names and
    moved into place (`.bin` first, `.idx` last) only once complete; their mode follows the
    umask (0644 under umask 022), as files opened with open() get.
    """
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    encoder = _Encoder(tokenizer, append_eod, dtype, split_sentences, prepend_bos)
    tmp_bin, tmp_idx = _temp_path(output_prefix + ".bin"), _temp_path(output_prefix + ".idx")
    builder: Optional[IndexedDatasetBuilder] = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        bar = tqdm(desc=f"tokenize {os.path.basename(output_prefix)}", unit=" docs",
                   disable=not progress, file=sys.stderr, mininterval=0.5)
        start, nbytes = time.perf_counter(), 0
        with bar, _encoded(documents, encoder, workers) as encoded:
            for ids, lengths, size in encoded:
                builder.add_document(ids, lengths)  # no lengths: an empty document
                nbytes += size
                bar.update(1)
                if progress and bar.n % 1000 == 0:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{nbytes / elapsed / 1e6:.2f} MB/s", refresh=False)
            if progress:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{nbytes / elapsed / 1e6:.2f} MB/s")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    finally:
        if builder is not None and not builder.data_file.closed:  # failed before finalize
            builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# --------------------------------------------------------------------------------------------
# reading and checking
# --------------------------------------------------------------------------------------------
@dataclass
class IndexInfo:
    """The parsed `.idx` of an indexed dataset (arrays are read-only views of the file)."""

    prefix: str
    dtype: type
    sequence_lengths: numpy.ndarray  # int32 [S]
    sequence_pointers: numpy.ndarray  # int64 [S]
    document_indices: numpy.ndarray  # int64 [D]

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=numpy.int64))


def read_index(prefix: str) -> IndexInfo:
    """Parse and check `<prefix>.idx`; ConfigError (naming the file) when it is not valid."""
    idx_path = prefix + ".idx"
    if not os.path.isfile(idx_path):
        raise ConfigError(f"indexed dataset index {idx_path} does not exist")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(INDEX_MAGIC):
        raise ConfigError(f"{idx_path} is not a Megatron .idx file (bad header magic)")
    _, version, code, num_seq, num_doc = _HEADER.unpack(head)
    if version != INDEX_VERSION:
        raise ConfigError(f"{idx_path}: unsupported .idx version {version} "
                          f"(expected {INDEX_VERSION})")
    if code not in {d.value for d in DType}:
        raise ConfigError(f"{idx_path}: unknown token dtype code {code} in the header")
    need = _HEADER.size + num_seq * (4 + 8) + num_doc * 8
    if size < need:
        raise ConfigError(f"{idx_path} is truncated: {size} bytes, its header needs {need}")
    if size not in (need, need + num_seq):  # + one mode byte per sequence: multimodal data
        raise ConfigError(f"{idx_path} has {size} bytes but its header describes {need} "
                          f"(a damaged header or trailing data)")
    mm = numpy.memmap(idx_path, dtype=numpy.uint8, mode="r")
    offset = _HEADER.size
    lengths = numpy.frombuffer(mm, dtype=numpy.int32, count=num_seq, offset=offset)
    offset += lengths.nbytes
    pointers = numpy.frombuffer(mm, dtype=numpy.int64, count=num_seq, offset=offset)
    offset += pointers.nbytes
    doc_idx = numpy.frombuffer(mm, dtype=numpy.int64, count=num_doc, offset=offset)
    if num_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != num_seq \
            or (num_doc > 1 and bool((numpy.diff(doc_idx) < 0).any())):
        raise ConfigError(f"{idx_path}: corrupt document index (must rise from 0 to the "
                          f"sequence count {num_seq})")
    return IndexInfo(prefix, DType.dtype_from_code(code), lengths, pointers, doc_idx)


def _scan_token_range(bin_path: str, dtype: type) -> Tuple[int, int]:
    """(min, max) token id of a .bin, streamed through a memmap in chunks."""
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    chunk = 1 << 24
    low, high = 0, 0
    for start in range(0, tokens.shape[0], chunk):
        part = tokens[start:start + chunk]
        low, high = min(low, int(part.min())), max(high, int(part.max()))
    return low, high


def _token_range(bin_path: str, dtype: type, cache_dir: Optional[str]) -> Tuple[int, int]:
    """`_scan_token_range`, memoised in `cache_dir` by path, size and mtime (it reads the whole
    .bin, which is slow for large data)."""
    if cache_dir is None:
        return _scan_token_range(bin_path, dtype)
    stat = os.stat(bin_path)
    key = f"{os.path.abspath(bin_path)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
    memo = os.path.join(cache_dir, f"{digest}-token_range.txt")
    with contextlib.suppress(OSError, ValueError):
        with open(memo) as stream:
            low, high = (int(v) for v in stream.read().split())
            return low, high
    low, high = _scan_token_range(bin_path, dtype)
    with contextlib.suppress(OSError):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = _temp_path(memo)
        with open(tmp, "w") as stream:
            stream.write(f"{low} {high}\n")
        os.replace(tmp, memo)
    return low, high


def check_indexed(prefix: str, vocab_size: Optional[int] = None, *,
                  cache_dir: Optional[str] = None) -> None:
    """Check that `<prefix>.bin/.idx` form a valid Megatron indexed dataset.

    Raises a one-line ConfigError naming the file for: a missing `.bin` or `.idx`; a bad `.idx`
    magic, version or dtype; a `.bin` whose size differs from what the `.idx` describes
    (truncated or rewritten); token ids outside [0, vocab_size) when `vocab_size` is given.
    The id check reads the whole `.bin`; with `cache_dir` its result is remembered there.
    """
    bin_path = prefix + ".bin"
    if not os.path.isfile(bin_path):
        raise ConfigError(f"indexed dataset data file {bin_path} does not exist")
    info = read_index(prefix)
    itemsize = numpy.dtype(info.dtype).itemsize
    lengths = info.sequence_lengths.astype(numpy.int64)
    if lengths.size and lengths.min() < 0:
        raise ConfigError(f"{prefix}.idx: negative sequence length")
    expected_pointers = numpy.concatenate(([0], numpy.cumsum(lengths[:-1]))) * itemsize
    if lengths.size and not numpy.array_equal(info.sequence_pointers, expected_pointers):
        raise ConfigError(f"{prefix}.idx: sequence pointers do not match sequence lengths")
    need = int(lengths.sum()) * itemsize
    have = os.path.getsize(bin_path)
    if have < need:
        raise ConfigError(f"{bin_path} is truncated: {have} bytes, {prefix}.idx needs {need}")
    if have > need:
        raise ConfigError(f"{bin_path} has {have} bytes but {prefix}.idx describes {need} "
                          f"(was one file rewritten without the other?)")
    if vocab_size is None or need == 0:
        return
    low, high = _token_range(bin_path, info.dtype, cache_dir)
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ConfigError(f"{bin_path} holds token id {bad}, outside the tokenizer's vocabulary "
                          f"[0, {vocab_size}) (wrong tokenizer for this data?)")
