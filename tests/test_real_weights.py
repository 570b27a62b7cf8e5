"""Generation on real-looking weights: a Hugging Face GPT-2 whose biases, norm weights and
weights are all perturbed (tests/perturb.py says why), imported with `data_tools.convert
hf-to-megatron`, must decode exactly as HF `generate` does, on every decode path, and report HF's
log-probabilities.

* `generate.py` with its default settings (lean decode, the default fused-bias-add QKV layer)
  gives HF's greedy and 4-beam tokens, and `return_logprobs=true` agrees with HF's
  log-probabilities to 1e-4 (fp32, CPU).
* In process, on the same imported checkpoint: greedy, beam search (4 beams, two length
  penalties, early stopping) and seeded top-k sampling, each through eager lean decode, the
  static (CUDA-graph formulation, eager on CPU) decode step, megatron-core's modules
  (`lean_decode=false`) and no KV cache.

The GPU versions (CUDA-graph replay, bf16 and fp32) are in tests/test_gpu_real_weights.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import GENERATE, left_padded, run
from perturb import assert_perturbed, perturb_

V, LAYERS, HIDDEN, HEADS, NPOS = 40, 2, 48, 4, 64
EOS, PAD = 0, 1  # the embedded character tokenizer's EOD and pad ids
PROMPTS = ["12+35=", "7*8=", "100-1=", "5+5="]
NEW = 12
TOL = 1e-4

DECODE_PATHS = {
    "lean": dict(),
    "static": dict(decode_cuda_graph=True),
    "mcore": dict(lean_decode=False),
    "no_cache": dict(use_cache=False),
}
CASES = {
    "greedy": (dict(), dict(do_sample=False)),
    "beam4_lp0.9": (dict(num_beams=4, length_penalty=0.9),
                    dict(do_sample=False, num_beams=4, length_penalty=0.9)),
    "beam4_lp1.3_early": (dict(num_beams=4, length_penalty=1.3, early_stopping=True),
                          dict(do_sample=False, num_beams=4, length_penalty=1.3,
                               early_stopping=True)),
    # ours draws with torch.multinomial from a generator seeded with `seed`; HF draws from the
    # global generator: the same seed gives the same draws when the distributions agree
    "top_k_sample": (dict(top_k=8, temperature=0.9, seed=5),
                     dict(do_sample=True, top_k=8, temperature=0.9, top_p=1.0)),
}


def hf_gpt2(path):
    """A tiny GPT-2 with every parameter perturbed, saved in HF layout with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from framework.tokenizer import embedded_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=NPOS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg).eval()
    perturb_(model, seed=11)
    assert_perturbed(model)
    model.save_pretrained(path)
    embedded_tokenizer().save(str(path))
    return model


def hf_generate(hf, ids_list, seed=None, **kw):
    """HF's new tokens (EOS kept, PAD after it) and the log-probabilities of the chosen tokens
    under the raw logits (ours: log-softmax before temperature/truncation, 0 after EOS)."""
    ids, mask = left_padded(ids_list, PAD)
    if seed is not None:
        torch.manual_seed(seed)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS,
                      pad_token_id=PAD, output_logits=True, return_dict_in_generate=True, **kw)
    new = out.sequences[:, ids.shape[1]:]
    logprobs = None
    if kw.get("num_beams", 1) == 1:
        raw = torch.stack(out.logits, dim=1).log_softmax(-1)  # [b, new, V]
        logprobs = raw.gather(2, new[:, :, None]).squeeze(2)
        ended = torch.cumsum((new == EOS).long(), 1) - (new == EOS).long() > 0
        logprobs = logprobs.masked_fill(ended, 0.0)
    return new, logprobs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from data_tools import convert
    from framework.tokenizer import embedded_tokenizer

    d = tmp_path_factory.mktemp("real_weights")
    hf = hf_gpt2(d / "hf")
    assert convert.main(["hf-to-megatron", "--load", str(d / "hf"), "--save",
                         str(d / "ckpt")]) == 0
    tok = embedded_tokenizer()
    ids_list = [tok.encode(p) for p in PROMPTS]
    refs = {}
    for name, (_ours, theirs) in CASES.items():
        seed = CASES[name][0].get("seed")
        refs[name] = hf_generate(hf, ids_list, seed=seed, **theirs)
    return {"dir": d, "hf": hf, "ids": ids_list, "refs": refs}


def test_hf_references_are_non_trivial(work):
    """The cases mean something only if hypotheses end at EOS at different steps and beam
    search chooses differently from greedy."""
    refs = work["refs"]
    ended = sum(int((new[:, :-1] == EOS).any(1).sum()) for new, _ in refs.values())
    assert ended >= 2
    assert not torch.equal(refs["greedy"][0], refs["beam4_lp1.3_early"][0])


def _strip(new):
    """HF rows -> token lists as generate.py writes them: up to and including EOS."""
    out = []
    for row in new.tolist():
        out.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return out


@pytest.mark.parametrize("case,extra", [("greedy", []),
                                        ("beam4_lp1.3_early", ["num_beams=4", "length_penalty=1.3",
                                                               "early_stopping=true"])])
def test_generate_py_defaults_match_hf(work, case, extra, tmp_path):
    """generate.py with its defaults on the converted checkpoint: HF's tokens and, for greedy,
    HF's log-probabilities."""
    out = tmp_path / "out.jsonl"
    prompts = json.dumps(PROMPTS)
    r = run(GENERATE, f"load={work['dir'] / 'ckpt'}", f"prompts={prompts}",
            f"max_new_tokens={NEW}", "return_logprobs=true", f"output_file={out}", *extra,
            timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    new, logprobs = work["refs"][case]
    assert [rec["tokens"] for rec in recs] == _strip(new)
    if logprobs is not None:
        for row, rec in enumerate(recs):
            ref = logprobs[row, :len(rec["tokens"])]
            assert torch.allclose(torch.tensor(rec["logprobs"]), ref, rtol=0, atol=TOL), \
                (rec["logprobs"], ref.tolist())


@pytest.fixture(scope="module")
def ours(work):
    """The converted checkpoint loaded in this process as generate.py loads it (TP1, fp32)."""
    from data_tools.convert import single_process_world
    from framework.checkpoint import stored_model_config
    from framework.inference import load_for_inference
    from framework import checkpoint as ckpt

    load = str(work["dir"] / "ckpt")
    meta = ckpt.read_meta(load, ckpt.latest_iteration(load))
    model_cfg = stored_model_config(meta)
    assert model_cfg.fused_bias_add  # the default QKV layer, where the decode bug lived
    from framework.config import ParallelConfig
    from framework.models.build import padded_vocab_size

    padded = padded_vocab_size(V, model_cfg.make_vocab_size_divisible_by, 1)
    with single_process_world():
        model = load_for_inference(load, model_cfg, ParallelConfig(), padded_vocab=padded,
                                   device=torch.device("cpu"), bf16=False)
        yield model


@pytest.mark.parametrize("path", list(DECODE_PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_decode_path_matches_hf(work, ours, case, path):
    from framework.generation import generate

    opts, _theirs = CASES[case]
    if path == "static" and opts.get("num_beams", 1) > 1:
        pytest.skip("the static decode step serves greedy and sampling (beam search reorders "
                    "the cache)")
    ids, mask = left_padded(work["ids"], PAD)
    opts = dict(opts)
    seed = opts.pop("seed", None)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    got, lp = generate(ours, ids, mask, eos_id=EOS, pad_id=PAD, vocab_size=V,
                       max_new_tokens=NEW, return_logprobs=True, generator=gen,
                       **DECODE_PATHS[path], **opts)
    new, ref_lp = work["refs"][case]
    got_new = got[:, ids.shape[1]:]
    n = min(got_new.shape[1], new.shape[1])  # HF stops when every row has ended
    assert torch.equal(got_new[:, :n], new[:, :n]), (got_new.tolist(), new.tolist())
    assert (got_new[:, n:] == PAD).all() and (new[:, n:] == PAD).all()
    if ref_lp is not None:
        torch.testing.assert_close(lp[:, :n], ref_lp[:, :n], rtol=0, atol=TOL)


def test_perturb_checkpoint_rewrites_every_model_tensor(work, tmp_path):
    """tests/perturb.py's checkpoint rewrite (used by the GPU parity tests' seed checkpoints):
    biases non-zero, norm weights not one, other weights moved, tokenizer kept, loads again."""
    import shutil

    from data_tools.convert import single_process_world
    from framework.interop import megatron_files as mf
    from framework import checkpoint as ckpt
    from perturb import perturb_checkpoint

    d = tmp_path / "ckpt"
    shutil.copytree(work["dir"] / "ckpt", d)
    with single_process_world():
        _, before, _ = mf.load_full(ckpt.iter_dir(str(d), 0))
    for key in before:  # zero biases and unit norms first, as a fresh model has them
        if key.endswith("bias"):
            before[key].zero_()
    perturb_checkpoint(str(d), seed=3)
    with single_process_world():
        _, after, _ = mf.load_full(ckpt.iter_dir(str(d), 0))
    assert sorted(after) == sorted(before)
    for key, t in after.items():
        if key.endswith("bias"):
            assert t.abs().min() > 0, key
        elif t.dim() == 1:
            assert (t - 1).abs().min() > 0, key
        else:
            assert not torch.equal(t, before[key]), key
    assert (d / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()
