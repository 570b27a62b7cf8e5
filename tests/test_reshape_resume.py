"""Reshape acceptance for every model family through the real entry point (CPU, gloo):
train at TP2 and save, `data_tools.convert reshape --with-optimizer` to TP1, resume there with
`train.py`, and compare the resumed losses with the same run continued at TP2 without any
reshape. The layouts differ only in reduction order, so the losses agree to fp32 rounding."""
import pytest

from data_tools import convert
from helpers import run_train

STEPS, SAVE_AT = 6, 3


def _train(cwd, name, ckpt_dir, *overrides):
    r = run_train("train.eval_interval=0", "train.micro_batch_size=4",
                  "train.global_batch_size=8", f"train.max_steps={STEPS}",
                  "optimizer.lr_warmup_steps=1", f"checkpoint.dir={ckpt_dir}", *overrides,
                  cwd=cwd, name=name)
    return r.losses, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny", "t5_tiny"])
def test_reshape_with_optimizer_then_resume_matches(tmp_path, model):
    tp2 = ["parallel=tp2", "parallel.data_parallel_size=1"]
    # one TP2 run that saves at SAVE_AT and at the end; its SAVE_AT checkpoint is reshaped
    straight, _ = _train(tmp_path, "straight", tmp_path / "ck_tp2", f"model={model}", *tp2,
                         f"checkpoint.save_interval={SAVE_AT}")
    assert convert.main(["reshape", "--load", str(tmp_path / "ck_tp2" / f"iter_{SAVE_AT:07d}"),
                         "--save", str(tmp_path / "ck_tp1"), "--target-tp", "1",
                         "--target-pp", "1", "--with-optimizer"]) == 0
    resumed, out = _train(tmp_path, "resumed", tmp_path / "ck_tp1", f"model={model}",
                          "parallel=single", "parallel.data_parallel_size=1")
    assert f"resumed from {tmp_path / 'ck_tp1'}" in out and f"(step {SAVE_AT}," in out, out
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    worst = max(abs(resumed[s] - straight[s]) / straight[s] for s in resumed)
    assert worst < 1e-5, (model, worst, resumed, straight)
