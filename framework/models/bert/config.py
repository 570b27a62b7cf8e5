"""BERT's config checks (run when a ModelConfig is built)."""
from framework.errors import require


def check_model(m) -> None:
    require(m.seq_length > 3, f"model.seq_length={m.seq_length} must be > 3 for BERT "
                              f"([CLS] A [SEP] B [SEP])")
