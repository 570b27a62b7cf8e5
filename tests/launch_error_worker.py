"""`python tests/launch_error_worker.py same|per-rank`: two self-launched workers that each fail
with a one-line error, the same text on both ranks or a text per rank (tests/test_launch_errors.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.errors import ConfigError  # noqa: E402
from framework.launch import launch  # noqa: E402


def fail(kind: str) -> None:
    rank = os.environ["RANK"]
    raise ConfigError("the same damaged file on every rank" if kind == "same"
                      else f"rank {rank} alone " + "x" * 200)


if __name__ == "__main__":
    try:
        launch(fail, sys.argv[1], 2)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
