"""Every command a user copies from README.md works as written.

The README is parsed (fenced and indented code blocks, inline code) for every `python train.py`,
`python generate.py`, `python -m data_tools.*` / `python data_tools/*.py` and `torchrun ...`
command, and each is checked in this process the way its entry point would take it, without
training:

* train.py: Hydra composes conf/train.yaml with the command's overrides (a `-m` sweep is expanded
  into its jobs, as Hydra's basic sweeper does) and `train.to_config` runs its checks. Then the
  layout must pass `Config.resolve_world` on GPUs at the world size the command implies (TP x PP
  x DP, the SLURM launcher's nodes x tasks, or torchrun's processes), and `framework.plan.
  make_plan` on this CPU machine must either pass or stop at the framework's one-line GPU-only
  error. A command whose plan needs an input that only the user has (a Hugging Face directory,
  a hub tokenizer, a checkpoint made by another README command) is listed in PLAN_STOPS with
  the reason and the line it must stop at, so everything before that line is still checked.
* generate.py: Hydra composes conf/generate.yaml and `generate.to_config` runs; then
  `framework.inference.prepare_job` (every check before a model is built) runs against a tiny
  checkpoint of the embedded corpus, which stands for `checkpoints/default` and `<ckpt>`.
* data_tools: the tool's own argument parser takes the command; `preprocess` then really runs
  on a tiny JSON-lines file at the `--input` path (with the offline embedded tokenizer in place
  of the hub tokenizer the README names), and a train command of the same code block must read
  what it wrote, with the same tokenizer.

Placeholders (`<ckpt>`, `[...]`, a trailing `...`) are replaced by PLACEHOLDERS; an unknown
placeholder fails the test, so a new README command is checked by default.
"""
import copy
import itertools
import os
import re
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from helpers import ROOT

README = os.path.join(ROOT, "README.md")
CONF = os.path.join(ROOT, "conf")

# What a placeholder in a README command stands for here ({ckpt}: the tiny checkpoint). A
# standalone `...` token ("and more overrides") is dropped.
PLACEHOLDERS = {
    "<HF gpt2 dir>": "hf_gpt2",
    "<ckpt>": "{ckpt}",
    "<p>": "gpu",
    "<name>": "my_sweep",
    "data.path=[...]": "data.path=[data/my_text_document]",
}

# train.py commands whose plan on this machine needs something only the user has: the plan must
# stop with a one-line error containing `needle` (everything before it is checked), and the
# reason says why. A command not listed here must plan cleanly or stop at a GPU-only line.
PLAN_STOPS: Dict[str, Tuple[str, str]] = {
    "python train.py model=t5_base parallel=tp2 data=indexed data.path=[...] "
    "tokenizer.path=t5-base":
        ("the user's indexed data ([...]) and the hub tokenizer t5-base (no network here)",
         "tokenizer.path='t5-base': cannot load a tokenizer"),
    "python train.py model=gpt2_small data=indexed data.path=[...] "
    "checkpoint.load_hf=<HF gpt2 dir>":
        ("a Hugging Face GPT-2 directory (<HF gpt2 dir>) that only the user has (its config, "
         "weights and tokenizer)", "hf_gpt2 is not a directory"),
    "python train.py model=llama3_2_1b parallel=tp2 checkpoint.load=ckpt/llama1b data=indexed "
    "data.path=[data/my_text_document] tokenizer.path=Llama-3.2-1B checkpoint.dir=ckpt/ft":
        ("ckpt/llama1b, which the block's convert command makes from Meta's Llama-3.2-1B files",
         "checkpoint.load=ckpt/llama1b has no committed checkpoint"),
}

# python commands of the README that are not the framework's entry points
NOT_ENTRY_POINTS = ("python -m pytest", "python -m coverage")

# the framework's one-line errors for a layout or precision that needs GPUs, run on a CPU
GPU_ONLY = re.compile(r"needs (a )?GPUs?\b|needs a CUDA device|CUDA-only")


# --------------------------------------------------------------------------------------------
# the README's commands
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    text: str  # as written: continuation lines joined, the trailing comment dropped
    line: int  # where it starts in README.md
    block: Optional[int]  # the code block it is in (None: inline code)

    @property
    def kind(self) -> str:
        words = self.argv
        if words[0] == "torchrun":
            script = next((w for w in words[1:] if w.endswith(".py")), "")
            return {"train.py": "train", "generate.py": "generate"}.get(script, "other")
        if words[0] in ("train.py", "generate.py"):  # inline `generate.py add_bos=true`
            return words[0][:-3]
        if len(words) > 1 and words[1] in ("train.py", "generate.py"):
            return words[1][:-3]
        if len(words) > 2 and words[1] == "-m" and words[2].startswith("data_tools."):
            return "data_tools"
        if len(words) > 1 and words[1].startswith("data_tools/"):
            return "data_tools"
        return "other"

    @property
    def argv(self) -> List[str]:
        return shlex.split(self.text)


def _strip_env(text: str) -> str:
    """`A=1 B=2 python ...` -> `python ...` (environment assignments before the command)."""
    return re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", text)


def _command_text(text: str) -> Optional[str]:
    text = _strip_env(" ".join(text.split()))
    if re.match(r"(python3?|torchrun) ", text) or re.match(r"(train|generate)\.py \S", text):
        return text
    return None


def _drop_comment(line: str) -> str:
    """A shell line without its `# comment` (a `#` inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def readme_commands(text: Optional[str] = None) -> List[Command]:
    text = open(README, encoding="utf-8").read() if text is None else text
    lines = text.split("\n")
    found: List[Command] = []
    outside = list(lines)  # the text outside fenced blocks (for inline code), same line numbers
    in_fence, block, blocks = False, None, 0
    pending, start = "", 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            blocks += in_fence
            block = blocks if in_fence else None
            outside[i] = ""
            continue
        # a command line: in a fenced block, or an indented code block outside one
        code = in_fence or (line.startswith("    ") and not lines[i - 1].strip())
        if in_fence:
            outside[i] = ""
        if pending or (code and _command_text(stripped)):
            if not pending:
                start = i
                if not in_fence:  # an indented block is a block of its own
                    blocks += 1
                    block = blocks
                outside[i] = ""
            pending += " " + stripped
            if pending.endswith("\\"):
                pending = pending[:-1]
                if not in_fence:
                    outside[i + 1] = ""
                continue
            cmd = _command_text(_drop_comment(pending.strip()))
            if cmd:
                found.append(Command(cmd, start + 1, block))
            pending = ""
            if not in_fence:
                block = None
    inline = "\n".join(outside)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", inline):
        cmd = _command_text(m.group(1))
        if cmd:
            found.append(Command(cmd, inline.count("\n", 0, m.start()) + 1, None))
    seen, unique = set(), []
    for c in found:  # the same command written twice is checked once
        if c.text not in seen:
            seen.add(c.text)
            unique.append(c)
    return unique


COMMANDS = readme_commands()


def _of(kind):
    return [pytest.param(c, id=f"L{c.line}:{c.text[:90]}") for c in COMMANDS if c.kind == kind]


def _substitute(text: str, ckpt: str = "ckpt") -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value.format(ckpt=ckpt))
    words = [w for w in shlex.split(text) if w != "..."]
    left = [w for w in words if re.search(r"<[^>]*>|\.\.\.", w)]
    assert not left, f"unknown placeholder in {left}: add it to PLACEHOLDERS"
    return shlex.join(words)


# --------------------------------------------------------------------------------------------
# train.py, composed and planned in this process
# --------------------------------------------------------------------------------------------
@dataclass
class TrainArgs:
    overrides: List[str]
    multirun: bool
    world: Optional[int]  # set by the launcher (torchrun); None: the layout's


def train_args(argv: List[str]) -> TrainArgs:
    world = None
    if argv[0] == "torchrun":
        at = next(i for i, w in enumerate(argv) if w.endswith("train.py"))
        opts, words = {}, argv[1:at]
        for i, w in enumerate(words):  # --opt=value or --opt value
            if w.startswith("--"):
                key, eq, value = w[2:].partition("=")
                opts[key.replace("_", "-")] = value if eq else (words[i + 1:i + 2] or [""])[0]
        world = int(opts.get("nnodes", "1").split(":")[-1]) * int(opts["nproc-per-node"])
        rest = argv[at + 1:]
    else:
        rest = argv[argv.index("train.py") + 1:] if "train.py" in argv else argv[1:]
    multirun, overrides, i = False, [], 0
    while i < len(rest):
        w = rest[i]
        if w in ("-m", "--multirun"):
            multirun = True
        elif w in ("--cfg", "-c"):  # Hydra prints the composed config instead of running
            assert rest[i + 1] in ("job", "hydra", "all"), f"--cfg {rest[i + 1]}: job|hydra|all"
            i += 1
        elif w.startswith("-"):
            raise AssertionError(f"{w}: not a train.py (Hydra) flag this test knows")
        else:
            overrides.append(w)
        i += 1
    return TrainArgs(overrides, multirun, world)


def sweep_jobs(overrides: List[str], multirun: bool) -> List[List[str]]:
    """The jobs a command runs: itself, or every combination of a `-m` sweep's values."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return list(itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None)))


def _hydra_config(config_name: str, overrides: List[str], multirun: bool, cwd: str):
    """Hydra's composed config with the runtime fields train.py/generate.py read, made the
    current HydraConfig. Returns (task config, hydra config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.path.join(cwd, "run")
        cfg.hydra.runtime.cwd = cwd
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    hydra_cfg = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra_cfg


def _one_line(ex: BaseException, schema) -> str:
    from framework.cli import hydra_error_line
    from framework.config import ConfigError

    cause = ex
    while not isinstance(cause, ConfigError) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConfigError):
        return str(cause)
    return hydra_error_line(ex, schema) or repr(ex)


def train_config(overrides: List[str], multirun: bool, cwd: str):
    """(Config, hydra config) as train.py makes them; an error fails with train.py's line."""
    import train
    from framework.config import Config

    try:
        dcfg, hydra_cfg = _hydra_config("train", overrides, multirun, cwd)
        return train.to_config(dcfg), hydra_cfg
    except Exception as ex:  # noqa: BLE001 - reported as the line train.py would print
        raise AssertionError(f"train.py {' '.join(overrides)}: error: {_one_line(ex, Config)}") \
            from ex


@pytest.fixture
def on_this_cpu(monkeypatch, tmp_path):
    """A CPU machine, not under torchrun or SLURM, in a scratch working directory (relative
    paths of the commands land there); Hydra's config is cleared afterwards."""
    import framework.inference
    import framework.plan
    from framework.errors import ConfigError
    from hydra.core.hydra_config import HydraConfig

    def cpu_device(kind: str, key: str = "train.device") -> str:
        if kind == "cuda":
            raise ConfigError(f"{key}=cuda but no CUDA device is visible")
        return "cpu"

    for name in ("WORLD_SIZE", "SLURM_NTASKS", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(framework.plan, "resolve_device", cpu_device)
    monkeypatch.setattr(framework.inference, "resolve_device", cpu_device)
    monkeypatch.chdir(tmp_path)
    yield str(tmp_path)
    HydraConfig.instance().cfg = None


def check_train(cmd: Command, cwd: str) -> List[str]:
    """Check one train.py command; returns a note per job (what it was checked to)."""
    from framework.config import ConfigError
    from framework.plan import make_plan

    args = train_args(shlex.split(_substitute(cmd.text)))
    stop = PLAN_STOPS.get(cmd.text)
    notes = []
    for n, job in enumerate(sweep_jobs(args.overrides, args.multirun)):
        job_dir = os.path.join(cwd, f"job{n}")
        os.makedirs(job_dir)
        cfg, hydra_cfg = train_config(job, args.multirun, job_dir)
        # on GPUs: the world the command implies
        world = args.world
        if world is None and hydra_cfg.runtime.choices.get("hydra/launcher") == "slurm":
            world = hydra_cfg.launcher.nodes * hydra_cfg.launcher.tasks_per_node
        if world is None:
            p = cfg.parallel
            world = p.model_parallel_size * (p.data_parallel_size or 1)
        try:
            copy.deepcopy(cfg).resolve_world(world, on_gpu=True)
        except ConfigError as e:
            raise AssertionError(f"{job}: on {world} GPUs: error: {e}") from e
        # on this CPU machine: everything the launching process checks
        try:
            make_plan(cfg)
            outcome = "planned on CPU"
        except ConfigError as e:
            line = str(e)
            assert "\n" not in line, line
            if GPU_ONLY.search(line):
                outcome = f"GPU-only on CPU: {line}"
            elif stop is not None and stop[1] in line:
                outcome = f"stops at the user's input ({stop[0]}): {line}"
            else:
                raise AssertionError(f"{job}: on this CPU machine: error: {line}") from e
        else:
            assert stop is None, f"{cmd.text} now plans cleanly: remove it from PLAN_STOPS"
        notes.append(f"{job} on {world} GPUs: ok; {outcome}")
    return notes


@pytest.mark.parametrize("cmd", _of("train"))
def test_train_command(cmd, on_this_cpu):
    check_train(cmd, on_this_cpu)


# --------------------------------------------------------------------------------------------
# generate.py, against a tiny checkpoint of the embedded corpus
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny (untrained) GPT checkpoint of a data=embedded run, with its tokenizer."""
    from helpers import gloo_world, save_tiny_gpt_checkpoint

    with gloo_world(tp=1):
        return save_tiny_gpt_checkpoint(
            str(tmp_path_factory.mktemp("readme") / "ckpt"), num_layers=2, hidden_size=32,
            num_attention_heads=4, seq_length=64, make_vocab_size_divisible_by=8)


def check_generate(cmd: Command, cwd: str, ckpt: str) -> None:
    import generate
    from framework.inference import GenerateConfig, prepare_job

    os.makedirs(os.path.join(cwd, "checkpoints"), exist_ok=True)
    default = os.path.join(cwd, "checkpoints", "default")
    if not os.path.exists(default):
        os.symlink(ckpt, default)  # what `python train.py` leaves behind
    argv = shlex.split(_substitute(cmd.text, ckpt=ckpt))
    at = next(i for i, w in enumerate(argv) if w.endswith("generate.py"))
    overrides = argv[at + 1:]
    for w in overrides:
        assert not w.startswith("-"), f"{w}: not a generate.py flag this test knows"
    try:
        dcfg, _ = _hydra_config("generate", overrides, False, cwd)
        cfg = generate.to_config(dcfg)
        prepare_job(cfg)
    except Exception as ex:  # noqa: BLE001 - reported as the line generate.py would print
        raise AssertionError(f"generate.py {' '.join(overrides)}: error: "
                             f"{_one_line(ex, GenerateConfig)}") from ex


@pytest.mark.parametrize("cmd", _of("generate"))
def test_generate_command(cmd, on_this_cpu, tiny_ckpt):
    check_generate(cmd, on_this_cpu, tiny_ckpt)


# --------------------------------------------------------------------------------------------
# data_tools
# --------------------------------------------------------------------------------------------
def _tool_args(argv: List[str]) -> Tuple[str, List[str]]:
    if argv[1] == "-m":
        return argv[2].split(".", 1)[1], argv[3:]
    return os.path.splitext(os.path.basename(argv[1]))[0], argv[2:]


def _parse(parser_fn, args: List[str], capsys):
    try:
        return parser_fn(args)
    except SystemExit as e:  # argparse: a wrong flag or value
        why = capsys.readouterr().err.strip().splitlines()[-1]
        raise AssertionError(f"{' '.join(args)}: {why}") from e


def check_data_tool(cmd: Command, cwd: str, capsys, monkeypatch) -> Optional[List[str]]:
    """Parse with the tool's own parser; run preprocess for real. Returns preprocess's outputs
    (relative to `cwd`)."""
    tool, args = _tool_args(shlex.split(_substitute(cmd.text)))
    if tool == "convert":
        from data_tools.convert import build_parser
        from framework.interop.hf_files import parse_size

        ns = _parse(build_parser().parse_args, args, capsys)
        if getattr(ns, "max_shard_size", None) is not None:
            assert parse_size(ns.max_shard_size) > 0
        return None
    assert tool == "preprocess", f"data_tools.{tool}: a tool this test does not know"
    import json

    import data_tools.preprocess as preprocess
    from framework.tokenizer import embedded_tokenizer

    ns = _parse(preprocess.parse_args, args, capsys)
    for path in ns.input:  # the user's corpus: a few records under the command's keys
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            for i in range(6):
                f.write(json.dumps({k: f"{i}+{i}={2 * i}. {i}*3={3 * i}." for k in ns.json_keys})
                        + "\n")
    # the hub tokenizer named (gpt2, bert-base-uncased, ...) cannot be fetched here
    monkeypatch.setattr(preprocess, "_build_tokenizer", lambda _args: embedded_tokenizer())
    ns.progress = False
    prefixes = preprocess.run(ns)
    return [os.path.relpath(p, cwd) for p in prefixes]


@pytest.mark.parametrize("cmd", _of("data_tools"))
def test_data_tools_command(cmd, on_this_cpu, capsys, monkeypatch):
    check_data_tool(cmd, on_this_cpu, capsys, monkeypatch)


def test_train_reads_what_preprocess_wrote_in_its_block(on_this_cpu, capsys, monkeypatch):
    """In a code block with `preprocess` then `train.py data=indexed`, the training command
    reads the files preprocess writes, with the tokenizer they were made with."""
    checked = 0
    for block in sorted({c.block for c in COMMANDS if c.block is not None}):
        cmds = [c for c in COMMANDS if c.block == block]
        pre = [c for c in cmds if c.kind == "data_tools" and "preprocess" in c.text]
        if not pre:
            continue
        written = {p for c in pre for p in check_data_tool(c, on_this_cpu, capsys, monkeypatch)}
        tokenizers = {shlex.split(c.text)[shlex.split(c.text).index("--tokenizer") + 1]
                      for c in pre if "--tokenizer" in c.text}
        for c in cmds:
            if c.kind != "train":
                continue
            kv = dict(w.split("=", 1) for w in shlex.split(c.text) if "=" in w)
            if kv.get("data") != "indexed" or "[...]" in kv.get("data.path", ""):
                continue
            paths = kv["data.path"].strip("[]").split(",")
            assert set(paths) <= written, (c.text, paths, written)
            assert kv.get("tokenizer.path") in tokenizers, (c.text, tokenizers)
            for p in paths:
                assert os.path.exists(p + ".bin") and os.path.exists(p + ".idx"), p
            checked += 1
    assert checked >= 3, checked


# --------------------------------------------------------------------------------------------
# the list itself, and that the checks catch a wrong command
# --------------------------------------------------------------------------------------------
def test_every_readme_command_is_checked():
    kinds = {}
    for c in COMMANDS:
        kinds.setdefault(c.kind, []).append(c.text)
    other = [t for t in kinds.pop("other", []) if not t.startswith(NOT_ENTRY_POINTS)]
    assert not other, f"README commands this test does not check: {other}"
    assert len(kinds.get("train", [])) >= 15 and len(kinds.get("generate", [])) >= 4 and \
        len(kinds.get("data_tools", [])) >= 7, {k: len(v) for k, v in kinds.items()}
    texts = {c.text for c in COMMANDS}
    stale = [t for t in PLAN_STOPS if t not in texts]
    assert not stale, f"PLAN_STOPS entries no longer in README.md: {stale}"
    placeholders = [p for p in PLACEHOLDERS if not any(p in t for t in texts)]
    assert not placeholders, f"PLACEHOLDERS no longer in README.md: {placeholders}"


def test_extraction_of_each_form():
    text = "\n".join([
        "Intro:", "", "    python train.py model=gpt2_small", "",
        "```bash", "python train.py a=1 \\", "    b=2      # a comment with 'quotes'",
        "python generate.py prompts='[\"1#2\"]'  # c", "pip install x", "```",
        "Inline `python -m data_tools.convert reshape --load a\n--save b` and `generate.py x=1`,",
        "and `torchrun --nproc-per-node=2 train.py` and `train.py` (a name only).",
    ])
    got = [(c.text, c.kind, c.block is not None) for c in readme_commands(text)]
    assert got == [
        ("python train.py model=gpt2_small", "train", True),
        ("python train.py a=1 b=2", "train", True),
        ("python generate.py prompts='[\"1#2\"]'", "generate", True),
        ("python -m data_tools.convert reshape --load a --save b", "data_tools", False),
        ("generate.py x=1", "generate", False),
        ("torchrun --nproc-per-node=2 train.py", "train", False),
    ], got
    assert train_args(shlex.split("torchrun --nnodes=2 --nproc-per-node=4 train.py -m x=1")) \
        == TrainArgs(["x=1"], True, 8)
    assert train_args(shlex.split("torchrun --nproc_per_node 2 train.py --cfg job x=1")) \
        == TrainArgs(["x=1"], False, 2)


@pytest.mark.parametrize("broken,needle", [
    ("python train.py train.max_step=4000", "did you mean train.max_steps"),
    ("python train.py model=gpt2_larg parallel=tp2_pp2", "no such model config"),
    ("python train.py parallel=tp3", "no such parallel config"),
    ("python train.py optimizer.learning_rate=1e-3", "unknown config key"),
    ("python train.py model=gpt2_large parallel=tp2_pp2 train.micro_batch_size=24 "
     "train.global_batch_size=64", "must be divisible"),
    ("python train.py -m optimizer.lr=1e-4,3e-4 parallel=tp2,pp9", "no such parallel config"),
    # composes, but not on the GPUs it needs: resolve_world
    ("python train.py parallel=pp2_vpp2 train.micro_batch_size=8 train.global_batch_size=8",
     "on 2 GPUs: error: interleaved pipelining needs"),
    # runs on a CPU, but its plan fails
    ("python train.py checkpoint.load=nowhere", "has no committed checkpoint"),
    ("python generate.py load=<ckpt> top_pp=0.8", "unknown config key top_pp"),
    ("python generate.py load=<ckpt> prompts='[\"12+35=\"]' iteration=7",
     "iter_0000007 is missing"),
    ("python -m data_tools.preprocess --input c.jsonl --tokenizer gpt2 --output c --append-eos",
     "unrecognized arguments: --append-eos"),
    ("python -m data_tools.convert reshape --load a --save b --target-tp 2",
     "required: --target-pp"),
])
def test_a_wrong_command_fails(broken, needle, on_this_cpu, tiny_ckpt, capsys, monkeypatch):
    cmd = Command(broken, 0, None)
    with pytest.raises(AssertionError, match=re.escape(needle)):
        if cmd.kind == "train":
            check_train(cmd, on_this_cpu)
        elif cmd.kind == "generate":
            check_generate(cmd, on_this_cpu, tiny_ckpt)
        else:
            check_data_tool(cmd, on_this_cpu, capsys, monkeypatch)
