"""`mcore_patches.install_rng_neutral_graph_capture`: megatron-core's CUDA-graph capture leaves
the RNG states as it found them (the GPU test `test_resume_under_cuda_graphs_is_exact` checks
the end result; this checks the restore logic on CPU, with CPU generators in the tracker)."""
import random

import numpy as np
import torch

from framework import mcore_patches


def test_graph_capture_leaves_rng_states_unchanged(monkeypatch):
    from megatron.core import tensor_parallel
    from megatron.core.transformer import cuda_graphs

    record = cuda_graphs._CudagraphGlobalRecord
    gens = {"model-parallel-rng": torch.Generator().manual_seed(1),
            "data-parallel-rng": torch.Generator().manual_seed(2)}
    tensors = {"expert-parallel-rng": torch.Generator().manual_seed(3).get_state()}
    tracker = tensor_parallel.get_cuda_rng_tracker()
    monkeypatch.setattr(tracker, "states_", {**gens, **tensors})
    cuda_rng = {"state": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda_rng["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: cuda_rng.update(state=s))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)

    def capture(cls):  # what warm-up and capture do to the states: draw, and replace tensors
        for g in gens.values():
            torch.rand(5, generator=g)
        tracker.states_["expert-parallel-rng"] = torch.zeros(3, dtype=torch.uint8)
        cuda_rng["state"] = torch.tensor([8], dtype=torch.uint8)
        torch.rand(3)
        random.random()
        np.random.rand()
        return "captured"

    monkeypatch.setattr(record, "create_cudagraphs", classmethod(capture))
    monkeypatch.setattr(record, "cudagraph_created", False)
    monkeypatch.setattr(record, "cudagraph_record", ["a runner's forward"])  # graphs to make
    expect = {k: torch.rand(4, generator=g.clone_state()) for k, g in gens.items()}
    cpu_next = torch.rand(2, generator=torch.Generator().set_state(torch.get_rng_state()))
    py_state, np_state = random.getstate(), np.random.get_state()
    mcore_patches.install_rng_neutral_graph_capture()
    mcore_patches.install_rng_neutral_graph_capture()  # idempotent: wrapped once
    assert record.create_cudagraphs() == "captured"
    for k, g in gens.items():
        assert tracker.states_[k] is g  # the same objects (captured graphs read them)
        assert torch.equal(torch.rand(4, generator=g), expect[k])
    assert torch.equal(tracker.states_["expert-parallel-rng"], tensors["expert-parallel-rng"])
    assert torch.equal(cuda_rng["state"], torch.tensor([7], dtype=torch.uint8))
    assert torch.equal(torch.rand(2), cpu_next)
    assert random.getstate() == py_state and np.random.get_state()[1].tolist() == \
        np_state[1].tolist()
    # mcore calls it after every schedule: with nothing recorded it is passed straight through
    monkeypatch.setattr(record, "cudagraph_record", [])
    before = torch.rand(4, generator=gens["model-parallel-rng"].clone_state())
    assert record.create_cudagraphs() == "captured"
    assert not torch.equal(torch.rand(4, generator=gens["model-parallel-rng"]), before)
