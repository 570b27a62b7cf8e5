"""A torchtitan train spec, `llama3_bench`, for benchmarks/torchtitan_baseline.py.

torchtitan's trainer imports this module through `--experimental.custom_import
benchmarks.torchtitan_spec` (with the project root on PYTHONPATH). It is torchtitan's own
`llama3` spec (model, parallelize with per-block compile, optimizer, LR schedule, loss) with
* flavors named after benchmarks/shapes.py's Llama shapes (`llama3_1b`, `llama3_3b`), whose
  FFN width comes out exactly as the shape's;
* seeded uniformly random token ids over the shape's vocab instead of a tokenizer and a Hugging
  Face dataset (the GPU machine has no network; our side, `data=random`, and the HF baseline
  draw the same distribution);
* no validator and no checkpoint adapter (nothing is saved).
torchtitan's llama3 model has an untied output layer; the shapes' `tied` is not applied.
"""
from __future__ import annotations

import dataclasses

import torch

from benchmarks.shapes import SHAPES, Shape, random_ids

SPEC_NAME = "llama3_bench"


def model_args(shape: Shape):
    """torchtitan TransformerModelArgs for `shape`. torchtitan derives the SwiGLU width as
    round_up(int(multiplier * int(8 * dim / 3)), multiple_of); multiple_of = ffn and a multiplier
    of ffn / int(8 dim / 3) give exactly `shape.ffn`."""
    from torchtitan.models.llama3 import TransformerModelArgs

    base = int(2 * (4 * shape.hidden) / 3)
    return TransformerModelArgs(
        dim=shape.hidden, n_layers=shape.layers, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
        vocab_size=shape.vocab, multiple_of=shape.ffn, ffn_dim_multiplier=shape.ffn / base,
        norm_eps=shape.norm_eps, rope_theta=shape.rope_theta, max_seq_len=shape.seq)


def flavors():
    return {name: model_args(s) for name, s in SHAPES.items()
            if s.family == "llama" and not s.qkv_bias and not s.linear_bias}


def data_setting(shape: Shape) -> str:
    """The settings' `data` field of this spec's loader: SyntheticTokens over the flavor's
    vocab_size, which `model_args` sets to shape.vocab."""
    return random_ids(shape.vocab)


class SyntheticTokens:
    """Endless batches of token ids drawn uniformly over [0, vocab) from a generator seeded with
    `seed`: ({'input': [b, s]}, labels [b, s]) on the CPU, as torchtitan's dataloaders yield
    them; `n` fixed batches cycled (no host RNG per step)."""

    def __init__(self, vocab: int, batch: int, seq: int, seed: int = 0, n: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(n):
            x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
            self.batches.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
        self.i = 0

    def __iter__(self):
        while True:
            inp, lab = self.batches[self.i % len(self.batches)]
            self.i += 1
            yield {"input": inp}, lab

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state_dict):
        self.i = int(state_dict.get("i", 0))


def build_synthetic_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs):
    from torchtitan.components.dataloader import BaseDataLoader

    class _Loader(SyntheticTokens, BaseDataLoader):
        pass

    args = flavors()[job_config.model.flavor]
    return _Loader(args.vocab_size, job_config.training.local_batch_size,
                   job_config.training.seq_len, seed=dp_rank)


def register() -> None:
    from torchtitan.models import llama3
    from torchtitan.protocols import train_spec as ts

    if SPEC_NAME in ts._extra_train_specs:
        return
    spec = dataclasses.replace(llama3.get_train_spec(), model_args=flavors(),
                               build_dataloader_fn=build_synthetic_dataloader,
                               build_tokenizer_fn=None, build_validator_fn=None,
                               state_dict_adapter=None)
    ts.register_train_spec(SPEC_NAME, spec)


try:  # torchtitan imports this module to register the spec; tests import it without torchtitan
    import torchtitan  # noqa: F401
except ImportError:
    pass
else:
    register()
