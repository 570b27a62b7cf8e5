"""GPU suite for BERT and T5 (run with `pytest -m gpu`; 2 GPUs for the parallel layouts).

As tests/test_gpu_parallel.py does for GPT: each layout runs the real entry point on bert_tiny /
t5_tiny with the embedded (sentence-split) data from one seed checkpoint, logging every step, and
its per-step losses must match a single-GPU fp32 run of the same config to 2e-3 relative.
BERT: TP2, PP2 (1F1B), TP2+SP, DP2 + distributed optimizer. T5: TP2, TP2+SP, DP2 + distributed
optimizer, and TP2 with MQA (num_query_groups=1: KV heads replicated over TP, cross-attention
included). T5 has no pipeline parallelism (megatron-core 0.16 has no encoder-decoder schedule).
"""
import os

import pytest
import torch
from perturb import perturb_checkpoint
from gpu_shared import compare, shared_once
from helpers import run_train
STEPS = 30
COMMON = ["data=embedded", f"train.max_steps={STEPS}", "train.log_interval=1",
          "train.eval_interval=0", "train.global_batch_size=32", "train.micro_batch_size=4",
          "train.progress_bar=false", "optimizer.lr_warmup_steps=5", "train.bf16=false"]
MODELS = {"bert": ["model=bert_tiny"], "t5": ["model=t5_tiny"],
          "t5_mqa": ["model=t5_tiny", "model.num_query_groups=1"]}

pytestmark = pytest.mark.gpu


def train(tmp_path, name, model, *overrides, ngpu=1):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(ngpu)))
    return run_train(*MODELS[model], *COMMON, f"checkpoint.dir={tmp_path / name}/ckpt",
                     *overrides, cwd=tmp_path, name=f"{name}/out", fast=False, env=env).losses


def _reference(model):
    """A seed checkpoint (train.max_steps=0) and the single-GPU fp32 loss curve from it, built
    once per suite run (also across pytest-xdist workers)."""
    import pathlib

    def build(d):
        d = pathlib.Path(d)
        train(d, "seed", model, "train.max_steps=0", "parallel.data_parallel_size=1")
        perturb_checkpoint(f"{d}/seed/ckpt")  # non-zero biases, non-unit norms
        seed = f"checkpoint.load={d}/seed/ckpt"
        ref = train(d, "single", model, "parallel=single", "parallel.data_parallel_size=1", seed)
        return {"seed": seed, "ref": {str(k): v for k, v in ref.items()}}

    got = shared_once(f"bert_t5_ref_{model}", build)
    return got["seed"], {int(k): v for k, v in got["ref"].items()}


CASES = [
    ("bert", "tp2", ["parallel=tp2", "parallel.data_parallel_size=1"], 2),
    ("bert", "pp2_1f1b", ["parallel=pp2", "parallel.data_parallel_size=1"], 2),
    ("bert", "tp2_sp", ["parallel=tp2_sp", "parallel.data_parallel_size=1"], 2),
    ("bert", "dp2_distopt", ["parallel=dp_distopt", "parallel.data_parallel_size=2"], 2),
    ("t5", "tp2", ["parallel=tp2", "parallel.data_parallel_size=1"], 2),
    ("t5", "tp2_sp", ["parallel=tp2_sp", "parallel.data_parallel_size=1"], 2),
    ("t5", "dp2_distopt", ["parallel=dp_distopt", "parallel.data_parallel_size=2"], 2),
    ("t5_mqa", "tp2", ["parallel=tp2", "parallel.data_parallel_size=1"], 2),
    # model.torch_compile compiles the encoder stack's layers too (and T5's decoder)
    ("bert", "compile", ["parallel=single", "parallel.data_parallel_size=1",
                         "model.torch_compile=true"], 1),
    ("t5", "compile", ["parallel=single", "parallel.data_parallel_size=1",
                       "model.torch_compile=true"], 1),
]


@pytest.mark.parametrize("model,name,overrides,ngpu", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_layout_matches_single_gpu_fp32(tmp_path, model, name, overrides, ngpu):
    if torch.cuda.device_count() < ngpu:
        pytest.skip(f"needs {ngpu} GPUs")
    seed, ref = _reference(model)
    got = train(tmp_path, name, model, seed, *overrides, ngpu=ngpu)
    compare(ref, got, 2e-3, f"fp32 {model} {name} vs single")
