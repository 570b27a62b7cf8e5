"""The preflight checks that read the GPU (moved here from test_hardening.py: every GPU-marked
test lives in a test_gpu_*.py module)."""
import pytest

from framework.cli import register_resolvers
from framework.config import ConfigError, register_configs
from helpers import load_config

register_configs()
register_resolvers()
pytestmark = pytest.mark.gpu


def test_preflight_memory_check_on_gpu():
    """The memory lower bound reads the GPU's size: a model that cannot fit is refused, the
    default one passes."""
    from framework.preflight import check_model, device_memory_bytes

    have, where = device_memory_bytes("cuda", 1)
    assert have > 2**30 and where.startswith("of ")
    check_model(load_config("train.device=cuda"), 1000, "cuda")
    with pytest.raises(ConfigError, match="GiB"):
        check_model(load_config("train.device=cuda", "model.hidden_size=262144",
                                "model.num_attention_heads=16", "model.num_layers=8"),
                    1000, "cuda")
