"""Fused chunked linear + vocab-parallel cross-entropy (framework/fast/fused_ce.py), CPU:
loss and gradients == a float64 reference for any per-token upstream gradient and chunking;
TP2 (gloo, with and without sequence parallelism) == TP1; the GPT model subclass == GPTModel
(tied and untied output weight, logits without labels); `train.py` losses unchanged."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from framework.fast.fused_ce import LinearCrossEntropy, default_chunk_tokens, linear_cross_entropy
from perturb import perturb_, perturb_checkpoint
from helpers import free_port, run_train, spawn

S, B, H, V = 7, 3, 16, 40  # 21 tokens


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    go = torch.rand(B, S, generator=g, dtype=torch.float64) * (torch.rand(B, S, generator=g) > 0.3)
    return h.to(dtype), w.to(dtype), labels, go


def _reference(h, w, labels, go):
    """float64: plain logits + F.cross_entropy, per-token loss [b, s] and grads."""
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    logits = (h @ w.t()).transpose(0, 1)  # [b, s, V]
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1),
                           reduction="none").view(labels.shape)
    (loss * go.double()).sum().backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, labels, go, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, **kw)
    (loss * go.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_logits"])
@pytest.mark.parametrize("chunk", [None, 7, 5, 1, 64])  # 21 tokens: one chunk, divides, not
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(chunk, dtype, keep):
    h, w, labels, go = _data(dtype)
    ref = _reference(h, w, labels, go)
    out = _fused(h, w, labels, go, chunk_tokens=chunk, keep_logits=keep)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert out[0].shape == (B, S) and out[0].dtype in (torch.float32, torch.float64)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for name, a, b in zip(("loss", "grad_h", "grad_w"), out, ref):
        assert (a.double() - b).abs().max().item() < tol, (name, chunk, dtype)


def test_bf16_close_to_reference():
    h, w, labels, go = _data(torch.bfloat16)
    ref = _reference(h, w, labels, go)
    out = _fused(h, w, labels, go, chunk_tokens=4)
    assert out[0].dtype == torch.float32 and out[1].dtype == out[2].dtype == torch.bfloat16
    for name, a, b in zip(("loss", "grad_h", "grad_w"), out, ref):
        err = (a.double() - b).abs().max().item() / (b.abs().max().item() + 1e-6)
        assert err < 3e-2, (name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_give_the_recomputed_single_chunk_bits(dtype):
    """keep_logits (one forward GEMM, the logits turned into their gradient in place in chunks
    of 4, one GEMM each for grad_h and grad_w) against the recomputing path with one chunk of
    all tokens (the same GEMMs): the same loss and gradients, bit for bit, on perturbed data;
    and no logits are kept without a backward to come."""
    h, w, labels, go = _data(dtype, seed=5)
    ref = _fused(h, w, labels, go, chunk_tokens=S * B)
    got = _fused(h, w, labels, go, chunk_tokens=4, keep_logits=True)
    for name, a, b in zip(("loss", "grad_h", "grad_w"), got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        linear_cross_entropy(hh, ww, labels, keep_logits=True)
    assert any(t.shape == (S * B, V) for t in saved)  # the kept logits
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, keep_logits=True)
    assert torch.equal(loss, ref[0])


def test_kept_logits_edge_cases(monkeypatch):
    """keep_logits: an empty micro-batch; torch.autocast (falls back to recomputing, since the
    kept logits would not be in the weight's dtype); a compiled in-place gradient kernel that
    fails half way through a chunk (the chunk's logits are recomputed before the eager rerun);
    a second backward through the graph stops with autograd's in-place error."""
    from framework.fast import fused_ce

    h, w, labels, go = _data(torch.float32, seed=6)
    ref = _fused(h, w, labels, go, chunk_tokens=S * B)
    # empty
    loss, gh, gw = _fused(h[:0], w, labels[:, :0], go[:, :0], keep_logits=True)
    assert loss.shape == (B, 0) and gh.shape == (0, B, H) and not gw.any()
    # autocast around the forward (backward outside it, as usual): recomputes, like without
    # keep_logits, and nothing is kept
    outs = []
    for keep in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = linear_cross_entropy(hh, ww, labels, keep_logits=keep)
        assert not any(t.shape == (S * B, V) for t in saved)
        (loss * go.float()).sum().backward()
        outs.append((loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[1][0] - ref[0]).abs().max().item() < 0.1
    # a failing compiled kernel: it scribbles on the chunk, marks itself failed and reruns
    # eagerly on what it left (what _kernel's wrapper does)
    def failing(name, cuda):
        if name != "grad_":
            return fused_ce._EAGER[name]

        def fn(logits, *args):
            if not fused_ce._COMPILED.get("grad_.failed"):  # the first call fails
                logits.fill_(123.0)
                fused_ce._COMPILED["grad_.failed"] = True
            return fused_ce._EAGER["grad_"](logits, *args)
        return fn

    monkeypatch.setattr(fused_ce, "_kernel", failing)
    monkeypatch.setattr(fused_ce, "_COMPILED", {})
    got = _fused(h, w, labels, go, chunk_tokens=4, keep_logits=True)
    for name, a, b in zip(("loss", "grad_h", "grad_w"), got, ref):
        assert (a - b).abs().max().item() < 1e-5, name
    monkeypatch.undo()
    # one backward per graph
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = (linear_cross_entropy(hh, ww, labels, keep_logits=True) * go.float()).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_keep_logits_auto_is_off_on_cpu_and_by_size(monkeypatch):
    from framework.fast import fused_ce

    assert not fused_ce.keep_logits_auto(16 * 2048, 128256, 2, torch.device("cpu"))

    class Props:
        total_memory = 141 * 10 ** 9  # an H200's

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    cuda = torch.device("cuda", 0)
    assert fused_ce.keep_logits_auto(16 * 2048, 128256, 2, cuda)  # 8.4 GB: kept
    assert not fused_ce.keep_logits_auto(32 * 2048, 128256, 2, cuda)  # 16.8 GB: recomputed
    Props.total_memory = 80 * 10 ** 9
    assert fused_ce.keep_logits_auto(12 * 2048, 128256, 2, cuda)  # 6.3 GB of 80
    assert not fused_ce.keep_logits_auto(16 * 2048, 128256, 2, cuda)


def test_labels_outside_vocab_count_as_zero_logit_like_mcore():
    h, w, labels, go = _data(torch.float64)
    labels = labels.clone()
    labels[0, 0] = V + 3
    out = _fused(h, w, labels, go)
    lse = torch.logsumexp(h[0, 0] @ w.t(), dim=0)
    assert abs(out[0][0, 0].item() - lse.item()) < 1e-10


def test_default_chunk_size():
    # one chunk's logits <= 256 MB (fp32 by default; bf16: twice the tokens)
    assert default_chunk_tokens(50304) * 50304 * 4 <= 256 * 2 ** 20
    assert default_chunk_tokens(50304, 2) * 50304 * 2 <= 256 * 2 ** 20
    assert default_chunk_tokens(50304, 2) > default_chunk_tokens(50304)
    assert default_chunk_tokens(50304) % 64 == 0 and default_chunk_tokens(10 ** 9) == 64


# --------------------------------------------------------------------------------------------
# TP2 == TP1 over gloo
# --------------------------------------------------------------------------------------------
def _tp_worker(rank, port):
    # a plain 2-rank group as the TP group: what parallel_state would build at TP2 on 2 ranks,
    # without importing megatron-core in the workers (seconds each on a small CPU)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tp = dist.new_group([0, 1])
        S2 = 8  # divisible by TP for sequence parallelism
        g = torch.Generator().manual_seed(3)
        h = torch.randn(S2, B, H, generator=g)
        w = torch.randn(V, H, generator=g) * 0.5
        labels = torch.randint(0, V, (B, S2), generator=g)
        go = torch.rand(B, S2, generator=g) * (torch.rand(B, S2, generator=g) > 0.3)
        ref = _fused(h, w, labels, go, chunk_tokens=5)  # TP1 on every rank
        vs = V // 2
        w_local = w[rank * vs:(rank + 1) * vs]
        for sp in (False, True):
            for chunk, keep in ((None, False), (5, False), (5, True)):
                h_in = h[rank * S2 // 2:(rank + 1) * S2 // 2] if sp else h
                loss, gh, gw = _fused(h_in, w_local, labels, go, tp_group=tp,
                                      sequence_parallel=sp, chunk_tokens=chunk,
                                      keep_logits=keep)
                want_gh = ref[1][rank * S2 // 2:(rank + 1) * S2 // 2] if sp else ref[1]
                want_gw = ref[2][rank * vs:(rank + 1) * vs]
                for name, a, b in (("loss", loss, ref[0]), ("grad_h", gh, want_gh),
                                   ("grad_w", gw, want_gw)):
                    assert a.shape == b.shape, (name, sp, a.shape, b.shape)
                    err = (a - b).abs().max().item()
                    assert err < 2e-5, (name, sp, chunk, keep, err)
    finally:
        dist.destroy_process_group()


def test_tp2_and_sequence_parallel_match_tp1_gloo():
    spawn(_tp_worker, (free_port(),))


# --------------------------------------------------------------------------------------------
# the GPT model subclass == GPTModel
# --------------------------------------------------------------------------------------------
def _build(fused, tied):
    from framework.config import ModelConfig, ParallelConfig
    from framework.models.build import build_model

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
                      share_embeddings_and_output_weights=tied, fused_cross_entropy=fused)
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), vocab_size=64, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)[0]
    perturb_(model)  # non-zero biases, non-unit norms (tests/perturb.py)
    return model


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_logits"])
@pytest.mark.parametrize("tied", [True, False])
def test_gpt_model_matches_mcore(mp1, tied, keep):
    from framework.fast.fused_ce import FusedCEGPTModel

    ref, fused = _build(False, tied), _build(True, tied)
    assert isinstance(fused, FusedCEGPTModel) and not isinstance(ref, FusedCEGPTModel)
    fused.load_state_dict(ref.state_dict())
    fused.fused_ce_chunk_tokens = 5  # 2 x 16 tokens: several chunks, the last one partial
    fused.fused_ce_keep_logits = keep
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 17), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(16).expand(2, 16)
    mask = (torch.rand(2, 16, generator=g) > 0.25).float()
    out = []
    for m in (ref, fused):
        m.zero_grad()
        loss = m(ids, pos, None, labels=labels)
        assert loss.shape == (2, 16)
        ((loss * mask).sum() / mask.sum()).backward()
        with torch.no_grad():
            logits = m(ids, pos, None)  # no labels: logits [b, s, V], like GPTModel
        out.append((loss.detach(), logits, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l1, z1, g1), (l2, z2, g2) = out
    assert z1.shape == (2, 16, 64) and torch.equal(z1, z2)
    assert (l1 - l2).abs().max().item() < 1e-5
    assert g1.keys() == g2.keys()
    for n in g1:
        assert (g1[n] - g2[n]).abs().max().item() < 1e-5, n


def test_keep_logits_reaches_the_model(mp1):
    from framework.config import ModelConfig, ParallelConfig
    from framework.models.build import build_model

    for keep, want in ((None, None), (True, True), (False, False)):  # None: keep_logits_auto
        cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16,
                          fused_ce_keep_logits=keep, fused_ce_chunk_tokens=96 if keep else None)
        model = build_model(cfg, ParallelConfig(), vocab_size=64, bf16=False, fp16=False,
                            device=torch.device("cpu"), wrap_ddp=False)[0]
        assert model.fused_ce_keep_logits is want
        assert model.fused_ce_chunk_tokens == (96 if keep else None)


def test_fused_ce_is_gpt_only():
    from framework.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="fused_cross_entropy"):
        ModelConfig(type="bert", fused_cross_entropy=True)
    with pytest.raises(ConfigError, match="fused_ce_keep_logits=true needs"):
        ModelConfig(fused_cross_entropy=False, fused_ce_keep_logits=True)
    with pytest.raises(ConfigError, match="fused_ce_keep_logits=true needs"):
        ModelConfig(type="bert", fused_ce_keep_logits=True)
    with pytest.raises(ConfigError, match="model.fused_ce_chunk_tokens=64 needs"):
        ModelConfig(fused_cross_entropy=False, fused_ce_chunk_tokens=64)
    for bad in (0, -8):
        with pytest.raises(ConfigError, match=f"model.fused_ce_chunk_tokens={bad} must be"):
            ModelConfig(fused_ce_chunk_tokens=bad)


# --------------------------------------------------------------------------------------------
# train.py end to end
# --------------------------------------------------------------------------------------------
def test_train_losses_unchanged(tmp_path):
    """From one perturbed seed checkpoint (non-zero biases, non-unit norms: tests/perturb.py)."""
    run_train("train.max_steps=0", f"checkpoint.dir={tmp_path}/seed", cwd=tmp_path, name="seed")
    perturb_checkpoint(str(tmp_path / "seed"))
    common = ["train.max_steps=5", "train.eval_interval=0", "checkpoint.save=false",
              f"checkpoint.load={tmp_path}/seed"]
    la = run_train(*common, cwd=tmp_path, name="mcore").losses
    lb = run_train(*common, "model.fused_cross_entropy=true", cwd=tmp_path, name="fused").losses
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5]
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])
