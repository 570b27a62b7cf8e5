"""Checkpoint conversion: HF GPT-2 <-> our megatron-core checkpoints, and reshape (CPU, gloo).

A tiny GPT-2 built by transformers itself (4 layers, hidden 48, 6 heads, ffn 80, vocab 101 -- odd,
so it is padded -- 40 positions, eps 2e-5) is the reference. Acceptance:
* HF -> ours at TP1, TP2 and PP2: logits equal HF's (fp32, max abs diff <= 1e-4) once the vocab
  padding is stripped and the TP vocab shards gathered;
* HF -> ours -> HF: every tensor bit-identical, also via real TP2- and PP2-saved checkpoints;
* reshape TP2 -> TP1 -> TP2: identical logits; reshape keeps the optimizer state when asked;
* refusals: non-empty --save, pickles without --allow-pickle, unsupported model types.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_tools import convert
from perturb import perturb_
from helpers import (ROOT, assert_same_hf, build_cpu, checkpoint_model_cfg, free_port, gloo_rank,
                     gpt_logits, load_weights, pipeline2_forward, read_safetensors, run,
                     run_train, spawn, tp1_output)

V, LAYERS, HIDDEN, HEADS, FFN, NPOS, EPS = 101, 4, 48, 6, 80, 40, 2e-5
# make_vocab_size_divisible_by. The vocab is padded to a multiple of lcm(DIV, TP): 5 makes the
# padding differ between TP1 (105) and TP2 (110), so vocab resizing is exercised.
DIV = 5
P1, P2 = 105, 110
TOL = 1e-4


def cli(*argv) -> None:
    rc = convert.main([str(a) for a in argv])
    assert rc == 0, f"convert {' '.join(map(str, argv))} exited {rc}"


def _hf_gpt2(path, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, vocab_size=V,
                     n_positions=NPOS, layer_norm_epsilon=EPS, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    perturb_(model, seed=seed)  # non-trivial norms and biases, so a swapped tensor shows
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The HF reference, its logits, and the conversions every test reads."""
    from framework.tokenizer import embedded_tokenizer

    d = tmp_path_factory.mktemp("convert")
    hf = d / "hf"
    model = _hf_gpt2(hf)
    embedded_tokenizer().save(str(hf))  # a tokenizer to carry through (19 tokens < V)
    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    torch.save({"tokens": tokens, "logits": logits}, d / "ref.pt")
    common = ["--load", hf, "--make-vocab-size-divisible-by", DIV]
    cli("hf-to-megatron", *common, "--save", d / "tp1")
    cli("hf-to-megatron", *common, "--save", d / "tp2", "--target-tp", 2)
    cli("hf-to-megatron", *common, "--save", d / "pp2", "--target-pp", 2)
    cli("reshape", "--load", d / "tp2", "--save", d / "tp2_tp1", "--target-tp", 1,
        "--target-pp", 1)
    cli("reshape", "--load", d / "tp2_tp1", "--save", d / "tp2_tp1_tp2", "--target-tp", 2,
        "--target-pp", 1)
    return {"dir": d, "hf": hf, "tokens": tokens, "logits": logits}


# --------------------------------------------------------------------------------------------
# helpers: run our model on CPU
# --------------------------------------------------------------------------------------------
def _tp1_logits(ckpt_dir, tokens, padded):
    return tp1_output(ckpt_dir, padded, lambda chunk: gpt_logits(chunk, tokens, V))


HF_CONFIG_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions",
                  "vocab_size", "activation_function", "layer_norm_epsilon",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id")


# --------------------------------------------------------------------------------------------
# single process
# --------------------------------------------------------------------------------------------
def test_hf_to_megatron_tp1_logits_match_hf(work):
    got = _tp1_logits(work["dir"] / "tp1", work["tokens"], P1)
    assert (got - work["logits"]).abs().max().item() <= TOL
    _model_cfg, meta = checkpoint_model_cfg(work["dir"] / "tp1")
    assert meta["config"]["model"]["activation"] == "gelu_tanh"
    assert meta["config"]["model"]["vocab_size"] == V
    assert meta["iteration"] == 0 and meta["consumed_samples"] == 0
    assert (work["dir"] / "tp1" / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (work["dir"] / "tp1" / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()
    tp2_meta = checkpoint_model_cfg(work["dir"] / "tp2")[1]
    assert tp2_meta["config"]["parallel"]["tensor_model_parallel_size"] == 2


def test_roundtrip_is_bit_identical_and_loads_in_transformers(work, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work["dir"] / "back"
    cli("megatron-to-hf", "--load", work["dir"] / "tp1", "--save", out, "--max-shard-size",
        "20KB", "--print-checkpoint-structure")
    printed = capsys.readouterr().out
    assert "embedding.word_embeddings.weight" in printed and f"[{P1}, 48]" in printed
    assert "transformer.wte.weight" in printed and "[101, 48]" in printed
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not list(out.glob("*.bin"))
    assert_same_hf(work["hf"], out, HF_CONFIG_KEYS)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.equal(model(work["tokens"]).logits, work["logits"])
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"
    # through TP2 padding (P2 rows) and two reshapes as well
    out2 = work["dir"] / "back2"
    cli("megatron-to-hf", "--load", work["dir"] / "tp2_tp1_tp2", "--save", out2)
    assert (out2 / "model.safetensors").is_file()
    assert_same_hf(work["hf"], out2, HF_CONFIG_KEYS)


def test_reshape_tp2_tp1_tp2_keeps_logits(work):
    d = work["dir"]
    a = _tp1_logits(d / "tp1", work["tokens"], P1)
    b = _tp1_logits(d / "tp2_tp1", work["tokens"], P1)
    assert torch.equal(a, b)
    from framework.interop.megatron_files import describe

    shapes = {k: s for k, s, _ in describe(str(d / "tp2_tp1_tp2" / "iter_0000000"))[0]}
    assert shapes["embedding.word_embeddings.weight"] == (P2, HIDDEN)
    shapes = {k: s for k, s, _ in describe(str(d / "tp2_tp1" / "iter_0000000"))[0]}
    assert shapes["embedding.word_embeddings.weight"] == (P1, HIDDEN)


def test_reshape_with_optimizer_round_trips_the_state(work, capsys):
    """A TP1 checkpoint with AdamW state -> TP2 padding -> TP1 again, loaded with optimizer."""
    from framework.models.build import padded_vocab_size

    assert (padded_vocab_size(V, DIV, 1), padded_vocab_size(V, DIV, 2)) == (P1, P2)
    from framework.config import OptimizerConfig
    from framework.models.wrappers import unwrap
    from framework.optimizer import build_optimizer
    from framework.checkpoint import load_checkpoint, save_checkpoint

    d = work["dir"]
    model_cfg, meta = checkpoint_model_cfg(d / "tp1")
    opt_kw = dict(max_steps=10, bf16=False, fp16=False, use_distributed_optimizer=False,
                  overlap_param_gather=False, on_gpu=False)
    tokens = work["tokens"]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with convert.single_process_world():
        chunks = build_cpu(model_cfg, P1)
        load_weights(d / "tp1", chunks, model_cfg)
        opt, sched = build_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4), chunks, **opt_kw)
        chunks[0](tokens, pos, None, labels=tokens).mean().backward()
        assert opt.step()[0]
        sched.step(increment=1)
        save_checkpoint(str(d / "opt"), 7, chunks, opt, sched, consumed_samples=14,
                        config=meta["config"])
        before = {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}
        state = {n: {k: v.clone() for k, v in opt.optimizer.state[p].items()}
                 for n, p in unwrap(chunks[0]).named_parameters()}
    cli("reshape", "--load", d / "opt", "--save", d / "opt_tp2", "--target-tp", 2,
        "--target-pp", 1, "--with-optimizer", "--print-checkpoint-structure")
    printed = capsys.readouterr().out
    assert "optimizer.state.exp_avg.embedding.word_embeddings.weight" in printed
    assert f"[{P2}, 48]" in printed
    cli("reshape", "--load", d / "opt_tp2", "--save", d / "opt_tp1", "--target-tp", 1,
        "--target-pp", 1, "--with-optimizer")
    cli("reshape", "--load", d / "opt_tp2", "--save", d / "opt_weights", "--target-tp", 1,
        "--target-pp", 1)
    from framework.interop.megatron_files import describe

    keys = [k for k, _s, _d in describe(str(d / "opt_weights" / "iter_0000007"))[0]]
    assert keys and not [k for k in keys if k.startswith("optimizer.")]
    with convert.single_process_world():
        chunks = build_cpu(model_cfg, P1)
        opt, sched = build_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4), chunks, **opt_kw)
        meta2 = load_checkpoint(str(d / "opt_tp1"), chunks, opt, sched, model_cfg=model_cfg)
        assert meta2["iteration"] == 7 and meta2["consumed_samples"] == 14
        assert sched.num_steps == 1
        for n, p in unwrap(chunks[0]).named_parameters():
            assert torch.equal(p, before[n]), n
            got = opt.optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[k], state[n][k]), (n, k)


def test_load_hf_into_model_refuses_a_different_architecture(work):
    from dataclasses import replace

    from framework import interop
    from framework.config import ConfigError

    model_cfg, _ = checkpoint_model_cfg(work["dir"] / "tp1")
    with pytest.raises(ConfigError, match="activation: hf='gelu_tanh' config='gelu'"):
        interop.load_hf_into_model(str(work["hf"]), [], replace(model_cfg, activation="gelu"))


def test_base_model_layout_with_mask_buffers_and_bf16(work, tmp_path, capsys):
    """Files saved from GPT2Model (no `transformer.` prefix, `attn.bias` buffers, as on the hub)
    import; --target-dtype bf16 stores bf16; the export uses GPT2LMHeadModel's names."""
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((work["hf"] / "config.json").read_text())
    sd = {k.removeprefix("transformer."): v for k, v in
          load_file(work["hf"] / "model.safetensors").items()}
    for i in range(LAYERS):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, NPOS, NPOS).tril()
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, legacy / "model.safetensors", metadata={"format": "pt"})
    cli("hf-to-megatron", "--load", legacy, "--save", tmp_path / "bf16", "--target-dtype",
        "bf16", "--make-vocab-size-divisible-by", DIV, "--print-checkpoint-structure")
    hf_part, ours = capsys.readouterr().out.split("== megatron checkpoint")
    assert "h.0.attn.masked_bias" in hf_part and "transformer." not in hf_part
    rows = {line.split()[0]: line.split(None, 1)[1] for line in ours.splitlines()[1:]}
    assert rows["embedding.word_embeddings.weight"].split() == [f"[{P1},", "48]", "bfloat16"]
    assert "float32" not in ours
    cli("megatron-to-hf", "--load", tmp_path / "bf16", "--save", tmp_path / "back")
    got, ref = read_safetensors(tmp_path / "back"), load_file(work["hf"] / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k].bfloat16()), k
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"


def test_train_py_starts_from_a_converted_checkpoint(work, tmp_path):
    """The real entry point loads it (architecture check, vocab padding, weights)."""
    arch = [f"model.num_layers={LAYERS}", f"model.hidden_size={HIDDEN}",
            f"model.num_attention_heads={HEADS}", f"model.ffn_hidden_size={FFN}",
            f"model.seq_length={NPOS}", f"model.max_position_embeddings={NPOS}",
            f"model.vocab_size={V}", f"model.make_vocab_size_divisible_by={DIV}",
            "model.activation=gelu_tanh", f"model.layernorm_epsilon={EPS}",
            "model.position_embedding_type=learned_absolute"]
    r = run_train(*arch, "train.max_steps=1", "train.eval_interval=0",
                  "train.micro_batch_size=2", "train.global_batch_size=2",
                  "train.progress_bar=false", "train.device=cpu", "checkpoint.save=false",
                  f"checkpoint.load={work['dir'] / 'tp1'}", cwd=tmp_path, fast=False,
                  timeout=300)
    assert f"initialised weights from {work['dir'] / 'tp1' / 'iter_0000000'}" in r.stdout


# --------------------------------------------------------------------------------------------
# two processes: TP2, then PP2 (gloo)
# --------------------------------------------------------------------------------------------
def _dist_worker(rank, port, d):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from framework import interop
    from framework.tokenizer import embedded_tokenizer
    from framework.checkpoint import save_checkpoint

    with gloo_rank(rank, port):  # a CPU test, also on a machine with GPUs
        ref = torch.load(os.path.join(d, "ref.pt"))
        tokens, hf_logits = ref["tokens"], ref["logits"]
        model_cfg, meta = checkpoint_model_cfg(os.path.join(d, "tp1"))
        # ---- TP2 ----
        ps.initialize_model_parallel(2, 1)
        got = {}
        for name in ("tp2", "tp2_tp1_tp2", "tp1"):  # tp1: TP1-padded (105 rows) loaded into 110
            chunks = build_cpu(model_cfg, P2, tp=2)
            load_weights(os.path.join(d, name), chunks, model_cfg)
            got[name] = gpt_logits(chunks[0], tokens, V)
        chunks = build_cpu(model_cfg, P2, tp=2)
        info = interop.load_hf_into_model(os.path.join(d, "hf"), chunks, model_cfg)
        assert info["tensors"] > 0
        got["hf"] = gpt_logits(chunks[0], tokens, V)
        for name, logits in got.items():
            assert (logits - hf_logits).abs().max().item() <= TOL, name
        assert torch.equal(got["tp2"], got["tp2_tp1_tp2"]) and torch.equal(got["tp2"], got["hf"])
        # as a conversion writes it (HF config kept), so the export restores that config
        save_checkpoint(os.path.join(d, "true_tp2"), 0, chunks, None, None, consumed_samples=0,
                        config=meta["config"], extra={"hf_source": meta["hf_source"]})
        ps.destroy_model_parallel()
        # ---- PP2 ----
        # mcore copies the tied embedding to the last stage with an all-reduce of `.cuda()`
        # tensors at build time; on a CPU-only torch that call must be a no-op.
        torch.Tensor.cuda = lambda self, *a, **k: self
        ps.initialize_model_parallel(1, 2)
        outs = {}
        for name in ("pp2", "hf"):
            chunks = build_cpu(model_cfg, P1, pp=2)
            if name == "hf":
                interop.load_hf_into_model(os.path.join(d, "hf"), chunks, model_cfg)
            else:
                load_weights(os.path.join(d, name), chunks, model_cfg)
            chunk = chunks[0]
            pos = torch.arange(tokens.shape[1]).expand_as(tokens)
            out = pipeline2_forward(chunk, rank == 0, 1 - rank,
                                    (tokens.shape[1], tokens.shape[0], HIDDEN), tokens, pos, None)
            with torch.no_grad():
                if rank == 0:
                    # the last stage holds a copy of the tied embedding: same values
                    w = chunk.embedding.word_embeddings.weight.contiguous()
                    dist.send(w, dst=1)
                else:
                    outs[name] = out[..., :V]
                    w = torch.empty_like(chunk.output_layer.weight)
                    dist.recv(w, src=0)
                    assert torch.equal(w, chunk.output_layer.weight), name
            if name == "hf":
                # as training writes it (no HF config; the tokenizer gives the token ids)
                save_checkpoint(os.path.join(d, "true_pp2"), 0, chunks, None, None,
                                consumed_samples=0, config=meta["config"],
                                tokenizer=embedded_tokenizer())
        if rank == 1:
            for name, logits in outs.items():
                assert (logits - hf_logits).abs().max().item() <= TOL, name
            assert torch.equal(outs["pp2"], outs["hf"])


@pytest.fixture(scope="module")
def dist_run(work):
    spawn(_dist_worker, (free_port(), str(work["dir"])))
    return work


def test_tp2_and_pp2_logits_match_hf(dist_run):
    d = dist_run["dir"]
    meta = json.load(open(d / "true_tp2" / "iter_0000000" / "framework.json"))
    assert meta["layout"]["tp"] == 2
    meta = json.load(open(d / "true_pp2" / "iter_0000000" / "framework.json"))
    assert meta["layout"]["pp"] == 2


def test_checkpoints_saved_at_tp2_and_pp2_export_and_reshape(dist_run):
    d = dist_run["dir"]
    for name in ("true_tp2", "true_pp2"):
        cli("megatron-to-hf", "--load", d / name, "--save", d / f"{name}_hf")
        assert_same_hf(dist_run["hf"], d / f"{name}_hf", HF_CONFIG_KEYS)
    cli("reshape", "--load", d / "true_tp2", "--save", d / "true_tp2_tp1", "--target-tp", 1,
        "--target-pp", 1)
    a = _tp1_logits(d / "tp1", dist_run["tokens"], P1)
    b = _tp1_logits(d / "true_tp2_tp1", dist_run["tokens"], P1)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# refusals and errors
# --------------------------------------------------------------------------------------------
def test_non_empty_save_is_refused_and_left_untouched(work, tmp_path, capsys):
    save = tmp_path / "busy"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    rc = convert.main(["hf-to-megatron", "--load", str(work["hf"]), "--save", str(save)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(save)) == ["keep.txt"] and (save / "keep.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".busy")]  # no staging left
    rc = convert.main(["megatron-to-hf", "--load", str(work["dir"] / "tp1"), "--save",
                       str(save), "--overwrite"])
    assert rc == 0 and "keep.txt" not in os.listdir(save)
    assert (save / "model.safetensors").is_file()
    rc = convert.main(["reshape", "--load", str(work["dir"] / "tp1"), "--save",
                       str(work["dir"] / "tp1"), "--target-tp", "1", "--target-pp", "1",
                       "--overwrite"])
    assert rc == 2 and "overlap" in capsys.readouterr().err


def test_pickle_weights_need_allow_pickle(work, tmp_path, capsys):
    from safetensors.torch import load_file

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((work["hf"] / "config.json").read_text())
    sd = load_file(work["hf"] / "model.safetensors")
    torch.save(sd, bin_dir / "pytorch_model.bin")
    rc = convert.main(["hf-to-megatron", "--load", str(bin_dir), "--save",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-pickle" in err and "execute" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    rc = convert.main(["hf-to-megatron", "--load", str(bin_dir), "--allow-pickle",
                       "--print-checkpoint-structure"])
    out = capsys.readouterr().out
    assert rc == 0 and "pickle" in out and "transformer.h.3.attn.c_attn.weight" in out
    from framework.interop.hf_files import HFWeights

    w = HFWeights(str(bin_dir), allow_pickle=True)
    assert torch.equal(w.get("transformer.wte.weight"), sd["transformer.wte.weight"])


def test_unsupported_model_type_lists_supported(tmp_path, capsys):
    src = tmp_path / "falcon"  # (llama was the example until it became supported)
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    rc = convert.main(["hf-to-megatron", "--load", str(src), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "'falcon' is not supported" in err and "gpt2" in err and "llama" in err
    # the real command line: exit status 2, one line on stderr, no traceback
    r = run("-m", "data_tools.convert", "hf-to-megatron", "--load", src, "--save",
            tmp_path / "out", cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [err.strip()]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------
def test_qkv_layout_is_megatrons_per_group_interleave():
    """Rows of HF [q; k; v] land where SelfAttention.get_query_key_value_tensors reads them."""
    from framework.config import ModelConfig
    from framework.models import hf_rules
    from framework.models.gpt import hf_gpt2

    heads, groups, dim, hidden = 6, 2, 4, 24
    cfg = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads,
                      num_query_groups=groups)
    rows = (heads + 2 * groups) * dim
    hf = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 3).contiguous()
    ours = hf_rules.qkv_rows_to_ours(hf, cfg)
    # mcore: view [groups, (heads/groups + 2) * dim] and split [q heads/groups * dim, k, v]
    per = heads // groups
    q, k, v = ours[:, 0].view(groups, (per + 2) * dim).split([per * dim, dim, dim], dim=1)
    assert torch.equal(q.reshape(-1), torch.arange(heads * dim, dtype=torch.float32))
    assert torch.equal(k.reshape(-1), heads * dim + torch.arange(groups * dim,
                                                                  dtype=torch.float32))
    assert torch.equal(v.reshape(-1), (heads + groups) * dim
                       + torch.arange(groups * dim, dtype=torch.float32))
    assert torch.equal(hf_rules.qkv_rows_to_hf(ours, cfg), hf)
    w = torch.randn(hidden, rows)  # Conv1D [in, out]
    assert torch.equal(hf_gpt2._qkv_w_to_hf(hf_gpt2._qkv_w_to_ours(w, cfg), cfg), w)


def test_shipped_gpt2_configs_are_true_gpt2():
    """conf/model/gpt2_*.yaml map to HF gpt2 and back unchanged (tanh GeLU, tied, eps 1e-5)."""
    from omegaconf import OmegaConf

    from framework import interop
    from framework.config import ModelConfig

    names = sorted(n for n in os.listdir(os.path.join(ROOT, "conf", "model"))
                   if n.startswith("gpt2_"))
    assert len(names) == 4
    for name in names:
        raw = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model", name)))
        raw.pop("defaults", None)
        cfg = ModelConfig(**raw)
        hf = interop.model_config_to_hf_config(cfg, vocab_size=cfg.vocab_size)
        assert hf["activation_function"] == "gelu_new" and hf["n_positions"] == 1024
        back = interop.hf_config_to_model_config(hf)
        assert interop._arch(back) == interop._arch(cfg), name
        assert back.name == cfg.name


def test_gelu_tanh_activation():
    import torch.nn.functional as F

    from framework.config import ConfigError, ModelConfig, ParallelConfig
    from framework.models.transformer import transformer_config

    x = torch.linspace(-4, 4, 101)
    cpu = transformer_config(ModelConfig(activation="gelu_tanh"), ParallelConfig(), bf16=False,
                             fp16=False, on_gpu=False)
    assert not cpu.bias_activation_fusion
    assert torch.equal(cpu.activation_func(x), F.gelu(x, approximate="tanh"))
    exact = transformer_config(ModelConfig(activation="gelu"), ParallelConfig(), bf16=False,
                               fp16=False, on_gpu=False)
    assert torch.equal(exact.activation_func(x), F.gelu(x))
    with pytest.raises(ConfigError, match="model.activation"):
        ModelConfig(activation="gelu_fast")


def test_parse_size_and_config_refusals():
    from framework import interop
    from framework.config import ConfigError
    from framework.interop.hf_files import parse_size

    assert parse_size("200MB") == 200 * 10**6 and parse_size("1GiB") == 2**30
    assert parse_size("512") == 512
    with pytest.raises(ConfigError):
        parse_size("lots")
    base = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 8,
            "vocab_size": 10}
    assert interop.hf_config_to_model_config(base).activation == "gelu_tanh"
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        interop.hf_config_to_model_config({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ConfigError, match="supported: gpt2"):
        interop.hf_config_to_model_config({**base, "model_type": "bert"})


def test_generate_on_an_import_without_a_tokenizer_asks_for_one(work, tmp_path):
    """A checkpoint imported from a Hugging Face directory with no tokenizer files: generate.py
    decoded it with the embedded arithmetic tokenizer (the default config `convert` stores says
    data=embedded), silently, and ran the held-out arithmetic on it. Now it asks for
    tokenizer.path; given one, it runs; and held-out evaluation is refused on an import."""
    import shutil
    from dataclasses import replace

    from framework.config import ConfigError, TokenizerConfig
    from framework.inference import GenerateConfig, prepare_job

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(work["hf"] / name, bare / name)
    cli("hf-to-megatron", "--load", bare, "--save", tmp_path / "m",
        "--make-vocab-size-divisible-by", DIV)
    with pytest.raises(ConfigError, match="was imported from Hugging Face without its tokenizer: "
                                          "set tokenizer.path"):
        prepare_job(GenerateConfig(load=str(tmp_path / "m"), prompts=["1+2="]))
    tok = replace(TokenizerConfig(), path=str(work["hf"]))
    assert prepare_job(GenerateConfig(load=str(tmp_path / "m"), prompts=["1+2="],
                                      tokenizer=tok)).prompt_ids
    with pytest.raises(ConfigError, match="held-out evaluation runs without prompts only for "
                                          "checkpoints trained on data=embedded"):
        prepare_job(GenerateConfig(load=str(tmp_path / "m"), tokenizer=tok))


def test_allow_pickle_without_effect_is_refused(work, tmp_path, capsys):
    """--allow-pickle on a directory with safetensors weights (read instead of any pickle) was
    accepted and did nothing; now one line, nothing written."""
    rc = convert.main(["hf-to-megatron", "--load", str(work["hf"]), "--allow-pickle", "--save",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-pickle has no effect" in err and "model.safetensors" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_interrupt_between_the_publish_renames_puts_the_old_save_back(tmp_path, monkeypatch):
    """publish() moves --save aside, then the new directory into place: a Ctrl-C between the two
    renames left no --save at all."""
    save, new = tmp_path / "save", tmp_path / "new"
    save.mkdir()
    (save / "old.txt").write_text("old")
    new.mkdir()
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(convert.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        convert.publish(str(new), str(save))
    assert (save / "old.txt").read_text() == "old" and new.is_dir()
