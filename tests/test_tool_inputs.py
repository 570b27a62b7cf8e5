"""Bad input to the command-line tools (generate.py, data_tools.convert, data_tools.preprocess)
that the other hardening tests do not reach: each is refused with one line naming the field,
option or file, before any model is built, and leaves what exists on disk as it was.

One test per finding; tiny checkpoints and HF models are built here (CPU, gloo)."""
import json
import os
import shutil
import stat
from dataclasses import asdict

import pytest
import torch

from framework.config import Config, ConfigError, DataConfig, ModelConfig, TokenizerConfig
from framework.checkpoint.manifest import MANIFEST
from helpers import GENERATE, run, save_tiny_hf_gpt2

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
            hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)


def _word_tokenizer(path, n):
    """A character-level tokenizer of `n` tokens (EOS, UNK, then characters)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1}
    for i in range(n - 2):
        vocab["0123456789+-*= \n"[i] if i < 16 else chr(0x100 + i)] = len(vocab)
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpts(mp1, tmp_path_factory):
    """`embedded`: a tiny GPT checkpoint trained on data=embedded (19-token tokenizer saved with
    it, no model.vocab_size); `vocab19`: one with model.vocab_size=19 recorded; `tok60`: a
    tokenizer of 60 tokens."""
    from framework.checkpoint import save_checkpoint
    from framework.models.build import build_model
    from framework.config import ParallelConfig
    from framework.tokenizer import embedded_tokenizer

    root = tmp_path_factory.mktemp("tool_inputs")
    tok = embedded_tokenizer()
    for name, extra in (("embedded", {}), ("vocab19", {"vocab_size": 19})):
        cfg = Config(model=ModelConfig(**TINY, **extra), data=DataConfig(type="embedded"))
        torch.manual_seed(0)
        model = build_model(cfg.model, ParallelConfig(), vocab_size=24, bf16=False, fp16=False,
                            device=torch.device("cpu"), wrap_ddp=False)
        save_checkpoint(str(root / name), 3, model, None, None, consumed_samples=0,
                        config=asdict(cfg), tokenizer=tok)
    return {"embedded": str(root / "embedded"), "vocab19": str(root / "vocab19"),
            "tok60": _word_tokenizer(root / "tok60", 60), "root": root}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_real_model(monkeypatch):
    """Fail the test if a model is built anywhere but on the meta device."""
    import framework.models.build as build

    real = build.build_model

    def guarded(*args, **kwargs):
        device = kwargs.get("device")
        assert device is not None and torch.device(device).type == "meta", \
            "a model was built before the bad input was refused"
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "build_model", guarded)


# --------------------------------------------------------------------------------------------
# generate.py
# --------------------------------------------------------------------------------------------
def test_generate_seed_out_of_range_refused():
    """seed=2**70 / seed=-5 passed every check, then numpy.random.seed raised a ValueError
    traceback in the worker."""
    from framework.generation import GenerationOptions
    from framework.inference import GenerateConfig

    for seed in (2**70, -5, 2**32):
        with pytest.raises(ConfigError, match=f"seed={seed} must be in"):
            GenerateConfig(seed=seed)
    GenerationOptions(seed=2**32 - 1)
    GenerationOptions(seed=None)


def test_generate_top_p_bound_above_top_p_refused():
    """top_p = max(top_p * decay, bound): a bound above top_p raised top_p instead of decaying
    it, and from top_p=0 (greedy) switched to sampling after the first token, silently."""
    from framework.generation import GenerationOptions

    with pytest.raises(ConfigError, match="top_p_bound=0.3 is above top_p=0.0"):
        GenerationOptions(top_p_decay=0.5, top_p_bound=0.3)
    with pytest.raises(ConfigError, match="top_p_bound=0.9 is above top_p=0.5"):
        GenerationOptions(top_p=0.5, top_p_decay=0.5, top_p_bound=0.9)
    GenerationOptions(top_p=0.9, top_p_decay=0.7, top_p_bound=0.3)
    GenerationOptions(top_p=0.5, top_p_bound=0.9)  # no decay: the bound is never used


def test_generate_output_file_checked_before_model_and_written_whole(ckpts, tmp_path,
                                                                      monkeypatch):
    """output_file=<a directory> or an unwritable place was found only after the model was
    loaded and every prompt decoded (IsADirectoryError / FileNotFoundError traceback); the file
    was written in place, so a failing write truncated an earlier output."""
    from framework import inference
    from framework.inference import GenerateConfig, prepare_job

    def job(out):
        return prepare_job(GenerateConfig(load=ckpts["embedded"], prompts=["1+2="],
                                          output_file=str(out)))

    with pytest.raises(ConfigError, match=f"output_file={tmp_path} is a directory"):
        job(tmp_path)
    with pytest.raises(ConfigError, match="output_file=/proc/nope/out.jsonl: cannot write"):
        job("/proc/nope/out.jsonl")
    assert job(tmp_path / "new" / "out.jsonl").cfg.output_file  # made when written
    assert not (tmp_path / "new").exists()
    out = tmp_path / "out.jsonl"
    out.write_text('{"earlier": 1}\n')
    real_dumps, calls = json.dumps, []

    def failing_dumps(obj, *a, **k):
        calls.append(obj)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(obj, *a, **k)

    monkeypatch.setattr(inference.json, "dumps", failing_dumps)
    with pytest.raises(ConfigError, match="output_file=.*No space left on device"):
        inference.write_jsonl(str(out), [{"a": 1}, {"b": 2}])
    assert out.read_text() == '{"earlier": 1}\n' and os.listdir(tmp_path) == ["out.jsonl"]
    monkeypatch.setattr(inference.json, "dumps", real_dumps)
    inference.write_jsonl(str(out), [{"a": 1}, {"b": 2}])
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_generate_output_file_that_is_a_link_fifo_or_device(ckpts, tmp_path):
    """output_file naming a symlink: written through it (the link stays, its target gets the
    results); a FIFO or a device: refused before any model work. Before, the results file was
    renamed over each of them, replacing the link and the FIFO (and, as root, /dev/full) with a
    regular file."""
    from framework import inference
    from framework.inference import GenerateConfig, prepare_job

    target = tmp_path / "target.jsonl"
    target.write_text('{"earlier": 1}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert prepare_job(GenerateConfig(load=ckpts["embedded"], prompts=["1+2="],
                                      output_file=str(link))).cfg.output_file
    inference.write_jsonl(str(link), [{"a": 1}])
    assert link.is_symlink() and target.read_text() == '{"a": 1}\n'
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(ConfigError, match=f"output_file={path} exists and is not a regular "
                                              f"file"):
            prepare_job(GenerateConfig(load=ckpts["embedded"], prompts=["1+2="],
                                       output_file=str(path)))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_generate_non_utf8_prompt_is_one_line(ckpts, tmp_path):
    """A prompt with bytes that are not UTF-8 (Python hands them over as lone surrogates) made
    the tokenizer raise a TypeError traceback."""
    from framework.inference import GenerateConfig, prepare_job

    bad = b"12\xff+3=".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError, match="prompt 1 is not valid UTF-8 text \\(byte 0xff at "
                                          "character 3\\)"):
        prepare_job(GenerateConfig(load=ckpts["embedded"], prompts=["1+2=", bad]))
    r = run(GENERATE, f"load={ckpts['embedded']}", "device=cpu", f'prompts=["{bad}"]',
            cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "prompt 0 is not valid UTF-8" in _one_line(r.stderr)
    assert "loaded" not in r.stdout


def test_generate_num_heldout_above_the_problems_there_are(ckpts):
    """num_heldout=100000000 was a ValueError traceback from heldout_problems."""
    from framework.inference import GenerateConfig, prepare_job

    with pytest.raises(ConfigError, match="num_heldout=100000000 is more than the held-out "
                                          "arithmetic problems there are \\(\\d+\\)"):
        prepare_job(GenerateConfig(load=ckpts["embedded"], num_heldout=100000000))


def test_generate_tokenizer_of_another_vocabulary_refused(ckpts, tmp_path):
    """tokenizer.path=<a tokenizer of 60 tokens> on a checkpoint trained with 19 (24 rows)
    loaded anyway (megatron-core loads vocabulary tensors of any rows) and decoded garbage;
    now refused before the model is built, as is one larger than a recorded model.vocab_size and
    one whose padded size is not the stored rows."""
    from framework.inference import GenerateConfig, prepare_job

    def job(load, tok):
        return prepare_job(GenerateConfig(load=load, prompts=["1+2="],
                                          tokenizer=TokenizerConfig(path=tok)))

    with pytest.raises(ConfigError, match="tokenizer.path=.*tok60 has 60 tokens but the "
                                          "checkpoint was trained with a tokenizer of 19"):
        job(ckpts["embedded"], ckpts["tok60"])
    with pytest.raises(ConfigError, match="tok60 has 60 tokens but the checkpoint's vocabulary "
                                          "is 19 \\(model.vocab_size\\)"):
        job(ckpts["vocab19"], ckpts["tok60"])
    own = os.path.join(ckpts["embedded"], "iter_0000003", "tokenizer")
    assert job(ckpts["embedded"], own).vocab_size == 19  # the same tokenizer given by path
    # the same 19 tokens with the ids of '1' and '2' swapped: it loaded and decoded '7*8='
    # as '20' (fuzz pass, seventeenth session)
    perm = tmp_path / "tokperm"
    shutil.copytree(own, perm)
    doc = json.loads((perm / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (perm / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="tokenizer.path=.*tokperm is not the tokenizer the "
                                          "checkpoint was trained with: 2 tokens have other ids"):
        job(ckpts["embedded"], str(perm))
    # no tokenizer saved and no vocab_size: the stored rows decide
    bare = tmp_path / "bare"
    shutil.copytree(ckpts["embedded"], bare)
    shutil.rmtree(bare / "iter_0000003" / "tokenizer")
    meta_path = bare / "iter_0000003" / "framework.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["data"]["type"] = "indexed"
    # edited by hand, so its manifest no longer matches (generate.py checks it first): drop it,
    # as a checkpoint written before manifests has none
    meta.pop("manifest", None)
    meta_path.write_text(json.dumps(meta))
    os.remove(bare / "iter_0000003" / MANIFEST)
    with pytest.raises(ConfigError, match="word embeddings have 24 rows but the tokenizer "
                                          "\\(tokenizer.path=.*tok60, 60 tokens\\) pads to 64"):
        job(str(bare), ckpts["tok60"])


# --------------------------------------------------------------------------------------------
# data_tools.convert
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hf")
    save_tiny_hf_gpt2(d / "gpt2")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=64)
                     ).save_pretrained(d / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16})
                     ).save_pretrained(d / "llama3")
    return d


def _variant(src, dst, **config):
    """A copy of the HF directory `src` with config.json fields changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def _convert(capsys, *argv):
    from data_tools import convert

    capsys.readouterr()
    rc = convert.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_convert_overwrite_refuses_a_directory_a_run_saves_into(hf_models, tmp_path, capsys):
    """`convert hf-to-megatron --save <a running training run's checkpoint.dir> --overwrite`
    replaced the directory under the run (its earlier checkpoints were gone, and its later saves
    landed beside the import). The run's lock now refuses it in one line, and nothing there
    changes; once the run has ended, the overwrite goes ahead."""
    from framework.locking import run_lock

    save = tmp_path / "busy"
    save.mkdir()
    (save / "iter_0000003").mkdir()
    (save / "iter_0000003" / "framework.json").write_text("{}")
    with run_lock(str(save)):
        before = sorted(os.listdir(save))
        rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "gpt2", "--save",
                           save, "--overwrite")
        line = _one_line(err)
        assert rc == 2 and f"--save {save} is in use by a training run saving there (pid " \
            f"{os.getpid()} on " in line, line
        assert sorted(os.listdir(save)) == before
    rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "gpt2", "--save", save,
                       "--overwrite")
    assert rc == 0, err
    assert not (save / "iter_0000003").exists() and (save / "iter_0000000").is_dir()


def test_convert_index_naming_the_wrong_shard_is_one_line(hf_models, tmp_path, capsys):
    """A model.safetensors.index.json that places a tensor in a shard without it was a
    SafetensorError traceback."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(hf_models / "gpt2" / "config.json", src / "config.json")
    sd = load_file(hf_models / "gpt2" / "model.safetensors")
    keys = sorted(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:10]}, src / names[0], metadata={"format": "pt"})
    save_file({k: sd[k] for k in keys[10:]}, src / names[1], metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[0] for k in keys}}))
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    line = _one_line(err)
    assert rc == 2 and f"{src / names[0]}: cannot read tensor {keys[10]}" in line
    assert "the weight index places it in this file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, data, want", [
    ("config.json", b'{"model_type": "gpt2", "n_embd": "\xff"}', "config.json: not UTF-8 text"),
    ("config.json", b"[" * 100000 + b"]" * 100000, "config.json: cannot read it as JSON (nested"),
    ("model.safetensors.index.json", b'{"weight_map": ["a"]}', "not a valid weight index"),
    ("model.safetensors.index.json", b'{"weight_map": "a"}', "not a valid weight index"),
    ("model.safetensors.index.json", b'{"weight_map": {"w": 5}}', "not a valid weight index"),
    ("model.safetensors.index.json", b'{"weight_map": {"w": "../model.safetensors"}}',
     "not a valid weight index"),
    ("model.safetensors.index.json", b'{"weight_map": {"w": "/abs/model.safetensors"}}',
     "not a valid weight index"),
    # a shard in a subdirectory is a file inside the directory: it passes this check and is
    # then looked for
    ("model.safetensors.index.json", b'{"weight_map": {"w": "shards/model.safetensors"}}',
     "the weight index names shards/model.safetensors, which is missing"),
    ("model.safetensors.index.json", b'{"weight_map": {"w": "\xff"}}',
     "model.safetensors.index.json: not UTF-8 text"),
])
def test_convert_malformed_hf_json_is_one_line(hf_models, tmp_path, capsys, name, data, want):
    """config.json or the weight index that is not UTF-8, nested 100,000 deep, or whose
    weight_map is not a map of names to files in the directory: a UnicodeDecodeError,
    RecursionError, ValueError or TypeError traceback (fuzz pass, seventeenth session)."""
    src = tmp_path / "hf"
    shutil.copytree(hf_models / "gpt2", src)
    (src / name).write_bytes(data)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    assert rc == 2 and want in _one_line(err), err
    assert not (tmp_path / "out").exists()


def test_convert_config_vocab_size_must_match_the_embedding_rows(hf_models, tmp_path,
                                                                  capsys):
    """config.json vocab_size=120 with a 101-row wte was converted silently: rows 101..119
    (zeros) became real tokens."""
    src = _variant(hf_models / "gpt2", tmp_path / "vocab", vocab_size=120)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    assert rc == 2 and "transformer.wte.weight has 101 vocabulary rows but config.json says " \
                       "vocab_size=120" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_convert_shape_mismatch_found_before_the_model_is_built(hf_models, tmp_path, capsys,
                                                                 no_real_model):
    """A llama config.json whose num_key_value_heads does not fit the k/v tensors was a
    RuntimeError traceback (a reshape), raised after the model was built at full size; a shape
    mismatch (n_inner) was one line, but also only after the build."""
    src = _variant(hf_models / "llama", tmp_path / "kv", num_key_value_heads=2)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    line = _one_line(err)
    assert rc == 2 and "model.layers.0.self_attn.k_proj.weight [32, 32]" in line
    assert "do not fit the model that config.json describes" in line
    src = _variant(hf_models / "gpt2", tmp_path / "ffn", n_inner=128)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    assert rc == 2 and "transformer.h.0.mlp.c_fc.weight gives" in _one_line(err)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no staging left


def test_convert_target_tp_pp_below_one_name_the_option(hf_models, tmp_path, capsys):
    """--target-tp 0 said `parallel.tensor_model_parallel_size must be >= 1`, a field the
    command line does not have."""
    rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "gpt2", "--save",
                       tmp_path / "out", "--target-tp", 0)
    assert rc == 2 and "--target-tp 0 must be >= 1" in _one_line(err)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "gpt2", "--save",
                       tmp_path / "out", "--target-pp", -1)
    assert rc == 2 and "--target-pp -1 must be >= 1" in _one_line(err)


def test_reshape_of_a_llama3_rope_scaled_checkpoint(hf_models, tmp_path, capsys):
    """reshape of any checkpoint with model.rope_scaling=true (Llama 3.1 / 3.2) was a
    NotImplementedError traceback: its shape check builds the model on the meta device, and the
    llama3 frequencies are copied to the CPU there."""
    rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "llama3", "--save",
                       tmp_path / "ck")
    assert rc == 0, err
    rc, err = _convert(capsys, "reshape", "--load", tmp_path / "ck", "--save", tmp_path / "tp2",
                       "--target-tp", 2, "--target-pp", 1)
    assert rc == 0, err
    meta = json.loads((tmp_path / "tp2" / "iter_0000000" / "framework.json").read_text())
    assert meta["config"]["model"]["rope_scaling"] is True
    assert meta["config"]["parallel"]["tensor_model_parallel_size"] == 2
    # a config.json whose num_key_value_heads does not fit the k/v tensors of such a model is
    # refused before the build too
    src = _variant(hf_models / "llama3", tmp_path / "kv", num_key_value_heads=1)
    rc, err = _convert(capsys, "hf-to-megatron", "--load", src, "--save", tmp_path / "out")
    assert rc == 2 and "do not fit the model that config.json describes" in _one_line(err)


def test_megatron_to_hf_tokenizer_must_fit_the_checkpoint(ckpts, tmp_path, capsys,
                                                          no_real_model):
    """megatron-to-hf --tokenizer <60 tokens> wrote an HF model of vocab 19 with that tokenizer
    (exit 0) when the checkpoint records model.vocab_size=19, and on a checkpoint without it
    failed only after the model was built and loaded."""
    rc, err = _convert(capsys, "megatron-to-hf", "--load", ckpts["vocab19"], "--save",
                       tmp_path / "a", "--tokenizer", ckpts["tok60"])
    assert rc == 2 and "tok60 has 60 tokens but the checkpoint's vocabulary is 19" \
        in _one_line(err)
    rc, err = _convert(capsys, "megatron-to-hf", "--load", ckpts["embedded"], "--save",
                       tmp_path / "b", "--tokenizer", ckpts["tok60"])
    assert rc == 2 and "tok60 has 60 tokens but the checkpoint was trained with a tokenizer " \
                       "of 19" in _one_line(err)
    assert not os.listdir(tmp_path)
    # the checkpoint's 19 tokens with two ids swapped: exported, and the HF model then read
    # '1' as '2' (fuzz pass, seventeenth session)
    perm = tmp_path.parent / f"{tmp_path.name}-tokperm"
    shutil.copytree(os.path.join(ckpts["embedded"], "iter_0000003", "tokenizer"), perm)
    doc = json.loads((perm / "tokenizer.json").read_text())
    doc["model"]["vocab"]["1"], doc["model"]["vocab"]["2"] = \
        doc["model"]["vocab"]["2"], doc["model"]["vocab"]["1"]
    (perm / "tokenizer.json").write_text(json.dumps(doc))
    rc, err = _convert(capsys, "megatron-to-hf", "--load", ckpts["embedded"], "--save",
                       tmp_path / "c", "--tokenizer", perm)
    assert rc == 2 and f"--tokenizer {perm} gives the model's tokens other ids than the " \
        f"checkpoint's own (its tokenizer/): 2 tokens have other ids" in _one_line(err)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------
# data_tools.preprocess
# --------------------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    from framework.tokenizer import embedded_tokenizer

    embedded_tokenizer().save(str(tmp_path / "tok"))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}", "a/b": "1"}) + "\n"
                            for i in range(20)))
    return tmp_path


def _preprocess(capsys, *argv):
    from data_tools import preprocess

    capsys.readouterr()
    rc = preprocess.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_preprocess_duplicate_json_key_refused_before_any_work(corpus, capsys):
    """--json-keys text text tokenized the corpus twice, published the first output over an
    existing one, then failed with `<staging dir>/..._document.bin: No such file or directory`
    (exit 2, the output already replaced)."""
    out = corpus / "out"
    out.mkdir()
    for ext in (".bin", ".idx"):
        (out / f"c_text_document{ext}").write_bytes(b"earlier")
    rc, err = _preprocess(capsys, "--input", corpus / "in.jsonl", "--json-keys", "text",
                          "text", "--tokenizer", corpus / "tok", "--output-prefix", out / "c")
    assert rc == 2 and "--json-keys: 'text' is given twice" in _one_line(err)
    assert sorted(os.listdir(out)) == ["c_text_document.bin", "c_text_document.idx"]
    assert all((out / f"c_text_document{ext}").read_bytes() == b"earlier"
               for ext in (".bin", ".idx"))


def test_preprocess_json_key_with_a_path_separator_refused(corpus, capsys):
    """--json-keys a/b (a key the JSON lines have) failed after tokenizing, naming a file in the
    staging directory instead of the option."""
    rc, err = _preprocess(capsys, "--input", corpus / "in.jsonl", "--json-keys", "a/b",
                          "--tokenizer", corpus / "tok", "--output-prefix", corpus / "c")
    line = _one_line(err)
    assert rc == 2 and "--json-keys: 'a/b' cannot name an output file" in line
    assert ".preprocess." not in line
    assert not [p for p in os.listdir(corpus) if p.startswith(("c_", ".preprocess"))]


def _hf_config_reader(family):
    """(a minimal HF config dict of `family`, the function that reads it into our fields)."""
    from framework.models.bert.hf_megatron_bert import hf_config_to_fields as bert
    from framework.models.gpt.hf_gpt2 import hf_config_to_fields as gpt2
    from framework.models.gpt.hf_llama import hf_config_to_fields as llama
    from framework.models.t5.hf_t5 import hf_config_to_fields as t5

    base = {"gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100),
            "llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=32,
                          num_attention_heads=4, vocab_size=100, intermediate_size=64,
                          max_position_embeddings=64, rope_theta=10000.0),
            "t5": dict(d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2,
                       vocab_size=100),
            "megatron-bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                  max_position_embeddings=64, vocab_size=100)}[family]
    return base, {"gpt2": gpt2, "llama": llama, "t5": t5, "megatron-bert": bert}[family]


@pytest.mark.parametrize("family,key", [("gpt2", "n_layer"), ("llama", "hidden_size"),
                                        ("llama", "num_key_value_heads"), ("llama", "head_dim"),
                                        ("t5", "d_ff"), ("t5", "n_positions"),
                                        ("megatron-bert", "vocab_size")])
@pytest.mark.parametrize("value", [None, "12a", "12", 1.5, True, float("nan"), float("inf"),
                                   "missing"])
def test_hf_config_integer_fields_name_the_key(family, key, value):
    """A config.json integer field that is null, text (even "12", which int() took), fractional,
    a bool, NaN or Infinity (JSON as Python writes it), or missing: one line naming the key and
    what it holds (it was "lacks a valid int() argument must be ...")."""
    from framework.errors import InteropError

    base, convert = _hf_config_reader(family)
    convert(dict(base))  # the base converts
    hf = dict(base)
    optional = key in ("num_key_value_heads", "head_dim", "n_positions")
    if optional and value in (None, "missing"):
        return  # an optional field left out (or null) takes its default
    if value == "missing":
        del hf[key]
    else:
        hf[key] = value
    with pytest.raises(InteropError) as e:
        convert(hf)
    msg = str(e.value)
    assert key in msg and "not an integer" in msg and "\n" not in msg, msg


def test_vocab_multiple_is_bounded(hf_models, tmp_path, capsys):
    """--make-vocab-size-divisible-by 1000000000 (and model.make_vocab_size_divisible_by) used to
    be accepted, then allocate a billion padded vocabulary rows: one line with the range."""
    from framework.config import MAX_VOCAB_MULTIPLE, ModelConfig
    from framework.errors import ConfigError

    rc, err = _convert(capsys, "hf-to-megatron", "--load", hf_models / "gpt2", "--save",
                       tmp_path / "out", "--make-vocab-size-divisible-by", 1000000000)
    assert rc == 2 and f"must be in [1, {MAX_VOCAB_MULTIPLE}]" in _one_line(err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by=1000000000 must be"):
        ModelConfig(make_vocab_size_divisible_by=1000000000)
    ModelConfig(make_vocab_size_divisible_by=MAX_VOCAB_MULTIPLE)


@pytest.mark.parametrize("family, key", [("gpt2", "layer_norm_epsilon"), ("gpt2", "resid_pdrop"),
                                         ("gpt2", "initializer_range"),
                                         ("llama", "rms_norm_eps"), ("llama", "rope_theta"),
                                         ("llama", "attention_dropout"),
                                         ("t5", "dropout_rate"), ("t5", "layer_norm_epsilon"),
                                         ("megatron-bert", "layer_norm_eps")])
@pytest.mark.parametrize("value", [None, "abc", True, float("nan"), float("-inf")])
def test_hf_config_number_fields_name_the_key(family, key, value):
    """A config.json number field (epsilon, dropout, init std, rope theta) that is null, text, a
    bool, NaN or Infinity: one line naming the key and what it holds (it was a ValueError or
    TypeError traceback from float(), e.g. "could not convert string to float: 'abc'"; NaN and
    Infinity were taken as they were)."""
    from framework.errors import InteropError

    base, convert = _hf_config_reader(family)
    convert(dict(base, **{key: 0.5 if key != "rope_theta" else 500000.0}))  # a number converts
    with pytest.raises(InteropError) as e:
        convert(dict(base, **{key: value}))
    msg = str(e.value)
    assert f"{key} is " in msg and "not a number" in msg and "\n" not in msg, msg


def test_an_interrupt_is_one_line_and_exit_130(capsys):
    """Ctrl-C in generate.py printed every rank's traceback (51 lines, `[rank0]: ...`), and a stop
    signal that ended a multi-rank generate (or a training run before its first save) raised a
    RuntimeError with Hydra's traceback. Both are one line now, exit 130."""
    from framework.cli import report_errors

    def stopped(why):
        def fn():
            raise KeyboardInterrupt(*why)
        return fn

    for why, want in (((), "error: interrupted (Ctrl-C)"), (("SIGINT",), "error: interrupted "
                                                                         "(SIGINT)")):
        with pytest.raises(SystemExit) as e:
            report_errors(stopped(why))
        assert e.value.code == 130 and capsys.readouterr().err.strip() == want
