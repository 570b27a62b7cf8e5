"""GPU checks of the fast path (issue: fast path), run by tests/run_gpu_suite.sh:
* every fast kernel against the reference it replaces, on CUDA tensors: the fused chunked
  linear + cross-entropy (fp32 and bf16 against a float64 reference), the foreach grad-norm and
  scale kernels (against megatron-core's local per-tensor loops) and torch's fused AdamW step
  (against the foreach step);
* a 200-step loss curve of the fast path (the defaults plus the fused cross-entropy, bf16)
  against the reference path (megatron-core's local attention, its fallback optimizer kernels,
  the unfused cross-entropy) from the same initial weights: within bf16 tolerance.
"""
import os
import pathlib

import pytest
import torch
from perturb import perturb_checkpoint
from gpu_shared import log_parity, shared_once
from helpers import ROOT, run, run_train

pytestmark = pytest.mark.gpu


def test_fused_linear_cross_entropy_cuda():
    from framework.fast.fused_ce import linear_cross_entropy

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(0)
    s, b, h, v = 257, 3, 64, 5003  # odd sizes: chunk tails
    hid = torch.randn(s, b, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (b, s), generator=g)
    go = torch.rand(b, s, generator=g, dtype=torch.float64)

    def ref():
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy((hh @ ww.t()).transpose(0, 1).reshape(-1, v),
                                                 labels.reshape(-1), reduction="none")
        (loss * go.reshape(-1)).sum().backward()
        return loss.view(b, s), hh.grad, ww.grad

    r = ref()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for chunk, keep in ((None, False), (100, False), (100, True), (None, True)):
            hh = hid.to(dev, dtype).requires_grad_()
            ww = w.to(dev, dtype).requires_grad_()
            loss = linear_cross_entropy(hh, ww, labels.to(dev), chunk_tokens=chunk,
                                        keep_logits=keep)
            (loss * go.to(dev, loss.dtype)).sum().backward()
            for name, a, bref in (("loss", loss, r[0]), ("grad_h", hh.grad, r[1]),
                                  ("grad_w", ww.grad, r[2])):
                err = ((a.double().cpu() - bref).abs().max() / bref.abs().max()).item()
                assert err < tol, (dtype, chunk, keep, name, err)


def test_fused_ce_kept_logits_cuda():
    """keep_logits at a Llama-like vocab slice (8192 tokens, H 1024, V 32000, bf16, perturbed
    data): the same loss and gradients as the recomputing path with one chunk of all tokens
    (the same GEMMs; logged whether bit-equal), and its backward makes the logit gradient in
    place: no second logits-sized buffer (peak growth in backward < half the logits)."""
    from framework.fast.fused_ce import linear_cross_entropy

    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(3)
    n, h, v = 8192, 1024, 32000
    hid = (torch.randn(n, 1, h, device=dev, generator=g)
           * torch.exp(0.3 * torch.randn(n, 1, 1, device=dev, generator=g))).bfloat16()
    w = (0.05 * torch.randn(v, h, device=dev, generator=g)).bfloat16()
    labels = torch.randint(0, v, (1, n), device=dev, generator=g)
    go = torch.rand(1, n, device=dev, generator=g) * (torch.rand(1, n, device=dev,
                                                                  generator=g) > 0.2)

    def run_once(**kw):
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, labels, **kw)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (loss * go).sum().backward()
        torch.cuda.synchronize()
        return loss.detach(), hh.grad, ww.grad, torch.cuda.max_memory_allocated() - before

    ref = run_once(chunk_tokens=n, keep_logits=False)
    got = run_once(chunk_tokens=1024, keep_logits=True)
    logits_bytes = n * v * 2
    line = [f"fused CE kept logits [{n}x{v}] vs one recomputed chunk:"]
    for name, a, b in zip(("loss", "grad_h", "grad_w"), got[:3], ref[:3]):
        rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        line.append(f"{name} rel {rel:.2e}{' (bit-equal)' if torch.equal(a, b) else ''}")
        assert rel < 1e-2, (name, rel)
    line.append(f"backward peak growth {got[3] / 2**20:.0f} MiB (kept) vs {ref[3] / 2**20:.0f} "
                f"MiB (recomputed), logits {logits_bytes / 2**20:.0f} MiB")
    log_parity("; ".join(line))
    assert got[3] < 0.5 * logits_bytes, (got[3], logits_bytes)


def test_foreach_kernels_match_mcore_local_cuda():
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    from framework.fast import multi_tensor as mt

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(sz, generator=g).to(dev) for sz in [(1280, 1280), (5120,), (3, 7), (1,)]]
    flag = torch.zeros(1, dtype=torch.int, device=dev)
    ours, per = mt.foreach_l2norm(0, flag, [ts], True)
    ref, _ = local_multi_tensor_l2_norm(0, flag, [ts], True)  # mcore's has no per-tensor part
    assert torch.allclose(ours.float().cpu(), ref.float().reshape(-1).cpu(), rtol=1e-5)
    assert torch.allclose(per.cpu(), torch.stack([t.norm() for t in ts]).float().cpu(),
                          rtol=1e-5)
    dst_ours = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    dst_ref = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    mt.foreach_scale(0, flag, [ts, dst_ours], 0.37)
    local_multi_tensor_scale(0, flag, [ts, dst_ref], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(dst_ours, dst_ref))


def test_fused_adamw_step_matches_foreach_cuda():
    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(sz, generator=g) for sz in [(64, 32), (32,), (7, 3)]]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(5)]
    out = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(t.clone().to(dev)) for t in init]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused or None,
                                foreach=not fused)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.to(dev)
            opt.step()
        out[fused] = [p.detach().cpu() for p in ps]
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


STEPS = 200
COMMON = ["model=gpt_tiny", "data=embedded", f"train.max_steps={STEPS}", "train.log_interval=1",
          "train.eval_interval=0", "train.global_batch_size=32", "train.micro_batch_size=8",
          "train.progress_bar=false", "optimizer.lr_warmup_steps=10", "train.bf16=true",
          "parallel=single", "parallel.data_parallel_size=1"]
FAST = ["model.fused_cross_entropy=true"]  # with the defaults: SDPA, fused optimizer step
REFERENCE = ["model.attention_backend=local", "optimizer.fused_step=false",
             "model.fused_cross_entropy=false", "model.fused_wgrad=false",
             "model.fused_norm=false", "model.fused_bias_add=false",
             "train.defer_step_stats=false"]


def _train(d, name, *overrides):
    return run_train(*COMMON, f"checkpoint.dir={pathlib.Path(d) / name}/ckpt", *overrides,
                     cwd=d, name=f"{name}/out", fast=False, timeout=900,
                     env=dict(os.environ, CUDA_VISIBLE_DEVICES="0")).losses


def test_fast_path_200_step_curve_matches_reference_bf16(tmp_path):
    """200 bf16 steps of the fast path (SDPA, fused CE, fused optimizer step) against the
    reference path (mcore's local attention and CE, foreach optimizer), both anchored to an fp32
    run of the reference path from the same checkpoint.

    bf16 runs drift apart step by step (kernels round differently and the differences compound),
    so a fixed per-step or per-window tolerance measures that drift, not the fast path: two
    GPU runs saw one step 15% apart, and 10-step means up to 3.1% apart while the last 50 steps'
    means were within 0.9%. The test asks instead that the fast path stays as close to the fp32
    curve as the reference bf16 path does (mean absolute relative deviation over all steps, within
    2x plus 0.5%), that it ends where the reference ends (last 50 steps' mean within 2%), and that
    it learns. A fast-path bug that changes the optimisation shows as a systematic gap to fp32.
    """
    seed = shared_once("fast_seed", lambda d: _train_seed(d))
    ref = _train(tmp_path, "reference", seed, *REFERENCE)
    fast = _train(tmp_path, "fast", seed, *FAST)
    fp32 = _train(tmp_path, "fp32", seed, *REFERENCE, "train.bf16=false")
    assert len(ref) == STEPS and sorted(fast) == sorted(ref) == sorted(fp32)

    def dev(run):  # mean |run - fp32| / fp32 over the steps
        return sum(abs(run[s] - fp32[s]) / fp32[s] for s in fp32) / len(fp32)

    def tail(run):
        return sum(run[s] for s in range(STEPS - 49, STEPS + 1)) / 50

    d_fast, d_ref = dev(fast), dev(ref)
    t_fast, t_ref = tail(fast), tail(ref)
    line = (f"fast path vs reference path, bf16, {STEPS} steps, both vs fp32 reference: mean rel "
            f"deviation fast {d_fast:.2e}, reference {d_ref:.2e} (tol 2x + 5e-3); last-50 mean "
            f"{t_fast:.4f} fast vs {t_ref:.4f} reference (rel {abs(t_fast - t_ref) / t_ref:.2e}, "
            f"tol 2e-2), fp32 {tail(fp32):.4f}; loss {ref[1]:.4f}->{ref[STEPS]:.4f} reference")
    log_parity(line)
    assert d_fast <= 2 * d_ref + 5e-3, line
    assert abs(t_fast - t_ref) / t_ref <= 2e-2, line
    assert ref[STEPS] < ref[1] - 0.5  # it learns


def _train_seed(d, *overrides):
    run_train(*COMMON, *overrides, "train.max_steps=0", f"checkpoint.dir={d}/ckpt", cwd=d,
              name="out", fast=False, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    perturb_checkpoint(f"{d}/ckpt")  # non-zero biases, non-unit norms: tests/perturb.py
    return f"checkpoint.load={d}/ckpt"


@pytest.mark.parametrize("defer, workers", [(True, 0), (False, 0), (True, 2)])
def test_train_steps_never_wait_for_the_gpu(tmp_path, defer, workers):
    """With train.defer_step_stats and data.pin_memory (the defaults) a train step makes no
    host-device synchronisation between log steps, so the host runs ahead and the GPU never idles
    waiting for it: no synchronising call, and every batch is page-locked (a copy from pageable
    memory waits for the GPU's queued work, unseen by CUDA's sync debug mode). With both off, the
    control case, the synchronising calls and the pageable batches are found (so the check works).
    With loader workers torch's DataLoader pins the batches."""
    r = run(os.path.join(ROOT, "tests", "gpu_sync_check.py"),
            "model=gpt_tiny", "data=embedded", "train.max_steps=12",
            "train.log_interval=6", "train.eval_interval=0", "train.bf16=true",
            "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.progress_bar=false", "checkpoint.save=false",
            f"train.defer_step_stats={str(defer).lower()}",
            *([] if defer else ["data.pin_memory=false"]), f"data.num_workers={workers}",
            "parallel=single", "parallel.data_parallel_size=1",
            f"checkpoint.dir={tmp_path}/ckpt", f"hydra.run.dir={tmp_path}/out",
            cwd=tmp_path, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    summary = r.stdout[r.stdout.index("SYNC CHECK:"):]
    assert "SYNC CHECK: 10 steps checked" in summary, summary[-4000:]
    log_parity(f"sync check, defer_step_stats={defer}, workers={workers}: {summary}")
    n_sync = int(summary.split(",")[1].split()[0])
    pin = summary[summary.index("PIN CHECK:"):].split()
    pinned, pageable = int(pin[2]), int(pin[4])
    if defer:
        assert n_sync == 0, summary[-6000:]
        assert pinned > 0 and pageable == 0, summary[-3000:]
    else:  # ("20 synchronisations" contains "0 synchronisations": compare the number)
        assert n_sync > 0, summary[-3000:]
        assert pageable > 0 and pinned == 0, summary[-3000:]


def test_fused_wgrad_matches_separate_add_cuda():
    """model.fused_wgrad: AddmmWgrad accumulates grad_output^T @ input into an fp32 main grad at
    least as accurately as mcore's bf16 GEMM + fp32 add."""
    from framework.mcore_patches import AddmmWgrad

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8192, 1280, device="cuda", generator=g).bfloat16()
    dy = torch.randn(8192, 3840, device="cuda", generator=g).bfloat16()
    start = torch.randn(3840, 1280, device="cuda", generator=g)
    ref = start.double() + dy.double().t() @ x.double()
    fused = start.clone()
    AddmmWgrad.wgrad_gemm_accum_fp32(x, dy, fused)
    separate = start.clone()
    separate.add_(dy.t() @ x)
    err_f = float((fused.double() - ref).norm() / ref.norm())
    err_s = float((separate.double() - ref).norm() / ref.norm())
    log_parity(f"fused wgrad rel err {err_f:.2e} (bf16 GEMM + add {err_s:.2e})")
    assert err_f <= err_s * 1.01 + 1e-7


def _assert_trains_alike(ref, fast, label):
    """20-step loss curves of a reference and a fast run from the same weights: the same steps,
    the same losses within bf16 noise (1%), and the fast run learns."""
    worst = max(abs(fast[s] - ref[s]) / ref[s] for s in ref)
    log_parity(f"{label}, 20 bf16 steps: worst rel loss diff {worst:.2e}; "
               f"{ref[1]:.4f}->{ref[20]:.4f} reference, {fast[1]:.4f}->{fast[20]:.4f} fast")
    assert sorted(fast) == sorted(ref) == list(range(1, 21))
    assert worst < 1e-2
    assert fast[20] < fast[1] - 0.3


def test_fused_wgrad_trains_like_the_unfused_path(tmp_path):
    """20 bf16 steps with model.fused_wgrad on (the default) and off, from the same weights: the
    same losses within bf16 noise (1%), and both learn."""
    seed = shared_once("fast_seed", lambda d: _train_seed(d))
    common = [seed, "train.max_steps=20"]
    off = _train(tmp_path, "off", *common, "model.fused_wgrad=false")
    on = _train(tmp_path, "on", *common, "model.fused_wgrad=true")
    _assert_trains_alike(off, on, "fused_wgrad on vs off")


@pytest.mark.parametrize("position", ["rope", "alibi", "learned_absolute"])
def test_fast_attention_kernels_train_like_the_reference(tmp_path, position):
    """20 bf16 steps from the same weights with the default GPU kernels for RoPE (our fused
    Triton RoPE) and ALiBi (cuDNN's ALiBi mask at TP1), and plain causal attention through the
    cuDNN frontend (model.cudnn_attention=true),
    against the reference kernels (mcore's unfused RoPE, the dense ALiBi bias, torch SDPA):
    the same losses within bf16 noise (1%), and both learn. Skipped without the cuDNN frontend
    for the cuDNN cases."""
    from framework.fast import cudnn_attention

    if position != "rope" and not cudnn_attention.available():
        pytest.skip("nvidia-cudnn-frontend is not installed")
    seed = shared_once(f"seed_{position}", lambda d: _train_seed(
        d, f"model.position_embedding_type={position}"))
    common = [seed, "train.max_steps=20", f"model.position_embedding_type={position}"]
    ref = _train(tmp_path, "ref", *common, "model.rope_fusion=false",
                 "model.cudnn_attention=false", "model.alibi_kernel=dense")
    # plain causal attention takes cuDNN only when asked (the default is torch SDPA)
    fast = _train(tmp_path, "fast", *common,
                  *(["model.cudnn_attention=true"] if position == "learned_absolute" else []))
    _assert_trains_alike(ref, fast, f"{position}: default kernels vs reference kernels")


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_matches_float64_cuda(rms, dtype):
    """framework/fast/norm.py's Triton LayerNorm / RMSNorm (`model.fused_norm`): outputs and the
    input, weight and bias grads at least as close to float64 as torch's native kernels (within
    1.5x + a small floor), for gpt2-large's width over 24576 tokens (weight grads summed over
    512 programs' partials), an odd width, and a non-contiguous input."""
    import torch.nn.functional as F

    from framework.fast.norm import fused_norm, supported

    g = torch.Generator(device="cuda").manual_seed(3)
    for shape in ((1024, 24, 1280), (100, 7, 200)):
        n = shape[-1]
        base = torch.randn(*shape[:-1], 2 * n, device="cuda", generator=g) * 2 + 0.5
        x0 = base[..., :n] if shape[0] == 100 else base[..., :n].contiguous()  # strided case
        w0 = 1 + 0.3 * torch.randn(n, device="cuda", generator=g)
        b0 = 0.1 * torch.randn(n, device="cuda", generator=g)
        dy = torch.randn(shape, device="cuda", generator=g)

        def run(fn, dt):
            # fresh leaves each run (.to() of the same dtype would hand back x0 itself)
            x = x0.detach().to(dt).clone().requires_grad_()
            w = w0.detach().to(dt).clone().requires_grad_()
            b = None if rms else b0.detach().to(dt).clone().requires_grad_()
            y = fn(x, w, b)
            y.backward(dy.to(dt))
            return [y, x.grad, w.grad] + ([] if rms else [b.grad])

        def native(x, w, b):
            return F.rms_norm(x, (n,), w, 1e-5) if rms else F.layer_norm(x, (n,), w, b, 1e-5)

        assert supported(x0.to(dtype))
        ref = run(native, torch.float64)
        got = run(lambda x, w, b: fused_norm(x, w, b, 1e-5, rms), dtype)
        tor = run(native, dtype)
        for name, a, t, r in zip(("y", "dx", "dw", "db"), got, tor, ref):
            assert a.dtype == dtype and a.shape == r.shape
            e_a = float((a.double() - r).norm() / r.norm())
            e_t = float((t.double() - r).norm() / r.norm())
            log_parity(f"fused_norm rms={rms} {dtype} {tuple(shape)} {name}: rel err {e_a:.2e} "
                       f"(torch native {e_t:.2e})")
            assert e_a <= 1.5 * e_t + (1e-6 if dtype == torch.float32 else 1e-3), (name, e_a, e_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_add_is_torchs_add_cuda(dtype):
    """framework/fast/bias.py (`model.fused_bias_add`): bit-identical to torch's broadcast add,
    gradient passed through, bias gradient a row sum; also inside mcore's ColumnParallelLinear
    (BiasAddLinear) against mcore's own bias add."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core.tensor_parallel import ColumnParallelLinear

    from framework.fast.bias import bias_add
    from framework.models.layers import BiasAddLinear

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(64, 3, 3840, device="cuda", generator=g).to(dtype).requires_grad_()
    b = torch.randn(3840, device="cuda", generator=g).to(dtype).requires_grad_()
    y = bias_add(x, b)
    assert torch.equal(y, x.detach() + b.detach())
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, dy)
    torch.testing.assert_close(b.grad.float(), dy.float().sum((0, 1)), rtol=1e-2, atol=1e-1)

    from test_attention_variants import model_parallel, world

    with world(), model_parallel(1):
        _bias_add_linear_matches_mcore(dtype, BiasAddLinear, ColumnParallelLinear,
                                       TransformerConfig)


def _bias_add_linear_matches_mcore(dtype, BiasAddLinear, ColumnParallelLinear, TransformerConfig):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    ref = ColumnParallelLinear(256, 768, config=cfg, init_method=torch.nn.init.normal_,
                               bias=True, gather_output=False).cuda()
    ours = BiasAddLinear(256, 768, config=cfg, init_method=torch.nn.init.normal_, bias=True,
                         gather_output=False).cuda()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ours.bias.normal_()
        ref.bias.copy_(ours.bias)
    inp = torch.randn(16, 2, 256, device="cuda", dtype=dtype)
    (o1, b1), (o2, b2) = ref(inp), ours(inp)
    assert b1 is None and b2 is None and torch.equal(o1, o2)


def test_fused_norm_and_bias_add_train_like_torch(tmp_path):
    """20 bf16 steps from the same weights with the Triton norm and bias add (the defaults)
    against torch's kernels (`model.fused_norm=false model.fused_bias_add=false`): the same losses
    within bf16 noise (1%), and both learn."""
    seed = shared_once("fast_seed", lambda d: _train_seed(d))
    common = [seed, "train.max_steps=20"]
    ref = _train(tmp_path, "torch", *common, "model.fused_norm=false",
                 "model.fused_bias_add=false")
    fast = _train(tmp_path, "triton", *common)
    _assert_trains_alike(ref, fast, "fused_norm + fused_bias_add vs torch kernels")
