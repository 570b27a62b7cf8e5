"""GPU checks of generation (run with `pytest -m gpu`; the CPU ones are in
tests/test_generation.py): RoPE with and without the KV cache in fp32 and bf16, generate.py at
PP2 / TP2 / TP2·PP2 over NCCL against a single GPU, decode CUDA graphs against eager steps."""
import json

import pytest
import torch

from framework.config import ModelConfig, ParallelConfig
from perturb import perturb_
from test_generation import CK_PROMPTS, EOS, TINY, _generate_py, checkpoint, mp1  # noqa: F401


@pytest.mark.gpu
def test_gpu_rope_cache_and_bf16(mp1):
    """RoPE runs on GPU only (mcore moves its frequencies to CUDA). Perturbed weights; fp32: the
    cache changes nothing; bf16 (Float16Module-wrapped) runs both ways."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from framework.generation import generate
    from framework.models.build import build_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      seq_length=64, hidden_dropout=0.0, attention_dropout=0.0,
                      position_embedding_type="rope", normalization="RMSNorm",
                      activation="swiglu", add_bias_linear=False, init_method_std=0.1)
    gpu = torch.device("cuda", 0)
    prompts = [[5, 9, 11, 2, 7, 30, 31], [8, 1], [20, 21, 22, 23]]
    for bf16 in (False, True):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_model(cfg, ParallelConfig(), vocab_size=128, bf16=bf16, fp16=False,
                            device=gpu, wrap_ddp=False)
        perturb_(model)  # non-unit norms (tests/perturb.py)
        for kw in (dict(), dict(num_beams=3)):
            a = generate(model, prompts, eos_id=EOS, max_new_tokens=12, **kw)
            b = generate(model, prompts, eos_id=EOS, max_new_tokens=12, use_cache=False, **kw)
            if not bf16:
                assert torch.equal(a, b), kw
            assert a.shape[1] > 7 and b.shape[1] > 7 and int(a.max()) < 128, kw


def _gpu_layouts_match_single(checkpoint, tmp_path, layouts, option_sets):
    """generate.py on GPU at each layout (fp32) gives the single-GPU tokens and logprobs."""
    from framework.tokenizer import embedded_tokenizer

    tok = embedded_tokenizer()
    prompts = json.dumps([tok.decode(p) for p in CK_PROMPTS])
    for opts in option_sets:
        recs = {}
        for layout in ("single", *layouts):
            out = tmp_path / f"{layout}.jsonl"
            r = _generate_py(tmp_path, f"load={checkpoint}", "bf16=false", f"prompts={prompts}",
                             "max_new_tokens=10", "return_logprobs=true", f"parallel={layout}",
                             f"output_file={out}", *opts, device="cuda")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
            recs[layout] = [json.loads(line) for line in open(out)]
        assert len(recs["single"]) == len(CK_PROMPTS)
        for layout in layouts:
            for a, b in zip(recs["single"], recs[layout]):
                assert a["tokens"] == b["tokens"], (layout, opts)
                assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.gpus(2)
def test_gpu_pp2_and_tp2_match_single(checkpoint, tmp_path):
    """generate.py at PP2 and TP2 (NCCL) gives the single-GPU tokens (fp32)."""
    _gpu_layouts_match_single(checkpoint, tmp_path, ("pp2", "tp2"),
                              (["num_beams=3", "length_penalty=0.8"], ["top_k=4", "seed=5"]))


@pytest.mark.gpu
@pytest.mark.gpus(4)
def test_gpu_tp2_pp2_matches_tp1(checkpoint, tmp_path):
    """generate.py at TP2·PP2 (4 GPUs, NCCL) gives the TP1 tokens: greedy, beam search and
    seeded top-k/top-p sampling (fp32)."""
    _gpu_layouts_match_single(checkpoint, tmp_path, ("tp2_pp2",),
                              ([], ["num_beams=3", "length_penalty=0.8"],
                               ["top_k=4", "top_p=0.9", "seed=5"]))


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_matches_eager(mp1):
    """decode_cuda_graph=true (static decode step captured once, replayed per token) gives the
    eager tokens on a GPU: fp32 greedy and seeded sampling, padded prompts; ALiBi and GQA;
    perturbed weights."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from framework.generation import generate
    from framework.models.build import build_model

    gpu = torch.device("cuda", 0)
    prompts = CK_PROMPTS + [[7, 3]]
    for extra in (dict(), dict(position_embedding_type="alibi", num_query_groups=2)):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_model(ModelConfig(**{**TINY, **extra}), ParallelConfig(), vocab_size=24,
                            bf16=False, fp16=False, device=gpu, wrap_ddp=False)
        perturb_(model)  # non-zero biases, non-unit norms (tests/perturb.py)
        for kw in (dict(), dict(top_k=4, top_p=0.9, seed=5)):
            ref = generate(model, prompts, max_new_tokens=12, vocab_size=19,
                           return_logprobs=True, decode_cuda_graph=False, **kw)
            got = generate(model, prompts, max_new_tokens=12, vocab_size=19,
                           return_logprobs=True, decode_cuda_graph=True, **kw)
            assert torch.equal(ref[0], got[0]), (extra, kw)
            torch.testing.assert_close(ref[1], got[1], rtol=0, atol=1e-4)
            # the default on a single GPU is the graph path
            default = generate(model, prompts, max_new_tokens=12, vocab_size=19,
                               return_logprobs=True, **kw)
            assert torch.equal(default[0], got[0]) and torch.equal(default[1], got[1])
