"""The parity tests' perturbation (tests/perturb.py) must leave nothing that hides a bug: no entry
that stays exactly zero, and no tied weight whose two copies end up different."""
import torch

from perturb import WEIGHT_JITTER, _perturbed, perturb_


def test_zero_rows_get_an_absolute_jitter_and_other_entries_keep_the_relative_one():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(8, 4, padding_idx=0)  # row 0 starts exactly zero, as in HF BERT
    assert emb.weight[0].abs().max() == 0
    before = emb.weight.detach().clone()
    perturb_(emb, seed=1)
    after = emb.weight.detach()
    assert (after[0] != 0).all(), "a zero row stayed zero"
    # the absolute jitter is on the scale of the other entries, not of the norms or biases
    assert after[0].abs().max() < before[1:].abs().mean() * WEIGHT_JITTER * 6
    rel = (after[1:] - before[1:]) / before[1:]
    assert rel.abs().max() < WEIGHT_JITTER * 6 and rel.abs().max() > 0

    # the checkpoint rewrite does the same for a checkpoint tensor
    t = torch.zeros(3, 4)
    t[1] = 0.5
    out = _perturbed("embedding.word_embeddings.weight", t, torch.Generator().manual_seed(2),
                     0.3, 0.1, WEIGHT_JITTER)
    assert (out != 0).all()
    assert ((out[1] - 0.5).abs() < 0.5 * WEIGHT_JITTER * 6).all()


def _chunk(n_before: int) -> torch.nn.Module:
    """A pipeline stage's chunk: `n_before` other parameters, then the tied embedding copy that
    megatron-core marks `shared_embedding` on the first and the last stage."""
    m = torch.nn.Module()
    for i in range(n_before):
        m.register_parameter(f"a{i}", torch.nn.Parameter(torch.randn(5, 3)))
    m.tied = torch.nn.Parameter(torch.linspace(-1, 1, 24).reshape(6, 4).clone())
    m.tied.shared_embedding = True
    return m


def test_tied_embedding_copies_on_two_stages_stay_equal():
    first, last = _chunk(0), _chunk(3)  # different draws come before the tied weight
    perturb_(first, seed=4)
    perturb_(last, seed=4)
    assert not torch.equal(first.tied, torch.linspace(-1, 1, 24).reshape(6, 4))
    assert torch.equal(first.tied, last.tied)
    # without the mark, the same two chunks diverge: the check above is not vacuous
    a, b = _chunk(0), _chunk(3)
    del a.tied.shared_embedding, b.tied.shared_embedding
    perturb_(a, seed=4)
    perturb_(b, seed=4)
    assert not torch.equal(a.tied, b.tied)
