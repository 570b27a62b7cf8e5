import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
