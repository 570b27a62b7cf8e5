"""Tokenizers: a thin wrapper over Hugging Face tokenizers, plus the offline embedded one.

* `Tokenizer` wraps a `transformers` tokenizer and exposes the ids the framework needs
  (`eod`, `bos`, `pad`, `vocab_size`).
* `build_tokenizer(cfg)` loads one from a `TokenizerConfig`: an HF name or local directory, a
  GPT-2 BPE vocab/merges pair, or the tokenizer saved beside a checkpoint.
* `choose_tokenizer(...)` is the one rule by which every command finds its tokenizer (config,
  else the checkpoint's, else a Hugging Face model directory's, else the model family's embedded
  one); it returns a `TokenizerSource`, which each process loads.
* `embedded_tokenizer()` is a character-level tokenizer for the embedded arithmetic corpus,
  built offline with the `tokenizers` library.
* `MegatronTokenizerAdapter` gives megatron-core's datasets the attributes they read from
  `GPTDatasetConfig.tokenizer` (`vocab_size`, `eod`, `pad`, `unique_identifiers`).
* `embedded_mlm_tokenizer()` is the character tokenizer of the embedded corpus for BERT and T5
  (with `[CLS]`, `[SEP]`, `[MASK]`, `[PAD]`, BOS and T5 sentinels `<extra_id_N>`), and
  `MaskedLMTokenizerAdapter` adds what mcore's masked-LM datasets read (`cls`, `sep`, `mask`,
  `bos`, `eos`, `inv_vocab`, `additional_special_tokens_ids`), for it and for HF tokenizers
  (WordPiece BERT, sentencepiece T5).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from framework.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from framework.config import TokenizerConfig

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
# The characters of the embedded arithmetic corpus, in id order after the special tokens.
EMBEDDED_CHARS = "0123456789+-*= \n"


class Tokenizer:
    """A Hugging Face tokenizer with the ids a GPT training run needs.

    `encode` never adds special tokens (no BOS/EOS): documents get their EOD from the
    preprocessing step, prompts from the caller.
    """

    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        eod = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        if eod is None:
            raise ConfigError(
                f"tokenizer {hf.name_or_path!r} has no EOS (or SEP) token to use as end-of-document"
            )
        self.hf = hf
        self._eod = int(eod)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model pads it further for TP)."""
        return len(self.hf)

    @property
    def eod(self) -> int:
        """End-of-document id (the EOS token)."""
        return self._eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id; the EOD id when the tokenizer has no BOS token."""
        return self.hf.bos_token_id if self.hf.bos_token_id is not None else self._eod

    @property
    def pad(self) -> int:
        """Padding id; the EOD id when the tokenizer has no PAD token."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self._eod

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without special tokens added."""
        return self.hf.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str) -> None:
        """Save with `save_pretrained`; `build_tokenizer` (or AutoTokenizer) loads it back."""
        os.makedirs(directory, exist_ok=True)
        self.hf.save_pretrained(directory)

    def fingerprint(self) -> str:
        """A hash of the vocabulary and rules, stable across processes and save/load."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            text = backend.to_str()
        else:
            text = json.dumps(sorted(self.hf.get_vocab().items()))
        return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer({self.hf.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, pad={self.pad})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _gpt2_bpe(vocab_file: str, merge_file: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like GPT-2's from its vocab.json and merges.txt.

    Built with the `tokenizers` library directly: in transformers 5 `GPT2TokenizerFast`
    silently ignores `vocab_file=`/`merges_file=` (it takes `vocab=`/`merges=`) and yields an
    empty tokenizer.
    """
    raw = _RawTokenizer(models.BPE.from_file(vocab_file, merge_file, fuse_unk=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN, unk_token=EOD_TOKEN
    )


def _is_bare_gpt2_dir(path: str) -> bool:
    """A directory with only GPT-2's vocab.json + merges.txt (no HF tokenizer config)."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(path, name))

    return (has("vocab.json") and has("merges.txt") and not has("tokenizer.json")
            and not has("tokenizer_config.json"))


def build_tokenizer(cfg: "TokenizerConfig", *, default_dir: Optional[str] = None) -> Tokenizer:
    """Load the tokenizer `cfg` names.

    `cfg.path`: an HF hub name or a local directory; `cfg.vocab_file` + `cfg.merge_file`: GPT-2
    BPE files; neither: the tokenizer saved in `default_dir` (e.g. beside a checkpoint). A
    directory holding only `vocab.json` + `merges.txt` loads as GPT-2 BPE.
    Raises ConfigError, one line naming the field and path, when it cannot be loaded.
    """
    if cfg.vocab_file is not None or cfg.merge_file is not None:
        for name, path in (("vocab_file", cfg.vocab_file), ("merge_file", cfg.merge_file)):
            if path is None or not os.path.isfile(path):
                raise ConfigError(f"tokenizer.{name}={path!r} is not a readable file")
        try:
            return Tokenizer(_gpt2_bpe(cfg.vocab_file, cfg.merge_file))
        except ConfigError:
            raise
        except Exception as err:  # tokenizers raises plain Exceptions on bad files
            raise ConfigError(
                f"tokenizer.vocab_file={cfg.vocab_file!r} / tokenizer.merge_file="
                f"{cfg.merge_file!r}: cannot build a GPT-2 BPE tokenizer ({_first_line(err)})"
            ) from None
    if cfg.path is not None:
        field, path = "tokenizer.path", cfg.path
        if path.startswith(("/", "./", "../", "~")) and not os.path.isdir(path):
            raise ConfigError(f"tokenizer.path={path!r} is not a directory")
    elif default_dir is not None:
        field, path = "the checkpoint's tokenizer directory", default_dir
        if not os.path.isdir(path):
            raise ConfigError(f"no tokenizer given (tokenizer.path) and {field} {path!r} "
                              f"does not exist")
    else:
        raise ConfigError("no tokenizer given: set tokenizer.path or "
                          "tokenizer.vocab_file/tokenizer.merge_file")
    if _is_bare_gpt2_dir(path):
        return build_tokenizer(replace(cfg, path=None, vocab_file=os.path.join(path, "vocab.json"),
                                       merge_file=os.path.join(path, "merges.txt")))
    try:
        # never run code that comes with the tokenizer (an `auto_map` class in a checkpoint's
        # or a hub repo's tokenizer_config.json): transformers would otherwise ask on stdin
        hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # OSError, ValueError, JSON errors, hub errors offline, ...
        raise ConfigError(f"{field}={path!r}: cannot load a tokenizer ({_first_line(err)})"
                          ) from None
    return Tokenizer(hf)


# Files whose presence makes a directory (a Hugging Face model given to checkpoint.load_hf) a
# tokenizer directory.
HF_DIR_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TokenizerSource:
    """Where a run's tokenizer comes from, decided once (`choose_tokenizer`) and loaded by each
    process that needs it (`load()`); it pickles, so a launching process hands it to workers."""

    cfg: Any  # the TokenizerConfig: tokenizer.path, or vocab_file + merge_file
    saved_dir: Optional[str] = None  # a checkpoint's tokenizer/ (when cfg names none)
    embedded: Optional[Callable[[], "Tokenizer"]] = None  # the model family's embedded tokenizer

    def load(self) -> "Tokenizer":
        if self.embedded is not None:
            return self.embedded()
        return build_tokenizer(self.cfg, default_dir=self.saved_dir)


def choose_tokenizer(tok_cfg: "TokenizerConfig", *, checkpoint_iter_dir: Optional[str] = None,
                     hf_dir: Optional[str] = None,
                     embedded: Optional[Callable[[], "Tokenizer"]] = None,
                     missing: str = "no tokenizer: set tokenizer.path or tokenizer.vocab_file + "
                                    "tokenizer.merge_file") -> TokenizerSource:
    """The tokenizer rule of every command (train.py, generate.py): `tokenizer.path` /
    `tokenizer.vocab_file` + `merge_file` first; else the tokenizer saved in the checkpoint
    iteration being loaded (`checkpoint_iter_dir`/tokenizer); else a Hugging Face model
    directory's (`hf_dir`, checkpoint.load_hf); else `embedded`; else ConfigError(`missing`)."""
    if tok_cfg.path or tok_cfg.vocab_file:
        return TokenizerSource(tok_cfg)
    if checkpoint_iter_dir:
        saved = os.path.join(checkpoint_iter_dir, "tokenizer")
        if os.path.isdir(saved):
            return TokenizerSource(tok_cfg, saved_dir=saved)
    if hf_dir and any(os.path.isfile(os.path.join(hf_dir, f)) for f in HF_DIR_TOKENIZER_FILES):
        return TokenizerSource(replace(tok_cfg, path=hf_dir))
    if embedded is not None:
        return TokenizerSource(tok_cfg, embedded=embedded)
    raise ConfigError(missing)


def embedded_tokenizer() -> Tokenizer:
    """The character-level tokenizer of the embedded arithmetic corpus (offline, fixed ids).

    Ids: 0 `<|endoftext|>` (EOD and BOS), 1 `<pad>`, 2 `<unk>`, then one id per character of
    `EMBEDDED_CHARS` (digits, `+-*=`, space, newline). It is a `PreTrainedTokenizerFast`, so it
    round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    vocab = {EOD_TOKEN: 0, PAD_TOKEN: 1, UNK_TOKEN: 2}
    for char in EMBEDDED_CHARS:
        vocab[char] = len(vocab)
    raw = _RawTokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
    )
    return Tokenizer(hf)


class MegatronTokenizerAdapter:
    """What megatron-core's GPT datasets read from `GPTDatasetConfig.tokenizer`.

    Duck-typed rather than a `megatron.core.tokenizers.MegatronTokenizerBase` subclass (mcore's
    datasets never check the type), so importing this module does not import megatron-core.

    `GPTDatasetConfig` reads `vocab_size`; `GPTDataset` reads `eod`; `MockGPTLowLevelDataset`
    reads `vocab_size` and `eod`; `MegatronDataset` reads `pad` (any exception -> -1) and
    compares it with `eos`/`eod`; the dataset cache hash JSON-encodes `unique_identifiers`.

    `pad` raises when the tokenizer's pad id equals its EOD id: mcore then pads with -1 (masked
    from the loss) instead of warning that pad collides with EOD and doing the same.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.unique_identifiers: "OrderedDict[str, Any]" = OrderedDict(
            [
                ("class", type(self).__name__),
                ("vocab_size", tokenizer.vocab_size),
                ("eod", tokenizer.eod),
                ("pad", tokenizer.pad),
                ("fingerprint", tokenizer.fingerprint()),
            ]
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def vocab(self) -> dict:
        return self.tokenizer.hf.get_vocab()

    @property
    def eod(self) -> int:
        return self.tokenizer.eod

    @property
    def eos(self) -> int:
        return self.tokenizer.eod

    @property
    def bos(self) -> int:
        return self.tokenizer.bos

    @property
    def pad(self) -> int:
        if self.tokenizer.pad == self.tokenizer.eod:
            raise AttributeError("the tokenizer has no pad token distinct from EOD")
        return self.tokenizer.pad

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------
# masked-LM (BERT / T5)
# --------------------------------------------------------------------------------------------
MLM_SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", EOD_TOKEN, "<s>", UNK_TOKEN)
# The characters of the sentence-split embedded corpus ("12+35=47. 7*8=56. ...").
EMBEDDED_MLM_CHARS = "0123456789+-*= .\n"
EMBEDDED_NUM_SENTINELS = 32
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def embedded_mlm_tokenizer(num_sentinels: int = EMBEDDED_NUM_SENTINELS) -> Tokenizer:
    """The character tokenizer of the sentence-split embedded corpus, for BERT and T5.

    Ids: 0 `[PAD]`, 1 `[CLS]`, 2 `[SEP]`, 3 `[MASK]`, 4 `<|endoftext|>` (EOD/EOS), 5 `<s>` (BOS,
    T5's decoder start), 6 `<unk>`, then the T5 sentinels `<extra_id_0>` ... and one id per
    character of `EMBEDDED_MLM_CHARS`. [PAD] is 0 as in BERT's and T5's vocabularies.
    """
    sentinels = [f"<extra_id_{i}>" for i in range(num_sentinels)]
    vocab = {tok: i for i, tok in enumerate(MLM_SPECIAL_TOKENS + tuple(sentinels))}
    for char in EMBEDDED_MLM_CHARS:
        vocab[char] = len(vocab)
    raw = _RawTokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token=EOD_TOKEN, bos_token="<s>", unk_token=UNK_TOKEN,
        additional_special_tokens=sentinels,
    )
    return Tokenizer(hf)


def sentinel_ids(tokenizer: Tokenizer) -> List[int]:
    """T5 sentinel ids in order: the `<extra_id_N>` tokens by N, else the tokenizer's
    additional special tokens (transformers 5 calls them `extra_special_tokens`)."""
    vocab = tokenizer.hf.get_vocab()
    found = sorted((int(m.group(1)), i) for t, i in vocab.items()
                   for m in [_SENTINEL.fullmatch(t)] if m)
    if found:
        return [i for _, i in found]
    names: List[str] = []
    for attr in ("additional_special_tokens", "extra_special_tokens"):
        value = getattr(tokenizer.hf, attr, None)
        if isinstance(value, dict):
            value = list(value.values())
        if value:
            names = [str(v) for v in value]
            break
    return [vocab[n] for n in names if n in vocab]


def require_token(tokenizer: Tokenizer, what: str, value: Optional[int], family: str,
                  why: str) -> int:
    """`value` (a special token's id), or a one-line ConfigError naming the token."""
    if value is None:
        name = tokenizer.hf.name_or_path or "embedded"
        raise ConfigError(f"tokenizer {name!r} has no {what} token, which model.type={family} "
                          f"needs ({why})")
    return int(value)


class MaskedLMTokenizerAdapter(MegatronTokenizerAdapter):
    """What megatron-core's `BERTMaskedWordPieceDataset` / `T5MaskedWordPieceDataset` read.

    BERT needs `cls`, `sep`, `mask` and `inv_vocab` (WordPiece `##` continuation pieces are
    masked with their word); T5 needs `mask`, `bos` (the decoder start; HF T5 has none and starts
    the decoder with its pad id), `eos` and sentinel ids (`additional_special_tokens_ids`). Each
    family resolves its ids in its own `data.py` (`require_token`: a missing token is a one-line
    ConfigError naming it).

    `pad` always raises, so mcore pads with -1, a value no token has: its padding masks
    (`padding_mask`, `enc_mask`, `dec_mask`) then never confuse padding with a real token (mcore
    compares ids with the pad id after masking, when random replacement tokens may equal it).
    """

    def __init__(self, tokenizer: Tokenizer, family: str, *, cls: Optional[int],
                 sep: Optional[int], mask: int, bos: Optional[int],
                 sentinels: Sequence[int] = ()) -> None:
        """The ids come resolved by the family (framework/models/<family>/data.py); `family`
        is only part of the dataset cache key."""
        super().__init__(tokenizer)
        hf = tokenizer.hf
        self._cls, self._sep, self._mask, self._bos = cls, sep, mask, bos
        self._sentinels: List[int] = list(sentinels)
        # in id order: mcore draws random replacement tokens by position in inv_vocab's keys, and
        # a fast tokenizer's get_vocab() order differs between processes (a Rust HashMap)
        self._inv_vocab = {i: t for t, i in sorted(hf.get_vocab().items(), key=lambda kv: kv[1])}
        self.unique_identifiers["mlm"] = [family, self._cls, self._sep, self._mask,
                                          self._bos, len(self._sentinels)]

    @property
    def cls(self) -> Optional[int]:
        return self._cls

    @property
    def sep(self) -> Optional[int]:
        return self._sep

    @property
    def mask(self) -> int:
        return self._mask

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        raise AttributeError("masked-LM data pads with -1 (see MaskedLMTokenizerAdapter)")

    @property
    def inv_vocab(self) -> dict:
        return self._inv_vocab

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return list(self._sentinels)


def vocab_difference(ours, theirs, moved_only: bool = False) -> Optional[str]:
    """How tokenizer `ours` maps tokens to other ids than `theirs` ("3 tokens have other ids
    (e.g. '1': 5 in the checkpoint, 6 here)"), or None when their vocabularies are the same.
    `moved_only`: None also when the only difference is tokens one of them lacks (a vocabulary
    extended with new ids)."""
    mine, other = ours.hf.get_vocab(), theirs.hf.get_vocab()
    if mine == other:
        return None
    moved = sorted(t for t in set(mine) & set(other) if mine[t] != other[t])
    if moved:
        return (f"{len(moved)} tokens have other ids (e.g. {moved[0]!r}: {other[moved[0]]} in "
                f"the checkpoint, {mine[moved[0]]} here)")
    if moved_only:
        return None
    return f"{len(set(mine) ^ set(other))} tokens are in one vocabulary only"
