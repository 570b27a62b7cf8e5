"""T5's config checks and FLOP formula (they import neither torch nor megatron-core)."""
from __future__ import annotations

import math

from framework.errors import require


def check_model(m) -> None:
    """Run when a ModelConfig of model.type=t5 is built."""
    require(m.decoder_seq_length is not None and m.decoder_seq_length > 0,
            f"model.decoder_seq_length must be a positive number for model.type=t5, "
            f"got {m.decoder_seq_length}")
    require(m.encoder_num_layers is None or m.encoder_num_layers > 0,
            f"model.encoder_num_layers={m.encoder_num_layers} must be positive")
    require(m.position_embedding_type != "learned_absolute"
            or m.max_positions >= m.decoder_seq_length,
            f"model.decoder_seq_length={m.decoder_seq_length} exceeds "
            f"model.max_position_embeddings={m.max_positions}")
    require(m.position_embedding_type != "relative" or m.attention_backend == "sdpa",
            "model.position_embedding_type=relative needs model.attention_backend=sdpa "
            "(mcore's local attention takes no attention bias)")
    require(m.relative_attention_num_buckets > 0 and m.relative_attention_max_distance > 0,
            "model.relative_attention_num_buckets and model.relative_attention_max_distance must "
            "be positive")


def check_run(cfg) -> None:
    """Run when a Config with model.type=t5 is built: rules across config groups."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    require(cfg.checkpoint.load_hf is None,
            "checkpoint.load_hf imports GPT-2 and Megatron-BERT weights; not supported for "
            "model.type=t5")
    # megatron-core 0.16 removed encoder-decoder pipelining: ModelType.encoder_and_decoder
    # raises (megatron/core/enums.py) and the schedules send one tensor per stage
    # (pipeline_parallel/schedules.py get_tensor_shapes), not encoder + decoder states.
    require(p.pipeline_model_parallel_size == 1,
            "parallel.pipeline_model_parallel_size>1 is not supported for model.type=t5: "
            "megatron-core 0.16 has no encoder-decoder pipeline schedule "
            "(ModelType.encoder_and_decoder was removed); use TP/DP/SP")
    groups = m.num_query_groups or m.num_attention_heads
    tp = p.tensor_model_parallel_size
    head = m.kv_channels or m.hidden_size // m.num_attention_heads
    require(groups >= tp or (2 * groups * head) % tp == 0,
            f"model.num_query_groups={groups} < parallel.tensor_model_parallel_size={tp}: the "
            f"cross-attention key/value width 2 x groups x head dim = {2 * groups * head} must "
            f"be divisible by TP")
    # one sentinel per masked span; the decoder holds <s> + (sentinel + span) per span
    spans = math.ceil(d.masking_probability * (m.seq_length - 2))
    require(m.decoder_seq_length >= spans + 2,
            f"model.decoder_seq_length={m.decoder_seq_length} is too short for "
            f"data.masking_probability={d.masking_probability} x model.seq_length="
            f"{m.seq_length} (needs at least {spans + 2})")


def flops_per_token(m, vocab: int) -> float:
    """Model FLOPs per encoder token: the encoder stack at the encoder length s_e, plus the
    decoder per decoder token scaled by s_d / s_e, a decoder layer costing a self-attention layer
    plus cross-attention (forward: 4h^2 per decoder token for its Q and output projections,
    4h^2 x s_e/s_d for K and V over the encoder tokens, 4 h s_e for scores and values; x3 with
    the backward), and the output layer on the decoder tokens."""
    h = m.hidden_size
    se, sd = m.seq_length, m.decoder_seq_length
    enc = 72.0 * m.enc_layers * h * h * (1.0 + se / (6.0 * h))
    # forward+backward = 3x forward; forward of one matmul = 2 flops per weight
    cross = 3.0 * (2.0 * 2 * h * h + 2.0 * 2 * h * h * se / sd + 2.0 * 2 * h * se)
    dec = 72.0 * m.num_layers * h * h * (1.0 + sd / (6.0 * h)) \
        + m.num_layers * cross + 6.0 * h * vocab
    return enc + dec * sd / se
