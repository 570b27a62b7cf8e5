"""Position embeddings and attention variants: ALiBi (slopes, float64 reference, KV cache, longer
eval), RoPE on CPU, MQA/GQA with KV heads replicated over TP ranks (loss parity and KV gradients
TP2 == TP1 over gloo), config validation. The GPU checks (FlexAttention and cuDNN ALiBi,
the fused RoPE, TP2 over NCCL) are in tests/test_gpu_attention.py."""
import math
import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from framework.config import Config, ConfigError, ModelConfig, ParallelConfig
from framework.fast.alibi import alibi_bias, alibi_slopes, alibi_slopes_for_rank
from perturb import perturb_, perturb_checkpoint
from helpers import free_port, run_train, spawn

CPU = torch.device("cpu")
VOCAB = 256  # the padded size at TP1 and TP2 alike


@contextmanager
def world(rank=0, size=1, port=None, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()))
    dist.init_process_group(backend, rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def model_parallel(tp):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def mp1():
    with world(), model_parallel(1):
        yield


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
                hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    return ModelConfig(**{**base, **kw})


def build(cfg, tp=1, seed=0, device=CPU, perturb=True):
    from framework.models.build import build_model

    torch.manual_seed(seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp), vocab_size=VOCAB,
                        bf16=False, fp16=False, device=device, wrap_ddp=False)[0]
    if perturb:  # non-zero biases, non-unit norms (tests/perturb.py)
        perturb_(model, seed=seed)
    return model


# --------------------------------------------------------------------------------------------
# ALiBi slopes and attention
# --------------------------------------------------------------------------------------------
def test_slopes_match_paper():
    # 8 heads: 1/2, 1/4, ..., 1/256
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4-head slopes (1/4 .. 1/256), then every other 8-head slope (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert alibi_slopes(1).tolist() == [2.0 ** -8]
    # 12 heads: 8-head slopes + 16-head slopes 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12)[8:].tolist() == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5,
                                                           2 ** -3.5])
    # TP: contiguous blocks of heads per rank
    parts = [alibi_slopes_for_rank(6, 3, r) for r in range(3)]
    assert torch.equal(torch.cat(parts), alibi_slopes(6))


def _reference(q, k, v, slopes, scale, pad_mask=None):
    """float64 ALiBi attention; q [b, n, sq, d], k/v [b, g, sk, d]; queries are the last sq."""
    q, k, v = q.double(), k.double(), v.double()
    n, g = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(n // g, 1), v.repeat_interleave(n // g, 1)
    sq, sk = q.shape[2], k.shape[2]
    scores = torch.einsum("bnqd,bnkd->bnqk", q, k) * scale
    for i in range(sq):
        for j in range(sk):
            pos_q = sk - sq + i
            if j > pos_q or (pad_mask is not None and bool(pad_mask[0, 0, i, j])):
                scores[:, :, i, j] = float("-inf")
            else:
                scores[:, :, i, j] += slopes.double() * (j - pos_q)
    return torch.einsum("bnqk,bnkd->bnqd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,groups,sq,sk", [(4, 4, 7, 7), (6, 2, 7, 7), (4, 1, 3, 9),
                                                (4, 2, 1, 9)],
                         ids=["mha", "gqa6heads", "mqa_chunk_after_cache", "decode_step"])
@pytest.mark.parametrize("kernel", ["augmented", "dense"])
def test_alibi_attention_matches_float64_reference(mp1, heads, groups, sq, sk, kernel):
    from megatron.core.transformer.enums import AttnMaskType

    from framework.models.transformer import transformer_config
    from framework.models.layers import SDPAttention

    cfg = tiny(hidden_size=heads * 8, num_attention_heads=heads, num_query_groups=groups,
               position_embedding_type="alibi")
    tcfg = transformer_config(cfg, ParallelConfig(), bf16=False, fp16=False, on_gpu=False)
    att = SDPAttention(tcfg, 1, AttnMaskType.causal, "self", alibi=True,
                       alibi_kernel=kernel).eval()
    g = torch.Generator().manual_seed(0)
    b, d = 2, 8
    q = torch.randn(sq, b, heads, d, generator=g, requires_grad=True)
    k, v = (torch.randn(sk, b, groups, d, generator=g, requires_grad=True) for _ in range(2))
    out = att(q, k, v, None)  # [sq, b, n*d]
    ref = _reference(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                     alibi_slopes(heads), 1 / math.sqrt(d)).permute(2, 0, 1, 3).reshape(sq, b, -1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # gradients of q, k and v (the augmented path's extra columns are constants)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=1e-5)
    # a padding mask (True = masked) as generation passes it: key 1 is a pad
    mask = torch.zeros(1, 1, sq, sk, dtype=torch.bool)
    mask[..., 1] = True
    out = att(q, k, v, mask)
    ref = _reference(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                     alibi_slopes(heads), 1 / math.sqrt(d), pad_mask=mask)
    torch.testing.assert_close(out.double(), ref.permute(2, 0, 1, 3).reshape(sq, b, -1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_alibi_augmented_columns_are_exact(dtype):
    """The extra q/k columns are exact in the input dtype and their dot product is
    slope * j / scale to about fp32 precision for every key position up to 65535."""
    from framework.fast.alibi import (_alibi_k_columns, alibi_augment_width,
                                                     alibi_q_columns)

    slopes = alibi_slopes(20).float()  # not a power of two: slopes are not powers of two
    scale = 64 ** -0.5
    qc = alibi_q_columns(slopes, scale, 64, dtype)
    assert alibi_augment_width(64) == 72 and qc.shape == (20, 8) and qc.dtype == dtype
    kc = _alibi_k_columns(65536, 8, "cpu", dtype)
    prod = qc.double()[:, None, :] * kc.double()[None, :, :]
    if dtype != torch.float32:
        # each product of a 16-bit q column and k column is exact in fp32 (what the fused
        # kernels accumulate in), so only the accumulation rounds
        assert torch.equal(prod.float().double(), prod)
    got = prod.sum(-1)
    want = slopes.double()[:, None] / scale * torch.arange(65536, dtype=torch.float64)
    # bf16 / fp32: exact to the fp32 slopes; fp16: its third piece is subnormal (2.5e-7 seen)
    assert ((got - want).abs() <= want.abs() * 5e-7).all()


def test_alibi_augmented_rejects_too_many_keys():
    from framework.fast.alibi import alibi_augment, alibi_q_columns

    qc = alibi_q_columns(alibi_slopes(2).float(), 0.5, 8, torch.float32)
    with pytest.raises(ValueError, match="65536 keys"):
        alibi_augment(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 65537, 8), qc)


def test_alibi_bias_uses_absolute_positions():
    s = torch.tensor([0.5, 0.25])
    full = alibi_bias(s, 6, 6)
    assert torch.equal(alibi_bias(s, 2, 6), full[:, 4:])  # the last two query rows
    assert full[0, 3, 1].item() == -1.0 and full[1, 5, 0].item() == -1.25
    assert torch.isinf(full[:, 2, 3]).all()


def test_alibi_generation_cache_matches_recompute(mp1):
    from framework.generation import generate

    model = build(tiny(position_embedding_type="alibi", num_query_groups=2,
                       init_method_std=0.2), seed=3)
    prompts = [[5, 9, 11, 2, 7, 30, 31], [8, 1], [20, 21, 22, 23]]
    for kw in (dict(), dict(num_beams=3)):
        a = generate(model, prompts, eos_id=3, max_new_tokens=12, use_cache=True, **kw)
        b = generate(model, prompts, eos_id=3, max_new_tokens=12, use_cache=False, **kw)
        assert torch.equal(a, b), kw
        assert a.shape[1] > 7 + 4
    # a prompt decodes the same alone as inside the left-padded batch
    alone = generate(model, [prompts[1]], eos_id=3, max_new_tokens=12)[0, 2:]
    batched = generate(model, prompts, eos_id=3, max_new_tokens=12)[1, 7:]
    assert torch.equal(alone, batched[:len(alone)])


def test_rope_runs_on_cpu(mp1):
    """mcore's RotaryEmbedding would move its frequencies to CUDA; ours keep them on the CPU,
    and positions matter (a permutation-invariant model would score both orders alike)."""
    from framework.models.layers import RotaryEmbeddingOnDevice

    model = build(tiny(position_embedding_type="rope", rotary_percent=0.5))
    assert isinstance(model.rotary_pos_emb, RotaryEmbeddingOnDevice)
    assert not any("position_embeddings" in n for n, _ in model.named_parameters())
    t = torch.randint(0, 200, (2, 16))
    pos = torch.arange(16)[None].expand(2, 16)
    loss = model(t, pos, None, labels=t)
    assert torch.isfinite(loss).all()
    emb = model.rotary_pos_emb(16)
    assert emb.device.type == "cpu" and emb.shape == (16, 1, 1, 4)


def _periodic_batch(g, b, s):
    """Arithmetic sequences mod 61 with a random start and step: predictable from the two
    previous tokens, at any position."""
    start = torch.randint(0, 61, (b, 1), generator=g)
    step = torch.randint(1, 7, (b, 1), generator=g)
    return (start + step * torch.arange(s + 1)[None]) % 61


def test_alibi_trained_short_evaluates_long(mp1):
    """Train at seq 32, evaluate at 128: ALiBi has no position table, its loss stays near the
    short-sequence loss; learned absolute positions cannot run past their table."""
    g = torch.Generator().manual_seed(0)
    eval_short, eval_long = _periodic_batch(g, 8, 32), _periodic_batch(g, 8, 128)

    def loss(model, batch):
        s = batch.shape[1] - 1
        pos = torch.arange(s)[None].expand(batch.shape[0], s)
        return model(batch[:, :-1], pos, None, labels=batch[:, 1:]).mean()

    # a learning check, not a comparison of two paths: a fresh initialisation
    model = build(tiny(position_embedding_type="alibi"), seed=0, perturb=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss(model, _periodic_batch(g, 8, 32)).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        short, long = loss(model, eval_short).item(), loss(model, eval_long).item()
    assert short < 0.5 * math.log(61), short  # it learned something
    assert math.isfinite(long) and long < 1.5 * short + 0.1, (short, long)

    learned = build(tiny(position_embedding_type="learned_absolute"), seed=0).eval()
    with pytest.raises(IndexError):
        loss(learned, eval_long)


def test_alibi_augmented_training_matches_dense(mp1):
    """Ten SGD steps of a GQA ALiBi model: alibi_kernel=augmented (extra head dims) gives the
    losses and first gradients of the dense-bias reference."""
    g = torch.Generator().manual_seed(1)
    batches = [(b[:, :-1], b[:, 1:]) for b in (_periodic_batch(g, 4, 32) for _ in range(10))]
    runs = {}
    for kernel in ("augmented", "dense"):
        cfg = tiny(position_embedding_type="alibi", num_attention_heads=4, num_query_groups=2,
                   alibi_kernel=kernel)
        runs[kernel] = _sgd_run(build(cfg, seed=0), 10, batches)
    (la, ga), (ld, gd) = runs["augmented"], runs["dense"]
    assert la == pytest.approx(ld, rel=1e-5)
    for name in gd:
        torch.testing.assert_close(ga[name], gd[name], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# TP2 == TP1 (gloo): rope, alibi, MQA with KV replicated over ranks
# --------------------------------------------------------------------------------------------
TP_CASES = {
    "rope": dict(position_embedding_type="rope", num_query_groups=2),
    "alibi": dict(position_embedding_type="alibi", num_attention_heads=6, hidden_size=48),
    "alibi_augmented": dict(position_embedding_type="alibi", num_attention_heads=6,
                            hidden_size=48, alibi_kernel="augmented"),
    # MQA: one KV head replicated on both ranks (mcore's groups < tp layout)
    "mqa": dict(num_query_groups=1, normalization="RMSNorm", activation="swiglu",
                add_bias_linear=False),
    "mqa_alibi": dict(attention_head_type="multiquery", position_embedding_type="alibi",
                      num_layers=1),
}


def _shard(full: dict, model, tp: int, rank: int) -> dict:
    """TP1 state -> this rank's TP shard, using mcore's partition attributes."""
    out = {}
    for name, p in model.named_parameters():
        t = full[name]
        if "linear_fc1" in name and model.config.gated_linear_unit:
            # SwiGLU: TP1 holds [gate; up], each rank holds [gate_r; up_r]
            t = torch.cat([h.chunk(tp, dim=0)[rank] for h in t.chunk(2, dim=0)], dim=0)
        elif getattr(p, "tensor_model_parallel", False):
            t = t.chunk(tp, dim=p.partition_dim)[rank]
        out[name] = t.clone()
    return out


def _sgd_run(model, steps, batches):
    losses, grads = [], None
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        tokens, labels = batches[i]
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        losses.append(loss.item())
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return losses, grads


def _tp_worker(rank, port, cases, backend, out_dir):
    device = torch.device("cuda", rank) if backend == "nccl" else CPU
    if backend == "nccl":
        torch.cuda.set_device(rank)
    g = torch.Generator().manual_seed(1)
    batches = [(t[:, :-1].to(device), t[:, 1:].to(device))
               for t in (torch.randint(0, 200, (2, 17), generator=g) for _ in range(3))]
    results = {}
    with world(rank, 2, port, backend):
        for name in cases:
            cfg = tiny(**TP_CASES[name])
            with model_parallel(1):
                ref = build(cfg, 1, seed=0, device=device)
                full = {n: p.detach().clone() for n, p in ref.named_parameters()}
                l1, g1 = _sgd_run(ref, 3, batches)
            with model_parallel(2):
                model = build(cfg, 2, seed=5, device=device)
                model.load_state_dict(_shard(full, model, 2, rank), strict=False)
                l2, g2 = _sgd_run(model, 3, batches)
                # every gradient, KV rows of linear_qkv included, equals the TP1 one's shard
                worst = max((g2[n] - _shard(g1, model, 2, rank)[n]).abs().max().item()
                            for n in g2)
                qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
                kv_norm = _shard(g1, model, 2, rank)[qkv].norm().item()
            results[name] = (l1, l2, worst, kv_norm)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


def _check_tp(results, cases, tol):
    for name in cases:
        l1, l2, worst, kv_norm = results[name]
        assert len(l1) == 3 and all(abs(a - b) < tol for a, b in zip(l1, l2)), (name, l1, l2)
        assert l1[0] != l1[-1], name  # the steps changed the weights
        assert kv_norm > 0 and worst < tol, (name, worst)


def test_tp2_matches_tp1_gloo(tmp_path):
    """TP1 weights sliced into TP2 shards (mcore's partition_dim). Loss of 3 SGD steps and all
    first-step gradients match, including the replicated KV head of MQA under TP2 (its gradient
    is the sum over both ranks)."""
    cases = list(TP_CASES)
    spawn(_tp_worker, (free_port(), cases, "gloo", str(tmp_path)))
    _check_tp(torch.load(tmp_path / "results.pt"), cases, 2e-5)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def test_attention_head_type_alias():
    assert tiny(attention_head_type="multiquery").num_query_groups == 1
    assert tiny(attention_head_type="multiquery", num_query_groups=1).num_query_groups == 1
    assert tiny(attention_head_type="multihead").num_query_groups is None
    assert tiny(attention_head_type="multihead", num_query_groups=4).num_query_groups is None


@pytest.mark.parametrize("kw,fragment", [
    (dict(attention_head_type="multiquery", num_query_groups=2), "model.attention_head_type"),
    (dict(attention_head_type="multihead", num_query_groups=2), "model.num_query_groups=2"),
    (dict(attention_head_type="grouped"), "model.attention_head_type"),
    (dict(num_query_groups=3), "model.num_query_groups=3 must divide"),
    (dict(position_embedding_type="sinusoidal"), "model.position_embedding_type"),
    (dict(position_embedding_type="rope", rotary_percent=0.0), "model.rotary_percent"),
    (dict(position_embedding_type="rope", rotary_percent=1.5), "model.rotary_percent"),
    (dict(position_embedding_type="rope", rotary_percent=0.125), "rotary channels"),
    (dict(position_embedding_type="rope", rotary_base=0), "model.rotary_base"),
    (dict(position_embedding_type="alibi", attention_backend="local"), "attention_backend"),
])
def test_bad_model_combos(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")) as e:
        tiny(**kw)
    assert "\n" not in str(e.value)


def test_tp_and_query_groups():
    # groups % tp == 0 or tp % groups == 0
    Config(model=tiny(num_attention_heads=8, hidden_size=64, num_query_groups=2),
           parallel=ParallelConfig(tensor_model_parallel_size=4))
    Config(model=tiny(num_attention_heads=8, hidden_size=64, num_query_groups=4),
           parallel=ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ConfigError, match="model.num_query_groups=3 and parallel"):
        Config(model=tiny(num_attention_heads=6, hidden_size=48, num_query_groups=3),
               parallel=ParallelConfig(tensor_model_parallel_size=2))
    # alibi with a sequence beyond max_position_embeddings is fine: no table
    tiny(position_embedding_type="alibi", seq_length=128, max_position_embeddings=32)
    with pytest.raises(ConfigError, match="model.seq_length=128 exceeds"):
        tiny(seq_length=128, max_position_embeddings=32)


@pytest.mark.slow
def test_train_py_tp2_matches_tp1_alibi_mqa(tmp_path):
    """The real train.py: one seed checkpoint (train.max_steps=0, then perturbed: non-zero
    biases, non-unit norms) loaded at TP1 and at TP2 (dist-checkpoint resharding of the fused
    QKV whose single KV head both ranks replicate)."""
    arch = ["model.position_embedding_type=alibi", "model.attention_head_type=multiquery",
            "model.hidden_dropout=0", "model.attention_dropout=0"]
    run_train(*arch, "train.max_steps=0", f"checkpoint.dir={tmp_path}/seed", cwd=tmp_path,
              name="seed")
    perturb_checkpoint(str(tmp_path / "seed"))
    common = [*arch, "train.max_steps=3", "train.eval_interval=0", "checkpoint.save=false",
              f"checkpoint.load={tmp_path}/seed"]
    a = run_train(*common, cwd=tmp_path, name="tp1").losses
    b = run_train(*common, "parallel=tp2", cwd=tmp_path, name="tp2").losses
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])
