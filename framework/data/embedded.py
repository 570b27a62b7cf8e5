"""The embedded corpus: small arithmetic problems a tiny GPT learns on a CPU in minutes.

Problems such as `12+35=47`, `93-41=52` or `7*8=56`, one per line, each ending in a newline.
Operands are drawn uniformly from 0-99 for `+` and `-` (with a >= b, so results are never
negative) and from 0-12 for `*` (times tables); `+` is drawn 45% of the time, `-` 35%, `*` 20%.

For GPT training (`prepare_embedded(..., seq_length=s)`) whole lines are packed into documents
of exactly `s` tokens (`packed_documents`), so every training sample starts with a problem at
position 0, as a generation prompt does, and `AnswerLoss` keeps the loss on the answers only
(the operands are random: predicting them teaches nothing). BERT and T5 read the same problems
as sentences (`sentence_documents`).

A fixed ~10% of all problems, chosen by a hash of the problem, is held out: it never occurs in
the training text, and `heldout_problems(n)` returns (prompt, answer) pairs from it, e.g.
("12+35=", "47"), to measure generation accuracy. Everything is deterministic.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from framework.errors import ConfigError
from framework.data.indexed import preprocess
from framework.locking import file_lock
from framework.tokenizer import embedded_mlm_tokenizer, embedded_tokenizer

# Bump when the generator changes, so caches of the old corpus are not reused.
CORPUS_VERSION = 3
CORPUS_SEED = 1234
HELDOUT_PERCENT = 10
OPERAND_LIMITS: Dict[str, int] = {"+": 100, "-": 100, "*": 13}  # operands in range(limit)
OP_WEIGHTS: Dict[str, float] = {"+": 0.45, "-": 0.35, "*": 0.2}
# ops whose problems are drawn by operand digit counts first (none: uniform operands, so the
# two-digit problems, most of the held-out set, get most of the training)
DIGIT_BALANCED_OPS = ""
LINES_PER_DOCUMENT = (4, 8)

Problem = Tuple[int, str, int]


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _buckets(op: str) -> List[List[Problem]]:
    """All problems of `op`, grouped by the digit counts of the operands (one group for ops
    that are not digit-balanced). Training draws a group uniformly, then a problem in it."""
    limit = OPERAND_LIMITS[op]
    groups: Dict[Tuple[int, int], List[Problem]] = {}
    for a in range(limit):
        for b in range(limit):
            if op == "-" and a < b:
                continue
            key = (len(str(a)), len(str(b))) if op in DIGIT_BALANCED_OPS else (0, 0)
            groups.setdefault(key, []).append((a, op, b))
    return [groups[key] for key in sorted(groups)]


def is_heldout(problem: Problem) -> bool:
    """Whether a problem belongs to the held-out set (a stable hash, not Python's hash())."""
    a, op, b = problem
    return zlib.crc32(f"{a}{op}{b}".encode()) % 100 < HELDOUT_PERCENT


def heldout_problems(n: int) -> List[Tuple[str, str]]:
    """`n` held-out (prompt, answer) pairs such as ("12+35=", "47"), in a fixed order.

    The order is a weighted shuffle by each problem's probability under the training
    distribution, so the first `n` are a sample of what the model was trained on.
    """
    rng = random.Random(CORPUS_SEED + 1)
    keyed = []  # (log(u) / weight, problem): the order of u ** (1 / weight), without underflow
    for op in OP_WEIGHTS:
        buckets = _buckets(op)
        for bucket in buckets:
            weight = OP_WEIGHTS[op] / len(buckets) / len(bucket)
            for problem in bucket:
                if is_heldout(problem):
                    keyed.append((math.log(1.0 - rng.random()) / weight, problem))
    if not 0 <= n <= len(keyed):
        raise ValueError(f"heldout_problems: n={n} is not in [0, {len(keyed)}]")
    keyed.sort(key=lambda item: -item[0])
    return [(f"{a}{op}{b}=", str(_answer(a, op, b))) for _, (a, op, b) in keyed[:n]]


def _training_lines(rng: random.Random) -> Iterator[str]:
    """Endless `a<op>b=c\\n` lines drawn from the training distribution, none held out."""
    ops = list(OP_WEIGHTS)
    weights = [OP_WEIGHTS[op] for op in ops]
    pools = {op: [[p for p in bucket if not is_heldout(p)] for bucket in _buckets(op)]
             for op in ops}
    while True:
        op = rng.choices(ops, weights)[0]
        a, op, b = rng.choice(rng.choice(pools[op]))
        yield f"{a}{op}{b}={_answer(a, op, b)}\n"


def training_documents(num_documents: int, seed: int = CORPUS_SEED) -> Iterator[str]:
    """The training documents: each a few `a<op>b=c` lines, none of them held out."""
    rng = random.Random(seed)
    lines = _training_lines(rng)
    for _ in range(num_documents):
        yield "".join(next(lines) for _ in range(rng.randint(*LINES_PER_DOCUMENT)))


def packed_documents(num_documents: int, length: int, seed: int = CORPUS_SEED) -> Iterator[str]:
    """GPT training documents of exactly `length - 1` characters (`length` tokens with the EOD
    the preprocessing appends): whole lines while they fit, then newlines. A GPT sample of
    `length` tokens then starts where a document starts, so every sample begins with a whole
    problem at position 0, as a prompt does in generation."""
    if length < 12:
        raise ValueError(f"packed_documents: length={length} cannot hold a problem line")
    rng = random.Random(seed)
    lines = _training_lines(rng)
    line = next(lines)
    for _ in range(num_documents):
        parts, size = [], 0  # (joined once: adding line by line is quadratic in `length`)
        while size + len(line) <= length - 1:
            parts.append(line)
            size += len(line)
            line = next(lines)
        yield "".join(parts) + "\n" * (length - 1 - size)


def embedded_tokenizer_dir(prefix: str) -> str:
    """The saved tokenizer directory beside a prefix returned by `prepare_embedded`."""
    return os.path.join(os.path.dirname(prefix), "tokenizer")


def sentence_documents(num_documents: int, seed: int = CORPUS_SEED) -> Iterator[str]:
    """The training documents written as sentences for BERT and T5: `12+35=47. 7*8=56. ...`
    (the same problems as `training_documents`, each ending in a full stop)."""
    for doc in training_documents(num_documents, seed):
        yield " ".join(f"{line}." for line in doc.splitlines())


def prepare_embedded(cache_dir: str, num_documents: int, sentences: bool = False,
                     seq_length: Optional[int] = None) -> str:
    """Create (once) the embedded corpus under `cache_dir` and return its data prefix.

    The directory `arith_v<version>_<num_documents>/` holds `corpus.jsonl`, the indexed
    dataset `arith_text_document.bin/.idx` and the saved tokenizer (`tokenizer/`); with
    `seq_length` (GPT training) the documents are `packed_documents(num_documents, seq_length)`
    and the directory is `arith_v<version>_<num_documents>_s<seq_length>/`.
    With `sentences=True` (BERT, T5) it is `arith_sent_v<version>_<num_documents>/` with
    `arith_text_sentence.bin/.idx`: the `sentence_documents` split into one item per sentence by
    the same preprocessing as `python -m data_tools.preprocess --split-sentences`, tokenized with
    `embedded_mlm_tokenizer()`. It is built
    in a temporary directory and renamed into place under a file lock, so concurrent callers
    (e.g. several ranks) build it once and never see it half-written; later calls reuse it.
    """
    if num_documents <= 0:
        raise ValueError(f"prepare_embedded: num_documents={num_documents} must be positive")
    kind = "arith_sent" if sentences else "arith"
    packed = seq_length is not None and not sentences
    name = f"{kind}_v{CORPUS_VERSION}_{num_documents}" + (f"_s{seq_length}" if packed else "")
    final = os.path.join(os.path.abspath(cache_dir), name)
    prefix = os.path.join(final, "arith_text_sentence" if sentences else "arith_text_document")
    if os.path.isfile(prefix + ".idx"):
        return prefix
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the data cache directory {os.path.dirname(final)} "
                          f"({e.strerror or e}); set data.path_to_cache") from None
    with file_lock(final + ".lock", f"the embedded corpus {name}"):
        if os.path.isfile(prefix + ".idx"):
            return prefix
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=os.path.dirname(final))
        if packed and num_documents * seq_length >= 2 ** 24:  # tens of seconds or more
            from framework.training.console import echo

            echo(f"building the embedded corpus once: {num_documents} documents of "
                 f"{seq_length} tokens ({num_documents * seq_length / 1e6:.0f}M tokens), cached "
                 f"in {final}")
        try:
            if sentences:
                documents = list(sentence_documents(num_documents))
            elif packed:
                documents = list(packed_documents(num_documents, seq_length))
            else:
                documents = list(training_documents(num_documents))
            with open(os.path.join(tmp, "corpus.jsonl"), "w", encoding="utf-8") as out:
                for doc in documents:
                    out.write(json.dumps({"text": doc}) + "\n")
            tokenizer = embedded_mlm_tokenizer() if sentences else embedded_tokenizer()
            tokenizer.save(os.path.join(tmp, "tokenizer"))
            preprocess(documents, tokenizer, os.path.join(tmp, os.path.basename(prefix)),
                       progress=False, append_eod=not sentences, split_sentences=sentences)
            if os.path.isdir(final):  # incomplete (files deleted by hand): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return prefix


def answer_loss_mask(tokens, loss_mask, eq_id: int, separator_ids: Sequence[int]):
    """`loss_mask` kept only where the label (the next token) belongs to an answer: from the
    first digit after `=` up to and including the line's newline. A position is inside an
    answer when the last `=` before or at it comes after the last separator (newline or EOD).
    Works on [s] or [b, s] tensors; the window is taken to start at a line start (packed
    documents)."""
    import torch

    pos = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    none = torch.full_like(pos, -1)
    last_eq = torch.where(tokens == eq_id, pos, none).cummax(dim=-1).values
    is_sep = torch.zeros_like(tokens, dtype=torch.bool)
    for sep in separator_ids:
        is_sep |= tokens == sep
    last_sep = torch.where(is_sep, pos, none).cummax(dim=-1).values
    return loss_mask * (last_eq > last_sep).to(loss_mask.dtype)


class AnswerLoss:
    """A GPT dataset of the packed embedded corpus whose samples train on answers only (see
    `answer_loss_mask`): the operands are random by construction, so predicting them teaches
    nothing and costs the small model capacity. Evaluation losses are then answer losses too."""

    def __init__(self, dataset, tokenizer) -> None:
        self.gpt_dataset = dataset
        self.eq_id = tokenizer.encode("=")[0]
        self.separators = (tokenizer.encode("\n")[0], tokenizer.eod)

    def __getattr__(self, name: str):  # the wrapped GPTDataset's attributes (config, ...)
        if name == "gpt_dataset":
            raise AttributeError(name)
        return getattr(self.gpt_dataset, name)

    def __len__(self) -> int:
        return len(self.gpt_dataset)

    def __getitem__(self, idx):
        sample = dict(self.gpt_dataset[idx])
        sample["loss_mask"] = answer_loss_mask(sample["tokens"], sample["loss_mask"],
                                               self.eq_id, self.separators)
        return sample
