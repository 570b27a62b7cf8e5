"""Selective recompute of megatron-core's "layernorm" and "mlp" modules without Transformer Engine,
with GPT-2-style biased linears (CPU), and of our "mlp_act" (the MLP's activation output; CPU;
the bf16 GPU check of the fused bias-GeLU path is in tests/test_gpu_recompute.py)."""
import pytest
import torch

from framework.config import ConfigError, ModelConfig, ParallelConfig
from framework.patching import patched
from test_attention_variants import VOCAB, model_parallel, tiny, world
from perturb import perturb_


@pytest.fixture
def mp1():
    with world(), model_parallel(1):
        yield


def _cpu_rng_states(tp_random):
    """mcore saves and restores the CUDA RNG around a recompute; on CPU only the CPU RNG and
    the (CPU-seeded) tracker states exist."""
    def get():
        return torch.get_rng_state(), None, tp_random.get_cuda_rng_tracker().get_states()

    def set_(cpu, _cuda, tracker):
        torch.set_rng_state(cpu)
        tp_random.get_cuda_rng_tracker().set_states(tracker)

    return dict(_get_all_rng_states=get, _set_all_rng_states=set_)


def _loss_and_grads(parallel, **model_kw):
    """Loss and gradients of one forward/backward of a tiny GPT (seed 0) on fixed tokens."""
    from framework.models.build import build_model

    torch.manual_seed(0)
    model = build_model(tiny(**model_kw), parallel, vocab_size=VOCAB, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)[0]
    perturb_(model)  # non-zero biases, non-unit norms (tests/perturb.py)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    pos = torch.arange(16)[None].expand(2, 16)
    loss = model(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_layernorm_recompute_runs_without_te_and_matches(mp1):
    """recompute_modules=[layernorm] goes through mcore's CheckpointWithoutOutput, which without
    our fix raises NameError (FP8GlobalStateManager) when TE is absent. With it, loss and every
    gradient equal the run without recompute, and the norm outputs are really discarded."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    ref_loss, ref_grads = _loss_and_grads(ParallelConfig())  # build_model installs the fix
    discarded = []
    base_discard = tensor_parallel.CheckpointWithoutOutput.discard_output_and_register_recompute

    def spy(self, hook_tensor):
        base_discard(self, hook_tensor)
        discarded.extend(o.untyped_storage().size() for o in self.outputs)

    with patched(tp_random, **_cpu_rng_states(tp_random)):
        par = ParallelConfig(recompute_granularity="selective", recompute_modules=["layernorm"])
        assert tensor_parallel.CheckpointWithoutOutput().fp8 is False
        with patched(tensor_parallel.CheckpointWithoutOutput,
                     discard_output_and_register_recompute=spy):
            loss, grads = _loss_and_grads(par)
    assert discarded and all(size == 0 for size in discarded)  # 2 norms x 2 layers freed
    assert loss == ref_loss
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.timeout(240, method="thread")  # the mcore bug below never returns: fail, not hang
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_recompute_with_biases_terminates_and_matches(mp1, bias):
    """recompute_modules=[mlp]: mcore 0.16 with add_bias_linear re-enters its checkpoint Function
    without end (framework.models.layers.MLP). Loss and gradients equal the run without it."""
    from megatron.core.tensor_parallel import random as tp_random

    ref_loss, ref_grads = _loss_and_grads(ParallelConfig(), add_bias_linear=bias)
    with patched(tp_random, **_cpu_rng_states(tp_random)):
        loss, grads = _loss_and_grads(ParallelConfig(recompute_granularity="selective",
                                                     recompute_modules=["mlp"]),
                                      add_bias_linear=bias)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------
# "mlp_act": the MLP's activation output recomputed before fc2's backward (ours)
# --------------------------------------------------------------------------------------------
MLP_ACT = ParallelConfig(recompute_granularity="selective", recompute_modules=["mlp_act"])


def _train_steps(parallel, steps=3, device="cpu", bf16=False, perturb=None, **model_kw):
    """Losses and every step's gradients of `steps` plain SGD steps of a tiny GPT (seed 0);
    `perturb`: a seed to perturb every parameter with first (tests/perturb.py)."""
    from framework.models.build import build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    if dev.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    model = build_model(tiny(**model_kw), parallel, vocab_size=VOCAB, bf16=bf16, fp16=False,
                        device=dev, wrap_ddp=False)[0]
    if perturb is not None:
        from perturb import assert_perturbed, perturb_

        perturb_(model, seed=perturb)
        assert_perturbed(model)
    g = torch.Generator().manual_seed(3)
    losses, grads = [], []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (2, 16), generator=g).to(dev)
        pos = torch.arange(16, device=dev)[None].expand(2, 16)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return losses, grads


def _counting(cls, name, counter):
    """`cls.name` wrapped to count its calls in `counter[name]`."""
    base = getattr(cls, name)

    def wrapper(*args, **kwargs):
        counter[name] = counter.get(name, 0) + 1
        return base(*args, **kwargs)

    return {name: wrapper}


@pytest.mark.parametrize("activation,bias,extra,dropout", [
    ("gelu", True, [], 0.0),
    ("gelu_tanh", False, [], 0.0),
    ("swiglu", True, [], 0.0),
    ("relu", False, [], 0.0),
    ("gelu", True, ["layernorm"], 0.1),  # with norm recompute and hidden dropout
])
def test_mlp_act_recompute_matches_training(mp1, activation, bias, extra, dropout):
    """recompute_modules=[mlp_act]: three SGD steps from perturbed weights give exactly the
    losses and gradients of the run without recompute, and the activation really is discarded
    and recomputed each step."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    # every parameter perturbed (tests/perturb.py): fc1's bias, which the recompute adds
    # again before the activation, starts non-zero
    kw = dict(activation=activation, add_bias_linear=bias, hidden_dropout=dropout, perturb=5)
    ref_losses, ref_grads = _train_steps(ParallelConfig(), **kw)  # no recompute
    calls = {}
    cwo = tensor_parallel.CheckpointWithoutOutput  # _recompute: mcore's, also after the fix
    with patched(tp_random, **_cpu_rng_states(tp_random)), \
            patched(cwo, **_counting(cwo, "_recompute", calls)):
        losses, grads = _train_steps(ParallelConfig(recompute_granularity="selective",
                                                    recompute_modules=["mlp_act", *extra]), **kw)
    # 2 layers x 3 steps (+ 2 norms per layer with layernorm)
    assert calls["_recompute"] == 6 * (1 + 2 * bool(extra))
    assert losses == ref_losses
    for step, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert torch.equal(got[name], g), (step, name)


def _saved_bytes(mlp, x):
    """Bytes of the distinct activation storages autograd holds for backward after `mlp(x)`
    (parameters, held anyway, left out), and the output. Storages the forward already freed
    (size 0) count nothing."""
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, bias = mlp(x)
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()), (out, bias)


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_tanh", False),
                                             ("swiglu", True)])
def test_mlp_act_does_not_keep_the_activation(mp1, activation, bias):
    """The bytes autograd keeps for one MLP's backward drop by at least the activation output
    [s, b, ffn] with mlp_act, and the backward (which refills it) gives the same gradients."""
    from megatron.core.tensor_parallel import random as tp_random

    from framework.models.build import build_model
    from framework.models.layers import ActRecomputeMLP

    torch.manual_seed(0)
    cfg = tiny(activation=activation, add_bias_linear=bias)
    model = build_model(cfg, MLP_ACT, vocab_size=VOCAB, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)[0].train()
    perturb_(model)  # non-zero biases, non-unit norms (tests/perturb.py)
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, ActRecomputeMLP) and mlp.recompute_act
    s, b, ffn = 16, 2, cfg.ffn
    x = torch.randn(s, b, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    w = torch.randn(s, b, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    results = {}
    for on in (False, True):
        mlp.recompute_act = on
        xi = x.clone().requires_grad_()
        mlp.zero_grad(set_to_none=True)
        with patched(tp_random, **_cpu_rng_states(tp_random)):
            nbytes, (out, ob) = _saved_bytes(mlp, xi)
            ((out if ob is None else out + ob) * w).sum().backward()
        results[on] = nbytes, out.detach(), xi.grad, {n: p.grad for n, p in
                                                      mlp.named_parameters()}
    act_bytes = s * b * ffn * 4  # fp32 activation output, [s, b, ffn]
    assert results[False][0] - results[True][0] >= act_bytes, (results[False][0],
                                                               results[True][0], act_bytes)
    assert torch.equal(results[False][1], results[True][1])
    assert torch.equal(results[False][2], results[True][2])
    for name, g in results[False][3].items():
        assert torch.equal(results[True][3][name], g), name


def test_mlp_act_is_off_outside_training(mp1):
    """In eval mode or without grad the MLP runs mcore's forward: nothing to recompute."""
    from framework.models.build import build_model

    torch.manual_seed(0)
    model = build_model(tiny(), MLP_ACT, vocab_size=VOCAB, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)[0]
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(4, 2, 32)
    mlp.eval()
    n_eval, _ = _saved_bytes(mlp, x.clone().requires_grad_())
    mlp.recompute_act = False
    n_ref, _ = _saved_bytes(mlp, x.clone().requires_grad_())
    assert n_eval == n_ref > 0


@pytest.mark.parametrize("modules,mcore_granularity,mcore_modules,flag", [
    (["mlp_act"], None, None, True),
    (["mlp_act", "layernorm"], "selective", ["layernorm"], True),
    (["mlp", "mlp_act"], "selective", ["mlp"], False),  # the whole MLP is recomputed anyway
    (["core_attn"], "selective", ["core_attn"], False),
])
def test_mlp_act_config_mapping(modules, mcore_granularity, mcore_modules, flag):
    """mcore sees the modules it knows (it rejects "mlp_act"); our MLP gets the flag."""
    from framework.models.transformer import transformer_config

    tcfg = transformer_config(tiny(), ParallelConfig(recompute_granularity="selective",
                                                     recompute_modules=modules),
                              bf16=False, fp16=False, on_gpu=False)
    assert tcfg.recompute_granularity == mcore_granularity
    if mcore_modules is not None:
        assert tcfg.recompute_modules == mcore_modules
    assert tcfg.recompute_mlp_act is flag
    # without selective granularity the list means nothing
    off = transformer_config(tiny(), ParallelConfig(recompute_modules=modules), bf16=False,
                             fp16=False, on_gpu=False)
    assert off.recompute_granularity is None and off.recompute_mlp_act is False


@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_mlp_act_reaches_bert_and_t5(mp1, model_type):
    """BERT and T5 layers (GPT's layer spec) get the recomputing MLP too, encoder and decoder."""
    from framework.models.build import build_model
    from framework.models.layers import ActRecomputeMLP

    kw = dict(type=model_type, num_layers=2, hidden_size=32, num_attention_heads=4,
              seq_length=32)
    if model_type == "t5":
        kw.update(encoder_num_layers=2, decoder_seq_length=16, position_embedding_type="relative")
    model = build_model(ModelConfig(**kw), MLP_ACT, vocab_size=VOCAB, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)[0]
    mlps = [m for m in model.modules() if isinstance(m, ActRecomputeMLP)]
    assert len(mlps) == (4 if model_type == "t5" else 2)
    assert all(m.recompute_act for m in mlps)


def test_recompute_modules_unknown_name_is_one_line():
    """An unknown module name fails at config time with one line naming the field and the name;
    mlp_act alone or with mcore's modules composes."""
    from tests.test_config import load

    with pytest.raises(ConfigError) as e:
        ParallelConfig(recompute_granularity="selective", recompute_modules=["mlp_act", "mpl"])
    msg = str(e.value)
    assert "\n" not in msg and "parallel.recompute_modules" in msg and "'mpl'" in msg, msg
    assert "mlp_act" in msg  # the allowed names are listed
    with pytest.raises(Exception) as e:
        load("parallel.recompute_granularity=selective", "parallel.recompute_modules=[moe_act]")
    err = e.value
    while not isinstance(err, ConfigError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    assert isinstance(err, ConfigError) and "parallel.recompute_modules" in str(err), repr(e.value)
    cfg = load("parallel.recompute_granularity=selective",
               "parallel.recompute_modules=[mlp_act,layernorm]")
    assert cfg.parallel.recompute_modules == ["mlp_act", "layernorm"]
