"""A model family is one folder plus one registration: a toy family defined here (the package
does not ship it) registers through its `ModelSpec` and trains on CPU through the real entry
point, `framework.run(cfg)`: plan, in-process worker, model, data, train step, checkpoint.

The toy is what a new family's folder would hold: a builder (megatron-core's GPTModel on the
shared layer spec, causal, no position table), its own train step (the loss over every token,
ignoring loss_mask), a config check, its FLOP formula and its data needs (the causal-LM
datasets).
"""
import json
from functools import partial

import pytest
import torch

from framework.config import CheckpointConfig, Config, ConfigError, DataConfig, ModelConfig, \
    OptimizerConfig, ParallelConfig, TrainConfig
from framework.errors import require
from framework.models import registry
from framework.models.spec import ModelParts, ModelSpec, dense_flops_per_token

CALLS = {"forward_step": 0, "build": 0, "flops": 0}


# --------------------------------------------------------------------------------------------
# the toy family: what framework/models/toy/ would hold
# --------------------------------------------------------------------------------------------
def check_toy(m) -> None:
    require(m.position_embedding_type == "none",
            f"model.position_embedding_type={m.position_embedding_type}: the toy family has no "
            f"position table (use none)")


def toy_flops(m, vocab: int) -> float:
    CALLS["flops"] += 1
    return dense_flops_per_token(m, vocab)


def build_toy(model, tcfg, *, vocab_size, pre_process, post_process, vp_stage):
    from megatron.core.models.gpt import GPTModel

    from framework.models.transformer import block_spec, lm_kwargs

    CALLS["build"] += 1
    return GPTModel(config=tcfg, transformer_layer_spec=block_spec(model, tcfg, vp_stage),
                    **lm_kwargs(model, vocab_size=vocab_size, pre_process=pre_process,
                                post_process=post_process),
                    position_embedding_type="none", vp_stage=vp_stage)


def _toy_step_class():
    from framework.training.step import TrainStep

    class ToyTrainStep(TrainStep):
        """Next-token cross-entropy averaged over every token (loss_mask ignored)."""

        def forward_step(self, data_iterator, model):
            CALLS["forward_step"] += 1
            batch = self.get_batch(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            return output, partial(self.loss_func, torch.ones_like(batch["loss_mask"]))

    return ToyTrainStep


def load_toy() -> ModelParts:
    from framework.models.gpt.data import datasets
    from framework.tokenizer import embedded_tokenizer

    return ModelParts(build=build_toy, train_step=_toy_step_class(), datasets=datasets,
                      embedded_tokenizer=embedded_tokenizer)


TOY = ModelSpec(name="toy", title="Toy", load=load_toy, position_embeddings=("none", "rope"),
                check_model=check_toy, flops_per_token=toy_flops)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "toy", TOY)  # registry.register(TOY), undone after
    return TOY


def _toy_model(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(name="toy_tiny", type="toy", num_layers=2, hidden_size=32,
                                 num_attention_heads=4, seq_length=32,
                                 position_embedding_type="none", hidden_dropout=0.0,
                                 attention_dropout=0.0), **kw})


# --------------------------------------------------------------------------------------------
def test_an_unregistered_family_is_refused():
    with pytest.raises(ConfigError, match=r"model.type='toy' is not one of \['bert', 'gpt'"):
        _toy_model()


def test_the_registered_family_checks_its_config(toy):
    assert _toy_model().fused_cross_entropy is False  # a GPT option: off for the toy
    with pytest.raises(ConfigError, match="the toy family has no position table"):
        _toy_model(position_embedding_type="rope")
    with pytest.raises(ConfigError, match="position_embedding_type=alibi is not supported for "
                                          "model.type=toy"):
        _toy_model(position_embedding_type="alibi")
    with pytest.raises(ConfigError, match=r"model.add_binary_head=true is a BERT option "
                                          r"\(model.type=toy\)"):
        _toy_model(add_binary_head=True)
    with pytest.raises(ConfigError, match="train.fp8 is supported for model.type=gpt"):
        Config(model=_toy_model(hidden_size=64), train=TrainConfig(fp8="tensorwise"))


def test_the_toy_family_trains_through_framework_run(toy, tmp_path):
    import framework

    cfg = Config(
        model=_toy_model(),
        parallel=ParallelConfig(),
        optimizer=OptimizerConfig(lr=1e-2, lr_warmup_steps=0),
        data=DataConfig(type="embedded", num_documents=200, path_to_cache=str(tmp_path / "data")),
        train=TrainConfig(max_steps=3, micro_batch_size=2, global_batch_size=4, eval_interval=0,
                          log_interval=1, device="cpu", progress_bar=False),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), save_interval=3),
        run_dir=str(tmp_path / "run"))
    CALLS.update(forward_step=0, build=0, flops=0)
    framework.run(cfg)
    assert CALLS["build"] == 1 and CALLS["flops"] == 1
    assert CALLS["forward_step"] == 3 * 2  # 3 steps x 2 micro-batches: the toy's own step
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses
    meta = json.loads((tmp_path / "ckpt" / "iter_0000003" / "framework.json").read_text())
    assert meta["config"]["model"]["type"] == "toy"


def test_train_mfu_counts_the_same_flops_as_the_benchmarks():
    """train.py's MFU (the family's FLOPs per token) and benchmarks/shapes.py's count agree on
    Llama, Qwen2 and GPT-2 presets (they differed by ~14% on Llama 3.2 1B: SwiGLU's third
    matrix and GQA were not counted), and GPT-2 shapes still get Megatron's formula."""
    from benchmarks import shapes
    from framework.models.registry import family
    from framework.models.spec import flops_per_token
    from tests.test_config import load

    for preset, shape in [("llama3_2_1b", "llama3_1b"), ("qwen2_5_1_5b", "qwen2_5_1_5b"),
                          ("gpt2_large", "gpt2_large")]:
        cfg = load(f"model={preset}", "train.device=cpu")
        sh = shapes.get_shape(shape)
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.seq_length) == (sh.layers, sh.hidden, sh.seq)
        got = family("gpt").flops_per_token(m, sh.vocab)
        assert got == pytest.approx(sh.flops_per_token(), rel=1e-12), preset
    gpt2 = load("model=gpt2_large", "train.device=cpu").model
    assert family("gpt").flops_per_token(gpt2, 50304) == pytest.approx(
        flops_per_token(gpt2.num_layers, gpt2.hidden_size, gpt2.seq_length, 50304), rel=1e-12)
