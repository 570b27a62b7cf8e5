"""`data=random` (framework/data/gpt.py RandomTokens): uniformly random ids over the model's
vocabulary, the data the speed benchmarks train our side on (the baselines draw the same)."""
import torch

from framework.data.gpt import RandomTokens


def test_samples_are_seeded_per_index_and_uniform():
    ds = RandomTokens(1000, 64, 50, seed=3, split=0)
    again = RandomTokens(1000, 64, 50, seed=3, split=0)
    assert len(ds) == 1000
    a, b = ds[7], again[7]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same sample on every rank and on resume
    assert not torch.equal(ds[7]["tokens"], ds[8]["tokens"])
    assert not torch.equal(RandomTokens(10, 64, 50, seed=4)[7]["tokens"], a["tokens"])
    assert not torch.equal(RandomTokens(10, 64, 50, seed=3, split=1)[7]["tokens"], a["tokens"])
    # labels are the tokens shifted by one (one draw of seq + 1 ids)
    assert torch.equal(a["tokens"][1:], a["labels"][:-1])
    assert a["tokens"].dtype == torch.int64 and a["tokens"].shape == (64,)
    assert torch.equal(a["loss_mask"], torch.ones(64))
    assert torch.equal(a["position_ids"], torch.arange(64))
    ids = torch.cat([ds[i]["tokens"] for i in range(1000)])
    assert int(ids.min()) == 0 and int(ids.max()) == 49
    counts = torch.bincount(ids, minlength=50).float()
    expected = ids.numel() / 50
    # chi-square with 49 degrees of freedom: far below 100 for a uniform draw (p < 1e-4 above)
    assert float(((counts - expected) ** 2 / expected).sum()) < 100


def test_padding_sample_has_no_loss():
    s = RandomTokens(4, 16, 1000, seed=0)[None]
    assert float(s["loss_mask"].sum()) == 0.0 and s["tokens"].shape == (16,)


def test_train_py_on_random_tokens(tmp_path):
    """`python train.py data=random` trains on ids over the model's vocabulary (model.vocab_size
    here, beyond the tokenizer's 19): the loss starts near ln(vocab) and stays there (nothing
    to learn). With a fused-CE chunk of 8 tokens the losses are those of the default chunking,
    from the same perturbed weights (non-zero biases, non-unit norms)."""
    import math

    from helpers import run_train
    from perturb import perturb_checkpoint

    model = ("model=gpt_tiny", "data=random", "model.vocab_size=500")
    run_train(*model, "train.max_steps=0", f"checkpoint.dir={tmp_path}/seed", cwd=str(tmp_path),
              name="seed")
    perturb_checkpoint(f"{tmp_path}/seed")
    common = (*model, "train.max_steps=4", "train.eval_interval=0", "checkpoint.save=false",
              f"checkpoint.load={tmp_path}/seed")
    run = run_train(*common, cwd=str(tmp_path), name="a")
    losses = list(run.losses.values())
    assert len(losses) == 4
    assert all(abs(x - math.log(500)) < 0.3 for x in losses), losses
    chunked = run_train(*common, "model.fused_ce_chunk_tokens=8", cwd=str(tmp_path), name="b")
    for a, b in zip(losses, chunked.losses.values()):
        assert abs(a - b) <= 1e-5 * a, (losses, chunked.losses)
