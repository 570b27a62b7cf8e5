"""The real `python train.py` on CPU: loss falls, checkpoints, resume, TP1 == TP2 (gloo)."""
import json

from helpers import run_train
from perturb import perturb_checkpoint


def test_default_run_learns_checkpoints_and_resumes(tmp_path):
    r = run_train("train.max_steps=40", "train.eval_interval=20", "checkpoint.save_interval=20",
                  cwd=tmp_path)
    recs, l = r.records, r.losses
    assert l[40] < l[1] - 0.5, l
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mfu"):
        assert key in recs[0]
    ckpts = list((tmp_path / "checkpoints").iterdir())
    assert len(ckpts) == 1  # the default dir for a run with no computation-changing overrides
    ckpt = ckpts[0]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "40"
    meta = json.loads((ckpt / "iter_0000040" / "framework.json").read_text())
    assert meta["config"]["model"]["name"] == "gpt_tiny" and "torch" in meta["versions"]
    assert (ckpt / "iter_0000040" / "tokenizer").is_dir()
    # the same command again resumes at the right step
    r2 = run_train("train.max_steps=44", "train.eval_interval=20", "checkpoint.save_interval=20",
                   cwd=tmp_path, name="run2")
    assert "resumed from" in r2.stdout and "step 40" in r2.stdout
    assert sorted(r2.losses) == [41, 42, 43, 44]


def test_resume_is_bit_identical(tmp_path):
    common = ["train.eval_interval=0", "checkpoint.save_interval=4", "optimizer.lr_decay_steps=8",
              "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
    full = run_train("train.max_steps=8", f"checkpoint.dir={tmp_path}/a", *common, cwd=tmp_path,
                     name="full")
    run_train("train.max_steps=4", f"checkpoint.dir={tmp_path}/b", *common, cwd=tmp_path,
              name="half")
    rest = run_train("train.max_steps=8", f"checkpoint.dir={tmp_path}/b", *common, cwd=tmp_path,
                     name="rest")
    assert "resumed" in rest.stdout
    lf, lr = full.losses, rest.losses
    assert sorted(lr) == [5, 6, 7, 8]
    assert [lf[s] for s in lr] == [lr[s] for s in sorted(lr)]  # exact, with dropout on


def _perturbed_seed(tmp_path):
    """A seed checkpoint (train.max_steps=0) with every model tensor perturbed (non-zero biases,
    non-unit norms: tests/perturb.py); returns the override that loads it."""
    run_train("train.max_steps=0", f"checkpoint.dir={tmp_path}/seed", cwd=tmp_path, name="seed")
    assert (tmp_path / "seed" / "latest_checkpointed_iteration.txt").read_text() == "0"
    perturb_checkpoint(str(tmp_path / "seed"))
    return f"checkpoint.load={tmp_path}/seed"


def test_tp2_gloo_matches_tp1(tmp_path):
    """Both start from one perturbed seed checkpoint, loaded at TP1 and at TP2."""
    common = ["train.max_steps=5", "train.eval_interval=0", "checkpoint.save=false",
              _perturbed_seed(tmp_path)]
    a = run_train(*common, cwd=tmp_path, name="tp1").losses
    b = run_train(*common, "parallel=tp2", cwd=tmp_path, name="tp2").losses
    assert sorted(a) == sorted(b)
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])


def test_dp2_gloo_matches_dp1(tmp_path):
    """Both start from one perturbed seed checkpoint."""
    common = ["train.max_steps=4", "train.eval_interval=0", "checkpoint.save=false",
              _perturbed_seed(tmp_path)]
    a = run_train(*common, cwd=tmp_path, name="dp1").losses
    b = run_train(*common, "parallel.data_parallel_size=2", cwd=tmp_path, name="dp2").losses
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])


def test_null_global_batch_is_micro_batch_x_dp_and_a_resume_keeps_the_checkpoints(tmp_path):
    """train.global_batch_size null (the default) = micro-batch x DP; a resumed run with it null
    keeps the checkpoint's global batch where the layout can take it."""
    common = ["train.eval_interval=0", "train.micro_batch_size=4", "train.global_batch_size=null",
              f"checkpoint.dir={tmp_path}/c", "checkpoint.save_interval=2"]
    first = run_train("train.max_steps=2", "parallel.data_parallel_size=2", *common,
                      cwd=tmp_path, name="dp2")
    assert sorted(first.losses) == [1, 2]
    meta = json.loads((tmp_path / "c" / "iter_0000002" / "framework.json").read_text())
    assert meta["config"]["train"]["global_batch_size"] == 8 and meta["consumed_samples"] == 16
    rest = run_train("train.max_steps=4", *common, cwd=tmp_path, name="dp1")
    assert "resumed" in rest.stdout and "note: train.global_batch_size" not in rest.stdout
    meta = json.loads((tmp_path / "c" / "iter_0000004" / "framework.json").read_text())
    assert meta["config"]["train"]["global_batch_size"] == 8 and meta["consumed_samples"] == 32
