"""megatron-core's pipeline schedules, run on CPU over gloo (see tests/pipeline_cpu_worker.py):
1F1B and interleaved (VPP) must give the losses and gradients of the unpipelined model.

This is the regression test for the interleaved-schedule bug found on GPU: with batched p2p
(mcore's TransformerConfig default) and PP=2, activations and gradients to the one peer pair up
out of order, so the gradients of the earlier chunks come out 15-50x too large. We run
interleaving with overlapped (unbatched) p2p, as Megatron-LM does by default.
"""
import json
import os

import pytest

from helpers import ROOT, launch_ranks


def run_layout(nproc, *args):
    """tests/pipeline_cpu_worker.py on `nproc` ranks (as torchrun starts them)."""
    out = launch_ranks(nproc, os.path.join(ROOT, "tests", "pipeline_cpu_worker.py"), *args,
                       timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def reference():
    return run_layout(1, "pp=1")


def _compare(ref, got, tol):
    assert got["losses"] == pytest.approx(ref["losses"], abs=tol)
    assert set(got["grads"]) == set(ref["grads"])
    for k, v in ref["grads"].items():
        assert got["grads"][k] == pytest.approx(v, rel=tol, abs=tol), k


@pytest.mark.parametrize("args", [("pp=2",), ("pp=2", "vpp=2")], ids=["1f1b", "interleaved"])
def test_pipeline_schedules_match_unpipelined(reference, args):
    _compare(reference, run_layout(2, *args), 1e-5)


def test_bert_pp2_matches_unpipelined():
    """BERT with the binary head (masked-LM and sentence-order losses, a padded sample)."""
    _compare(run_layout(1, "pp=1", "model=bert"), run_layout(2, "pp=2", "model=bert"), 1e-5)


def test_batched_p2p_with_interleaving_at_pp2_is_refused():
    """Documents why overlap_p2p_comm defaults to on with VPP, and why the config refuses it off."""
    from framework.config import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="overlap_p2p_comm"):
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                       overlap_p2p_comm=False)
