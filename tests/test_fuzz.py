"""Property-based fuzzing of the entry points (hypothesis): random input never gives a traceback
or a hang, only a clean result or one `error:` line (exit 2).

* `train.py` overrides, in process: Hydra composes the config from conf/ exactly as
  `@hydra.main` does (compose API for the group options, cached per set of them; Hydra's own
  override application for the values), then `train.to_config` and `framework.plan.make_plan`
  (every check before a worker starts: world, device, tokenizer, model settings against
  megatron-core, memory, output directories). Each case ends in a config or one error line,
  classified as train.py would print it (`framework.cli.hydra_error_line` for Hydra's errors,
  `report_errors` for ours).
* `train.py` overrides, a handful of real subprocess runs with `train.max_steps=1`.
* `data_tools.preprocess` on random JSON-lines files (`main()` in process): valid records with text
  from every Unicode plane, empty and blank documents, and lines broken in known ways (invalid
  JSON, a missing key, non-string values, deep nesting, huge integers, invalid UTF-8, lone
  surrogates, over-long lines), optionally gzipped, truncated or UTF-16. The error must name the
  input and the first bad line.

Example counts: 120 override sets and 80 JSONL files by default; FUZZ_SCALE=10 runs ten times
as many. Each test prints its counts (cases, clean, one-line errors, tracebacks, hangs).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import os
import signal
import subprocess
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import run_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
HANG_S = 120  # one case taking longer than this (on a loaded 2-core machine) is a hang


def _settings(n: int, **kw):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), **kw)


class Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _report(capsys, what: str, counts: dict) -> None:
    with capsys.disabled():
        print(f"\nfuzz {what}: {counts['cases']} cases, {counts['clean']} clean, "
              f"{counts['errors']} one-line errors, tracebacks {counts['tracebacks']}, "
              f"hangs {counts['hangs']}")


# --------------------------------------------------------------------------------------------
# train.py overrides
# --------------------------------------------------------------------------------------------
GROUPS = {
    "model": ["gpt_tiny", "bert_tiny", "t5_tiny", "gpt2_small", "gpt3", "model_schema"],
    "parallel": ["single", "tp2", "pp2", "tp2_sp", "dp_distopt", "pp2_vpp2", "nope"],
    "optimizer": ["adam", "sgd", "optimizer_schema"],
    "data": ["embedded", "mock", "indexed"],
    "logging": ["default", "tensorboard"],
}
# keys whose values name paths: only these values (inside the test's tmp dir, or unusable)
PATH_KEYS = {"checkpoint.dir", "checkpoint.load", "checkpoint.load_hf", "data.path_to_cache",
             "tokenizer.path", "tokenizer.vocab_file", "tokenizer.merge_file", "data.path"}
SKIP_KEYS = {"run_dir", "train.step", "model.flex_kernel_options", "train.profile"}
INTS = ["0", "-1", "1", "2", "3", "4", "7", "8", "16", "64", "1000", "2147483647", "2147483648",
        "1000000000", "99999999999999999999", "-99999999999"]
FLOATS = ["0", "0.0", "-0.5", "0.5", "0.999", "1", "1.0", "1e-8", "1e30", "nan", "inf", "-inf",
          "1e999", "-0.0"]
ODD = ["abc", "null", "''", "[]", "[1,2]", "{a:1}", "true", "false", "maybe", "${oc.env:NOPE}",
       "'${oc.env:HOME}'"]
BROKEN = ["train.max_steps=[", "=3", "model.num_layers==2", "train..max_steps=1", "~train",
          "model.num_layers=${", "optimizer.lr=1,2", "+train.bogus=1", "++model.foo=3",
          ]


def _schema_fields():
    """(dotted key, python type) of every leaf field of the train schema."""
    from framework.config import Config

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            key, t = prefix + f.name, hints[f.name]
            args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
            sub = next((a for a in args if is_dataclass(a)), None)
            if sub is not None:
                walk(sub, key + ".")
            elif key not in SKIP_KEYS and not any(key.startswith(s + ".") for s in SKIP_KEYS):
                out.append((key, args[0]))

    walk(Config, "")
    return out


FIELDS = None


def _value_for(key: str, typ, tmp: str):
    if key in PATH_KEYS:
        return st.sampled_from([f"{tmp}/p", f"{tmp}/p/q", "/proc/fw-fuzz", "/etc/passwd/x",
                                "''", "null", f"[{tmp}/nothing]"])
    origin = typing.get_origin(typ)
    if typ is bool:
        base = st.sampled_from(["true", "false"])
    elif typ is int:
        base = st.one_of(st.sampled_from(INTS), st.integers(-5, 300).map(str))
    elif typ is float:
        base = st.one_of(st.sampled_from(FLOATS),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))
    elif origin in (list, typing.List):
        base = st.sampled_from(["[]", "[1]", "[core_attn]", "[mlp,bogus]", "[1,0]", "[3,1]"])
    else:
        base = st.sampled_from(["auto", "cpu", "cuda", "skip", "stop", "gpt", "bert", "t5", "x",
                                "LayerNorm", "RMSNorm", "rope", "alibi", "relative", "full",
                                "selective", "uniform", "block", "cosine", "sgd", "949,50,1",
                                "1,1", "offline", "multiquery"])
    return st.one_of(base, base, base, st.sampled_from(ODD + INTS[:3] + FLOATS[8:11]))


@st.composite
def override_sets(draw, tmp: str, unknown: bool = True):
    global FIELDS
    FIELDS = FIELDS or _schema_fields()
    groups = {}
    if draw(st.integers(0, 3)) == 0:  # group options in a quarter of the cases (compose cost)
        for g, opts in GROUPS.items():
            if draw(st.integers(0, 2)) == 0:
                groups[g] = draw(st.sampled_from(opts))
    values = []
    for _ in range(draw(st.integers(0, 6))):
        key, typ = draw(st.sampled_from(FIELDS))
        values.append(f"{key}={draw(_value_for(key, typ, tmp))}")
    if unknown and draw(st.integers(0, 5)) == 0:
        key, _ = draw(st.sampled_from(FIELDS))
        mangled = draw(st.sampled_from([key + "s", key[:-1], key.replace(".", "_", 1),
                                        key.rsplit(".", 1)[-1], "bogus." + key]))
        values.append(f"{mangled}={draw(st.sampled_from(INTS[:6]))}")
    if unknown and draw(st.integers(0, 9)) == 0:
        values.append(draw(st.sampled_from(BROKEN)))
    return groups, values


_COMPOSED: dict = {}


def _compose(groups: dict, tmp: str):
    """Hydra's compose of conf/train.yaml with these group options (cached), as a fresh copy."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    key = tuple(sorted(groups.items()))
    if key not in _COMPOSED:
        try:
            with initialize_config_dir(config_dir=CONF, version_base=None):
                cfg = compose(config_name="train", return_hydra_config=True,
                              overrides=[f"{g}={o}" for g, o in key])
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = f"{tmp}/run"
                cfg.hydra.runtime.cwd = tmp
            _COMPOSED[key] = cfg
        except Exception as ex:  # noqa: BLE001 - the same error for every case with these
            _COMPOSED[key] = ex
    got = _COMPOSED[key]
    if isinstance(got, Exception):
        raise got
    return copy.deepcopy(got)


def train_outcome(groups: dict, values: list, tmp: str):
    """None for a config that passes every check before launch, else the one error line that
    train.py prints. Anything that train.py would print as a traceback propagates."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    import train
    from framework.cli import hydra_error_line
    from framework.config import Config, ConfigError
    from framework.plan import make_plan as prepare

    try:  # what Hydra does before calling the task: compose, then apply the value overrides
        cfg = _compose(groups, tmp)
        parsed = OverridesParser.create().parse_overrides(values)
        ConfigLoaderImpl._apply_overrides_to_config(
            [o for o in parsed if not o.is_sweep_override()], cfg)
        if any(o.is_sweep_override() for o in parsed):
            from hydra.errors import ConfigCompositionException

            raise ConfigCompositionException("Ambiguous value for argument: sweep in a run")
    except Exception as ex:  # noqa: BLE001
        line = hydra_error_line(ex, Config)
        if line is None:
            raise
        return line
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if not any(v.startswith("checkpoint.dir=") for v in values):
            cfg.checkpoint.dir = f"{tmp}/ckpt"
    try:  # what report_errors does around the task
        prepare(train.to_config(cfg))
        return None
    except ConfigError as e:
        return str(e)
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e.__context__
        return str(cause) if isinstance(cause, ConfigError) else str(e).strip().splitlines()[0]


@pytest.fixture(scope="module")
def fuzz_tmp(tmp_path_factory):
    """A scratch directory, and the first (slow: megatron-core's imports) case run outside the
    per-case time limit."""
    tmp = str(tmp_path_factory.mktemp("fuzz"))
    assert train_outcome({}, [], tmp) is None
    return tmp


def test_train_overrides_in_process(fuzz_tmp, capsys):
    counts = dict(cases=0, clean=0, errors=0, tracebacks=0, hangs=0)

    @_settings(120)
    @given(override_sets(fuzz_tmp))
    def prop(case):
        groups, values = case
        counts["cases"] += 1
        try:
            with _time_limit(HANG_S):
                line = train_outcome(groups, values, fuzz_tmp)
        except Hang:
            counts["hangs"] += 1
            raise
        except Exception:
            counts["tracebacks"] += 1
            raise
        if line is None:
            counts["clean"] += 1
        else:
            counts["errors"] += 1
            assert line.strip() and "\n" not in line, (groups, values, line)
            assert "Traceback" not in line

    prop()
    _report(capsys, "train.py overrides (in process)", counts)
    assert counts["tracebacks"] == 0 and counts["hangs"] == 0


def test_train_known_cases_in_process(fuzz_tmp):
    """Fixed cases the random search may miss; each names its field."""
    cases = [
        ({}, ["optimizer.lr=inf"], "optimizer.lr"),
        ({"model": "gpt3"}, [], "choose one of"),
        ({}, ["train.max_step=10"], "did you mean train.max_steps"),
        ({}, ["optimizer.lr=abc"], "optimizer.lr=abc"),
        ({}, ["train.max_steps=["], "cannot parse"),
        ({}, ["data.path_to_cache=/proc/fw-fuzz"], "data.path_to_cache"),
        ({}, ["checkpoint.dir=/etc/passwd/x"], "checkpoint.dir"),
        ({}, ["model.hidden_size=1000000"], "GiB"),
        ({}, ["model.vocab_size=0"], "model.vocab_size"),
        ({}, ["model.ffn_hidden_size=0"], "model.ffn_hidden_size"),
        ({}, ["parallel.tensor_model_parallel_size=64", "model.num_attention_heads=64",
              "model.hidden_size=128"], "worker processes"),
        ({}, [], None),
    ]
    for groups, values, needle in cases:
        line = train_outcome(groups, values, fuzz_tmp)
        if needle is None:
            assert line is None, line
        else:
            assert line and needle in line and "\n" not in line, (values, line)


def _train_subprocess(overrides, cwd):
    base = ["train.max_steps=1", "train.progress_bar=false", "train.eval_interval=0",
            "train.device=cpu", f"checkpoint.dir={cwd}/ckpt"]
    try:
        return run_train(*base, *overrides, cwd=cwd, name="run", fast=False, expect=None,
                         timeout=600)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
def test_train_overrides_subprocess(tmp_path, capsys):
    """A handful of real `train.py ... train.max_steps=1` runs, with overrides drawn from the
    same strategy (fixed seed; tiny models only, so that a run that trains is short)."""
    drawn = []

    @settings(max_examples=4, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(override_sets(str(tmp_path), unknown=True))
    def collect(case):
        groups, values = case
        groups = {g: o for g, o in groups.items() if g != "model"}  # gpt_tiny: fast
        values = [v for v in values if not v.startswith(("model.num_layers", "model.hidden",
                                                         "model.seq", "train.micro",
                                                         "train.global", "train.max_steps"))]
        drawn.append([f"{g}={o}" for g, o in groups.items()] + values)

    collect()
    drawn.append(["optimizer.lr=inf"])  # the run that used to train and save
    dirs = []
    for i, _ in enumerate(drawn):
        (tmp_path / str(i)).mkdir()
        dirs.append(str(tmp_path / str(i)))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_train_subprocess, drawn, dirs))
    counts = dict(cases=len(drawn), clean=0, errors=0, tracebacks=0, hangs=0)
    problems = []
    for overrides, r in zip(drawn, results):
        if r is None:
            counts["hangs"] += 1
            problems.append(f"{overrides}: no exit within 600 s")
            continue
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        if r.returncode == 0 and not errors:
            counts["clean"] += 1
        elif r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr:
            counts["errors"] += 1
        else:
            counts["tracebacks"] += "Traceback" in r.stderr
            problems.append(f"{overrides}: rc={r.returncode} stderr={r.stderr[-1500:]}")
    _report(capsys, "train.py overrides (subprocess, train.max_steps=1)", counts)
    assert not problems, "\n".join(problems)
    assert results[-1].returncode == 2 and "optimizer.lr" in results[-1].stderr


# --------------------------------------------------------------------------------------------
# data_tools.preprocess
# --------------------------------------------------------------------------------------------
MAX_LINE = 4096  # --max-line-bytes for the fuzz: long lines stay cheap


def _byte_bpe(directory: Path) -> str:
    """A tiny byte-level BPE (every byte is a token, so any non-empty text has tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(directory))
    return str(directory)


TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
GOOD = "good"


BAD_KINDS = ["not_json", "not_object", "no_key", "not_string", "deep", "bigint", "bad_utf8",
             "surrogate", "too_long"]


@st.composite
def jsonl_lines(draw, bad: bool):
    """(bytes of one line without newline, kind): kind is 'good', 'blank' (skipped), 'empty'
    (a record with blank text) or, with `bad`, one of BAD_KINDS."""
    kind = draw(st.sampled_from([GOOD] * 4 + ["empty", "blank"] + (BAD_KINDS if bad else [])))
    text = draw(TEXT)
    extra = draw(st.dictionaries(st.sampled_from(["id", "meta", "n"]),
                                 st.one_of(st.integers(), st.floats(), TEXT, st.none()),
                                 max_size=2))
    ascii_ = draw(st.booleans())
    if kind == GOOD:
        if not text.strip():
            text += "x"
        return json.dumps({**extra, "text": text}, ensure_ascii=ascii_).encode(), kind
    if kind == "empty":
        return json.dumps({"text": draw(st.sampled_from(["", " ", "\t \n"]))}).encode(), kind
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"  \t "])), kind
    if kind == "not_json":
        good = json.dumps({"text": text}).encode()
        return draw(st.sampled_from([good[:-1], b"{text: 1}", b"{'text': 'a'}",
                                     b'{"text": "a",}', b"nul", b"\x01{}"])), kind
    if kind == "not_object":
        return draw(st.sampled_from([b"[1, 2]", b'"text"', b"3", b"null", b"true"])), kind
    if kind == "no_key":
        return json.dumps({**extra, "body": text}).encode(), kind
    if kind == "not_string":
        value = draw(st.one_of(st.integers(), st.floats(), st.none(), st.booleans(),
                               st.lists(st.integers(), max_size=3), st.just({"a": "b"})))
        return json.dumps({"text": value}).encode(), kind
    if kind == "deep":
        depth = draw(st.sampled_from([2000, 100000]))
        return b'{"text": "a", "x": ' + b"[" * depth + b"]" * depth + b"}", kind
    if kind == "bigint":
        return b'{"text": "a", "n": ' + b"7" * draw(st.integers(4301, 6000)) + b"}", kind
    if kind == "bad_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80",
                                     b"\x80abc", b"\xe2\x82"]))
        return b'{"text": "a' + junk + b'"}', kind
    if kind == "surrogate":
        cp = draw(st.integers(0xD800, 0xDFFF))
        return b'{"text": "ab\\u%04x c"}' % cp, kind
    return b'{"text": "' + b"9" * MAX_LINE + b'"}', kind  # too_long


@st.composite
def jsonl_files(draw):
    lines = draw(st.lists(jsonl_lines(bad=draw(st.booleans())), max_size=12))
    wrap = draw(st.sampled_from(["plain"] * 8 + ["gzip", "gzip_truncated", "not_gzip", "utf16",
                                                 "bom", "gzip"]))
    newline_at_end = draw(st.booleans())
    return lines, wrap, newline_at_end


def _expected(lines, wrap):
    """(True, None) for a clean run, or (False, needle) that the error line must contain."""
    if wrap in ("not_gzip", "gzip_truncated", "utf16") and lines:
        return False, None  # the file as a whole; the error names it
    for number, (_raw, kind) in enumerate(lines, start=1):
        if kind not in (GOOD, "empty", "blank"):
            return False, f":{number}:"
    if not any(kind == GOOD for _raw, kind in lines):
        return False, "no text"
    return True, None


def test_preprocess_jsonl_in_process(tmp_path_factory, capsys):
    from data_tools.preprocess import main
    from framework.data.indexed import read_index

    base = tmp_path_factory.mktemp("pp")
    tok = _byte_bpe(base / "tok")
    counts = dict(cases=0, clean=0, errors=0, tracebacks=0, hangs=0)

    @_settings(80)
    @given(jsonl_files())
    def prop(case):
        lines, wrap, newline_at_end = case
        counts["cases"] += 1
        n = counts["cases"]
        data = b"\n".join(raw for raw, _ in lines) + (b"\n" if newline_at_end and lines else b"")
        path = base / f"in{n}.jsonl"
        if wrap == "bom":
            data = b"\xef\xbb\xbf" + data
        elif wrap == "utf16":
            data = data.decode("utf-8", "surrogateescape").encode("utf-16", "surrogatepass")
        elif wrap.startswith("gzip") or wrap == "not_gzip":
            path = base / f"in{n}.jsonl.gz"
            if wrap != "not_gzip":
                data = gzip.compress(data)
            if wrap == "gzip_truncated":
                data = data[:-9]
        path.write_bytes(data)
        out = base / f"out{n}" / "c"
        err = io.StringIO()
        try:
            with _time_limit(HANG_S), contextlib.redirect_stderr(err), \
                    contextlib.redirect_stdout(io.StringIO()):
                code = main(["--input", str(path), "--tokenizer", tok, "--append-eod",
                             "--max-line-bytes", str(MAX_LINE), "--output-prefix", str(out)])
        except Hang:
            counts["hangs"] += 1
            raise
        except BaseException:
            counts["tracebacks"] += 1
            raise
        clean, needle = _expected(lines, wrap)
        if wrap == "utf16" and not lines:
            clean, needle = False, None
        message = err.getvalue().strip()
        if clean:
            assert code == 0, (lines, wrap, message)
            counts["clean"] += 1
            info = read_index(str(out) + "_text_document")
            records = sum(kind != "blank" for _raw, kind in lines)
            assert len(info.document_indices) - 1 == records
        else:
            counts["errors"] += 1
            assert code == 2, (lines, wrap)
            assert message.startswith("error: ") and "\n" not in message, message
            assert str(path) in message, message
            if needle and wrap not in ("gzip_truncated",):
                assert needle in message, (needle, message, [k for _, k in lines])
            assert not out.parent.exists() or not any(
                p.suffix in (".bin", ".idx") for p in out.parent.iterdir()), message

    prop()
    _report(capsys, "data_tools.preprocess JSONL (in process)", counts)
    assert counts["tracebacks"] == 0 and counts["hangs"] == 0
