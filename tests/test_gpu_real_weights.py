"""Every GPU fast path against its reference on perturbed weights (tests/perturb.py says why a
zero bias or a unit norm weight hides bugs), forward and backward, and GPU generation against
Hugging Face on a perturbed, imported GPT-2 (`pytest -m gpu`, one GPU).

Fast paths, each as a pair of models with the same perturbed weights, the same batch, loss and
every parameter gradient compared: `fused_norm` (LayerNorm, RMSNorm), `fused_bias_add`,
`rope_fusion` (GQA), `fused_cross_entropy` (tied, untied), `mlp_act` recompute (fused bias-GeLU),
`fused_wgrad` (main grads through megatron-core's DDP), and the ALiBi kernels (`flex` in fp32;
`cudnn` and `augmented` in bf16) against the dense bias.

Generation: the CPU test's checkpoint recipe (tests/test_real_weights.py) loaded on the GPU in
fp32: greedy and 4-beam tokens equal HF's (computed on the CPU), log-probabilities within 2e-4,
through CUDA-graph decode (the default at TP1), eager lean decode, megatron-core's modules and no
cache; seeded sampling equals HF's on the GPU (both draw from a CUDA generator with the seed).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import free_port, left_padded
from perturb import assert_perturbed, perturb_

pytestmark = pytest.mark.gpu

VOCAB, SEQ, BATCH = 512, 256, 4


@pytest.fixture(scope="module")
def mp1():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    made = not dist.is_initialized()
    if made:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if made:
            dist.destroy_process_group()


def _cfg(**kw):
    from framework.config import ModelConfig

    base = dict(num_layers=2, hidden_size=256, num_attention_heads=8, seq_length=SEQ,
                hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
                fused_wgrad=False)
    return ModelConfig(**{**base, **kw})


def _build(cfg, parallel=None, bf16=False, ddp=False):
    from framework.config import ParallelConfig
    from framework.models.build import build_model

    torch.manual_seed(0)
    return build_model(cfg, parallel or ParallelConfig(), vocab_size=VOCAB, bf16=bf16,
                       fp16=False, device=torch.device("cuda"), wrap_ddp=ddp)[0]


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).cuda()
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ).cuda()


def _loss_and_grads(model, ddp=False):
    from framework.models.wrappers import unwrap

    ids, labels, pos = _batch()
    model.train()
    if ddp:
        model.zero_grad_buffer()
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = {}
    for name, p in unwrap(model).named_parameters():
        g = p.main_grad if ddp else p.grad
        grads[name] = g.detach().float().clone()
    return loss.item(), grads


def _pair(ref_cfg, fast_cfg, parallel=None, bf16=False, ddp=False):
    """Loss and grads of the reference and the fast model, both from the reference's weights
    after perturbing them."""
    from framework.models.wrappers import unwrap

    ref = _build(ref_cfg, parallel, bf16, ddp)
    perturb_(unwrap(ref), seed=7)
    assert_perturbed(unwrap(ref))
    fast = _build(fast_cfg, parallel, bf16, ddp)
    unwrap(fast).load_state_dict(unwrap(ref).state_dict())
    return _loss_and_grads(ref, ddp), _loss_and_grads(fast, ddp)


def _assert_close(pair, label, loss_rtol, grad_rtol):
    """Loss within loss_rtol; each gradient within grad_rtol of its largest entry."""
    from gpu_shared import log_parity

    (l_ref, g_ref), (l_fast, g_fast) = pair
    assert g_ref.keys() == g_fast.keys()
    worst_name, worst = None, 0.0
    for name in g_ref:
        scale = g_ref[name].abs().max().item() or 1.0
        err = (g_fast[name] - g_ref[name]).abs().max().item() / scale
        if err > worst:
            worst_name, worst = name, err
    line = (f"perturbed weights, {label}: loss {l_ref:.6f} ref vs {l_fast:.6f} fast "
            f"(rel {abs(l_fast - l_ref) / abs(l_ref):.2e}, tol {loss_rtol}); worst grad "
            f"{worst_name} rel {worst:.2e} (tol {grad_rtol})")
    log_parity(line)
    assert abs(l_fast - l_ref) <= loss_rtol * abs(l_ref), line
    assert worst <= grad_rtol, line


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_fused_norm_perturbed(mp1, norm):
    _assert_close(_pair(_cfg(normalization=norm, fused_norm=False),
                        _cfg(normalization=norm, fused_norm=True)),
                  f"fused_norm {norm} fp32", 1e-5, 1e-4)


def test_fused_bias_add_perturbed(mp1):
    _assert_close(_pair(_cfg(fused_bias_add=False), _cfg(fused_bias_add=True)),
                  "fused_bias_add fp32", 1e-6, 1e-5)


def test_rope_fusion_perturbed(mp1):
    kw = dict(position_embedding_type="rope", num_query_groups=2, normalization="RMSNorm",
              activation="swiglu", add_bias_linear=False, add_qkv_bias=True)
    _assert_close(_pair(_cfg(rope_fusion=False, **kw), _cfg(rope_fusion=True, **kw)),
                  "rope_fusion GQA fp32", 1e-5, 1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_qkv_rope_fusion_perturbed(mp1, compiled):
    """model.qkv_rope_fusion against mcore's split + rotation (rope_fusion on both sides), GQA
    with a QKV bias, eager and under model.torch_compile (which traces the kernel's autograd
    function: the kernel is handed the whole QKV tensor it addresses)."""
    kw = dict(position_embedding_type="rope", num_query_groups=2, normalization="RMSNorm",
              activation="swiglu", add_bias_linear=False, add_qkv_bias=True,
              torch_compile=compiled)
    _assert_close(_pair(_cfg(qkv_rope_fusion=False, **kw), _cfg(qkv_rope_fusion=True, **kw)),
                  f"qkv_rope_fusion GQA fp32 compiled={compiled}", 1e-5, 1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_cross_entropy_perturbed(mp1, tied):
    kw = dict(share_embeddings_and_output_weights=tied)
    _assert_close(_pair(_cfg(fused_cross_entropy=False, **kw),
                        _cfg(fused_cross_entropy=True, **kw)),
                  f"fused_cross_entropy tied={tied} fp32", 1e-5, 1e-4)


def test_mlp_act_recompute_perturbed(mp1):
    from framework.config import ParallelConfig

    kw = dict(activation="gelu_tanh")  # mcore's fused bias-GeLU on GPU
    ref = _build(_cfg(**kw))
    perturb_(ref, seed=7)
    fast = _build(_cfg(**kw), ParallelConfig(recompute_granularity="selective",
                                             recompute_modules=["mlp_act"]))
    fast.load_state_dict(ref.state_dict())
    _assert_close((_loss_and_grads(ref), _loss_and_grads(fast)), "mlp_act recompute fp32",
                  1e-6, 1e-5)


def test_fused_wgrad_perturbed(mp1):
    _assert_close(_pair(_cfg(fused_wgrad=False), _cfg(fused_wgrad=True), ddp=True),
                  "fused_wgrad fp32 (main grads)", 1e-6, 1e-4)


def test_flex_alibi_perturbed(mp1):
    kw = dict(position_embedding_type="alibi", num_query_groups=4)
    _assert_close(_pair(_cfg(alibi_kernel="dense", **kw), _cfg(alibi_kernel="flex", **kw)),
                  "ALiBi flex vs dense fp32", 1e-5, 1e-3)


@pytest.mark.parametrize("kernel", ["augmented", "cudnn"])
def test_bf16_alibi_kernels_perturbed(mp1, kernel):
    from framework.fast import cudnn_attention

    if kernel == "cudnn" and not cudnn_attention.available():
        pytest.skip("nvidia-cudnn-frontend is not installed")
    kw = dict(position_embedding_type="alibi", num_query_groups=4)
    _assert_close(_pair(_cfg(alibi_kernel="dense", **kw), _cfg(alibi_kernel=kernel, **kw),
                        bf16=True),
                  f"ALiBi {kernel} vs dense bf16", 2e-2, 5e-2)


# --------------------------------------------------------------------------------------------
# generation on the GPU against Hugging Face
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_work(tmp_path_factory, mp1):
    from data_tools import convert
    from framework.config import ParallelConfig
    from framework.checkpoint import stored_model_config
    from framework.inference import load_for_inference
    from framework.models.build import padded_vocab_size
    from framework.tokenizer import embedded_tokenizer
    from framework import checkpoint as ckpt
    from test_real_weights import CASES, PROMPTS, V, hf_generate, hf_gpt2

    d = tmp_path_factory.mktemp("gpu_real_weights")
    hf = hf_gpt2(d / "hf")
    assert convert.main(["hf-to-megatron", "--load", str(d / "hf"), "--save",
                         str(d / "ckpt")]) == 0
    ids = [embedded_tokenizer().encode(p) for p in PROMPTS]
    refs = {name: hf_generate(hf, ids, **theirs) for name, (_o, theirs) in CASES.items()
            if not theirs.get("do_sample")}
    hf_gpu = hf.cuda()
    load = str(d / "ckpt")
    meta = ckpt.read_meta(load, 0)
    model_cfg = stored_model_config(meta)
    padded = padded_vocab_size(V, model_cfg.make_vocab_size_divisible_by, 1)
    model = load_for_inference(load, model_cfg, ParallelConfig(), padded_vocab=padded,
                               device=torch.device("cuda"), bf16=False)
    return {"ids": ids, "refs": refs, "model": model, "hf_gpu": hf_gpu}


GPU_PATHS = {"graph": dict(decode_cuda_graph=True), "lean": dict(decode_cuda_graph=False),
             "mcore": dict(lean_decode=False), "no_cache": dict(use_cache=False)}


@pytest.mark.parametrize("path", list(GPU_PATHS))
@pytest.mark.parametrize("case", ["greedy", "beam4_lp0.9", "beam4_lp1.3_early", "top_k_sample"])
def test_gpu_decode_paths_match_hf(gen_work, case, path):
    from framework.generation import generate
    from test_real_weights import CASES, EOS, NEW, PAD, V, hf_generate

    opts, theirs = CASES[case]
    opts = dict(opts)
    if path == "graph" and opts.get("num_beams", 1) > 1:
        pytest.skip("CUDA-graph decode serves greedy and sampling")
    seed = opts.pop("seed", None)
    if seed is not None:  # HF on the GPU draws from the CUDA generator seeded by manual_seed
        ids, mask = left_padded(gen_work["ids"], PAD)
        torch.manual_seed(seed)
        out = gen_work["hf_gpu"].generate(ids.cuda(), attention_mask=mask.cuda(),
                                          max_new_tokens=NEW, eos_token_id=EOS,
                                          pad_token_id=PAD, **theirs)
        ref, ref_lp = out[:, ids.shape[1]:].cpu(), None
        gen = torch.Generator(device="cuda").manual_seed(seed)
    else:
        ref, ref_lp = gen_work["refs"][case]
        gen = None
    ids, mask = left_padded(gen_work["ids"], PAD)
    got, lp = generate(gen_work["model"], ids.cuda(), mask.cuda(), eos_id=EOS, pad_id=PAD,
                       vocab_size=V, max_new_tokens=NEW, return_logprobs=True, generator=gen,
                       **GPU_PATHS[path], **opts)
    got_new = got[:, ids.shape[1]:].cpu()
    n = min(got_new.shape[1], ref.shape[1])
    assert torch.equal(got_new[:, :n], ref[:, :n]), (got_new.tolist(), ref.tolist())
    if ref_lp is not None:
        torch.testing.assert_close(lp[:, :n].cpu(), ref_lp[:, :n], rtol=0, atol=2e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_fusion_perturbed(mp1, bias):
    """model.bias_activation_fusion (null = on for swiglu on GPU): megatron-core's fused SwiGLU
    against the unfused chunk/SiLU/product, fp32."""
    kw = dict(activation="swiglu", add_bias_linear=bias, normalization="RMSNorm")
    _assert_close(_pair(_cfg(bias_activation_fusion=False, **kw), _cfg(**kw)),
                  f"fused SwiGLU bias={bias} fp32", 1e-5, 1e-4)


def test_native_gqa_flash_perturbed(mp1):
    """GQA through the flash kernel's grouped heads (SDPA enable_gqa) against repeated KV heads,
    bf16 (flash needs it), RoPE, 8 heads over 2 KV groups; and the grouped path really runs."""
    from framework.models.wrappers import unwrap
    from framework.models.layers import SDPAttention, _flash_gqa_ok

    q = torch.randn(2, 8, 64, 32, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 64, 32, device="cuda", dtype=torch.bfloat16)
    assert _flash_gqa_ok(q, kv, kv, None, 0.0, True)
    kw = dict(position_embedding_type="rope", num_query_groups=2, normalization="RMSNorm",
              activation="swiglu", add_bias_linear=False)
    ref = _build(_cfg(**kw), bf16=True)
    perturb_(unwrap(ref), seed=7)
    fast = _build(_cfg(**kw), bf16=True)
    unwrap(fast).load_state_dict(unwrap(ref).state_dict())
    for m in unwrap(ref).modules():
        if isinstance(m, SDPAttention):
            m.native_gqa = False
    _assert_close((_loss_and_grads(ref), _loss_and_grads(fast)), "native GQA (flash) vs "
                  "repeated KV heads bf16", 2e-3, 2e-2)
