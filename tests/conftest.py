import os
import sys

# One intra-op thread per process, set before torch is first imported (here, and inherited by
# every process a test starts): the models are tiny, and on a 2-core machine two threads per
# process spin against each other and against the second process of a TP2/DP2 run, which made
# steps several times slower. FW_TEST_THREADS=N sets another number.
os.environ["OMP_NUM_THREADS"] = os.environ.get("FW_TEST_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import ROOT  # noqa: E402

sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no test downloads: everything is built locally (a hub lookup would only slow a test down)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# A run of several workers (TP2, DP2, a TP2 sweep job) forks them from train.py's process, which
# has imported torch and megatron-core already, instead of spawning fresh interpreters that
# import them again (~10 s of CPU per worker, most of a short TP2 run's cost). Only off GPU
# machines (a CUDA context does not survive fork). The spawn start method that users get stays
# tested where the start itself is the subject: test_resilience's SIGTERM of a TP2 process group
# and test_multiworker's stops and hangs set FW_WORKER_START_METHOD=spawn.
if not torch.cuda.is_available():
    os.environ.setdefault("FW_WORKER_START_METHOD", "fork")


def pytest_collection_modifyitems(config, items):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(pytest.mark.skip(reason="needs CUDA; run `pytest -m gpu` on a GPU "
                                                    "machine"))
        mark = item.get_closest_marker("gpus")
        if mark is not None and n < mark.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {mark.args[0]} GPUs, {n} visible"))


@pytest.fixture
def root():
    return ROOT


@pytest.fixture(scope="module")
def mp1():
    """A gloo world of one process with megatron-core's model-parallel state at TP1, for the
    tests of one module (a module may define a fixture of its own of this name instead)."""
    from helpers import gloo_world

    with gloo_world(tp=1):
        yield


# FW_TEST_TIMES=<file>: one JSON line per test with its wall time and the CPU time of this process
# and every process it ran (what a dedicated machine would spend; wall time on a shared one is
# mostly waiting), for comparing the suite's cost between commits.
if os.environ.get("FW_TEST_TIMES"):
    import json
    import resource
    import time

    import helpers

    def _cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + helpers.FORKED_CPU

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        t0, c0, f0 = time.time(), _cpu(), len(helpers.FRESH_STARTS)
        yield
        with open(os.environ["FW_TEST_TIMES"], "a") as f:
            f.write(json.dumps({"test": item.nodeid, "wall": round(time.time() - t0, 2),
                                "cpu": round(_cpu() - c0, 2),
                                "fresh": helpers.FRESH_STARTS[f0:]}) + "\n")
