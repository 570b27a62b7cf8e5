"""Lean decode and CUDA-graph decode on RoPE models on a GPU (`pytest -m gpu`, one GPU), fp32,
against Hugging Face `generate`: tiny HF models with every parameter perturbed
(tests/test_llama.py's `make_hf`), converted with data_tools.convert and loaded on the GPU:
* llama_tied: 6 heads in 2 KV groups (GQA), Llama-3 rope scaling (factor 8, original context
  32), rope_theta 500000, tied embeddings;
* llama_odd: 5 heads in 1 group, head_dim 16 != hidden / heads, rope_theta 50000, Llama-3
  scaling with non-default low/high/original factors, untied;
* qwen2: q/k/v biases, 6 heads in 2 groups, rope_theta 1e6, tied;
* qwen3: per-head q/k RMSNorm (model.qk_layernorm), head_dim 16, no biases, untied.
Every decode path (graph: `decode_cuda_graph=True`, the CUDA graph really captured; lean: eager
lean steps; mcore: `lean_decode=False`; no_cache) gives HF's greedy tokens (HF in fp32 on the
CPU) with logprobs within 2e-4, and HF's 4-beam tokens (not the graph path: it serves greedy and
sampling), with `model.rope_fusion` on (our Triton RoPE kernel through megatron-core's
`apply_rotary_pos_emb`) and off (mcore's unfused formula on precomputed cos/sin tables).
The CPU counterpart is tests/test_lean_decode_rope.py.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import checkpoint_model_cfg
from test_gpu_real_weights import mp1  # noqa: F401  (fixture: gloo + NCCL world of one)
from test_llama import NEW, PROMPTS, _padded, cli, make_hf

pytestmark = pytest.mark.gpu

KINDS = ["llama_tied", "llama_odd", "qwen2", "qwen3"]
CASES = {"greedy": {}, "beam4": dict(num_beams=4, length_penalty=1.3, early_stopping=True)}
PATHS = {"graph": dict(decode_cuda_graph=True), "lean": dict(decode_cuda_graph=False),
         "mcore": dict(lean_decode=False), "no_cache": dict(use_cache=False)}


def _hf_reference(hf, ids_list, tok, **kw):
    """HF's new tokens [b, n] (pad after EOS) and, without beams, the logprobs of the chosen
    tokens under the raw logits (0 after EOS, as ours)."""
    from framework.generation import _prepare_batch

    ids, mask = _prepare_batch(ids_list, None, tok.pad, torch.device("cpu"))
    out = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=NEW, eos_token_id=tok.eod,
                      pad_token_id=tok.pad, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, **kw)
    new = out.sequences[:, ids.shape[1]:]
    if kw.get("num_beams", 1) > 1:
        return new, None
    logprobs = torch.stack(out.logits, dim=1).log_softmax(-1).gather(2, new[:, :, None])[..., 0]
    eos = (new == tok.eod).long()
    return new, logprobs.masked_fill(torch.cumsum(eos, 1) - eos > 0, 0.0)


@pytest.fixture(scope="module")
def work(tmp_path_factory, mp1):  # noqa: F811
    from framework.config import ParallelConfig, TokenizerConfig
    from framework.inference import load_for_inference
    from framework.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("gpu_lean_rope")
    out = {}
    for seed, kind in enumerate(KINDS):
        hf, vocab = make_hf(str(d / kind / "hf"), kind, 31 + seed)
        cli("hf-to-megatron", "--load", d / kind / "hf", "--save", d / kind / "ckpt")
        tok = build_tokenizer(TokenizerConfig(path=str(d / kind / "ckpt" / "iter_0000000" /
                                                        "tokenizer")))
        ids = [tok.encode(p) for p in PROMPTS]
        refs = {case: _hf_reference(hf, ids, tok, **kw) for case, kw in CASES.items()}
        model_cfg, _meta = checkpoint_model_cfg(d / kind / "ckpt")
        models = {}
        for fusion in (True, False):
            models[fusion] = load_for_inference(
                str(d / kind / "ckpt"), replace(model_cfg, rope_fusion=fusion), ParallelConfig(),
                padded_vocab=_padded(vocab, 1), device=torch.device("cuda"), bf16=False)
        out[kind] = dict(vocab=vocab, tok=tok, ids=ids, refs=refs, models=models)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts lean step calls and keeps the StaticDecoders made, to show which path ran."""
    from framework.fast import lean_decode

    seen = {"chunk": 0, "decoders": []}
    chunk, base = lean_decode.forward_chunk, lean_decode.StaticDecoder

    def counted_chunk(*a, **k):
        seen["chunk"] += 1
        return chunk(*a, **k)

    class Recorded(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["decoders"].append(self)

    monkeypatch.setattr(lean_decode, "forward_chunk", counted_chunk)
    monkeypatch.setattr(lean_decode, "StaticDecoder", Recorded)
    return seen


@pytest.mark.parametrize("fusion", [True, False], ids=["rope_fusion", "unfused"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_rope_decode_paths_match_hf(work, kind, case, path, fusion, spy):
    from framework.fast.lean_decode import supported
    from framework.generation import generate
    from framework.models.wrappers import unwrap

    if path == "graph" and case != "greedy":
        pytest.skip("CUDA-graph decode serves greedy and sampling")
    w = work[kind]
    model, tok = w["models"][fusion], w["tok"]
    mod = unwrap(model[0])
    assert supported(mod) and mod.position_embedding_type == "rope"
    assert bool(mod.config.apply_rope_fusion) == fusion
    got, lp = generate(model, w["ids"], eos_id=tok.eod, pad_id=tok.pad, vocab_size=w["vocab"],
                       max_new_tokens=NEW, return_logprobs=True, **PATHS[path], **CASES[case])
    if path == "graph":
        assert spy["decoders"] and spy["decoders"][-1].graph is not None  # captured, replayed
    elif path == "lean":
        assert spy["chunk"] > 0 and not spy["decoders"]
    else:
        assert spy["chunk"] == 0 and not spy["decoders"]
    ref, ref_lp = w["refs"][case]
    s = max(map(len, w["ids"]))
    got_new = got[:, s:].cpu()
    n = min(got_new.shape[1], ref.shape[1])
    assert torch.equal(got_new[:, :n], ref[:, :n]), (got_new.tolist(), ref.tolist())
    # ours stops when every row has ended; HF pads the rest
    assert (ref[:, n:] == tok.pad).all() or got_new.shape[1] == ref.shape[1]
    if ref_lp is not None:
        torch.testing.assert_close(lp[:, :n].cpu(), ref_lp[:, :n], rtol=0, atol=2e-4)
