"""Checks of a run's inputs before any worker starts, in the launching process, so that bad input
is one line from the parent (not a failure inside every self-launched worker) and nothing on disk
is touched: the tokenizer against the model family, the model settings megatron-core would
refuse, memory, the data files, and every directory the run writes. `framework.plan.make_plan`
runs them (`check_inputs`) once it has chosen the checkpoint and the tokenizer.
"""
from __future__ import annotations

import os
from typing import List

import torch

from framework.data.builder import default_cache_root, index_cache_dir, parse_blend
from framework.data.indexed import check_indexed
from framework.errors import ConfigError
from framework.paths import unwritable_dir
from framework.models.build import padded_vocab_size
from framework.models.registry import family
from framework.models.transformer import transformer_config


def check_inputs(cfg, tokenizer, device: str) -> None:
    """The tokenizer has what the model family needs (e.g. [MASK], sentinels), the model settings
    and memory (`check_model`), the data files, and every output directory: one line each."""
    family(cfg.model.type).parts().check_tokenizer(tokenizer, cfg)
    check_model(cfg, tokenizer.vocab_size, device)
    if cfg.data.type == "indexed":
        prefixes, _weights = parse_blend(cfg.data.path)
        for prefix in prefixes:  # the files first, before a cache folder is made beside them
            check_indexed(prefix)
        cache = index_cache_dir(cfg.data, prefixes[0])
        for prefix in prefixes:
            check_indexed(prefix, tokenizer.vocab_size, cache_dir=cache)
    check_output_dirs(cfg)  # last: nothing above leaves anything behind when it fails


def output_dirs(cfg) -> List[tuple]:
    """(directory, what) for every directory the run writes into."""
    dirs = [(cfg.run_dir, "the run directory (hydra.run.dir)")]
    if cfg.checkpoint.save or cfg.logging.wandb:  # W&B keeps its run id beside the checkpoints
        dirs.append((cfg.checkpoint.dir, "checkpoint.dir"))
    if cfg.data.path_to_cache is not None:
        dirs.append((cfg.data.path_to_cache, "data.path_to_cache"))
    elif cfg.data.type == "embedded":
        dirs.append((default_cache_root(), "the data cache (data.path_to_cache unset)"))
    return dirs


def check_output_dirs(cfg) -> None:
    for path, what in output_dirs(cfg):
        if path is None:
            continue
        problem = unwritable_dir(path)
        if problem:
            raise ConfigError(f"{what}={path}: {problem}")


def check_model(cfg, tokenizer_vocab: int, device: str) -> None:
    """Settings only megatron-core checks (its TransformerConfig, built here without a model),
    the model family, the vocabulary against the tokenizer, and memory: the weights and gradients
    alone, plus one micro-batch's layer inputs, must fit the device."""
    m, p = cfg.model, cfg.parallel
    family(m.type)  # registered (a ConfigError lists the families otherwise)
    if m.vocab_size is not None and m.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab} tokens); leave it null to use that")
    on_gpu = device == "cuda"
    bf16 = (on_gpu if cfg.train.bf16 is None else cfg.train.bf16) and not cfg.train.fp16
    try:
        transformer_config(m, p, bf16=bf16, fp16=cfg.train.fp16, on_gpu=on_gpu)
    except (ValueError, AssertionError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"megatron-core refuses the model/parallel settings: {msg}") from None
    vocab = padded_vocab_size(m.vocab_size or tokenizer_vocab, m.make_vocab_size_divisible_by,
                              p.tensor_model_parallel_size)
    need, params = min_memory_bytes(cfg, vocab, bf16 or cfg.train.fp16, on_gpu)
    have, where = device_memory_bytes(device, p.model_parallel_size * (p.data_parallel_size or 1))
    shard_hint = "" if not on_gpu or p.use_distributed_optimizer else \
        ", or more GPUs with parallel.use_distributed_optimizer=true (the optimizer state split " \
        "over DP)"
    if have and need > have:
        raise ConfigError(
            f"the model needs at least {need / 2**30:.1f} GiB per rank ({params / 1e9:.2f}B "
            f"parameters: weights, gradients and optimizer state / "
            f"(TP x PP){', the state also / DP' if on_gpu and p.use_distributed_optimizer else ''}"
            f", plus one micro-batch of train.micro_batch_size="
            f"{cfg.train.micro_batch_size} layer inputs), more than the {have / 2**30:.1f} GiB "
            f"{where}; use smaller model sizes or micro-batch, or more TP/PP{shard_hint}")


def min_memory_bytes(cfg, vocab: int, half: bool, on_gpu: bool = False) -> tuple:
    """(bytes, parameters): a lower bound of one rank's training memory, split over TP x PP:
    * weights (2 bytes each in bf16/fp16, 4 in fp32) and their gradients: on a GPU,
      megatron-core's DDP gradient buffer, which is fp32 (framework/models/wrappers.py,
      grad_reduce_in_fp32); on a CPU, the weights' dtype;
    * the optimizer's state (allocated by the first step: not with train.max_steps=0): on a
      GPU, megatron-core's mixed-precision optimizer keeps it in fp32, the fp32 main params
      (bf16/fp16 only) and Adam's two moments or SGD's momentum, split over DP with the
      distributed optimizer; on a CPU, torch's optimizer keeps the moments in the weights'
      dtype;
    * the input of every layer of one micro-batch (split over TP only with sequence
      parallelism; none with train.max_steps=0).
    The other activations, the logits and the allocator's slack come on top, so a config above
    it cannot run."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    h, kv = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attn = h * kv * (m.num_attention_heads + 2 * groups) + m.num_attention_heads * kv * h
    mlp = h * m.ffn * (3 if m.activation in ("swiglu", "geglu_tanh") else 2)
    encoder = family(m.type).encoder_decoder
    layers = m.num_layers + (m.enc_layers if encoder else 0)
    embeddings = 1 if m.share_embeddings_and_output_weights else 2  # untied: the output layer
    params = layers * (attn + mlp) + vocab * h * embeddings
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    elt = 2 if half else 4
    per_param = elt + (4 if on_gpu else elt)
    stepping = t.max_steps > 0  # max_steps=0 (a seed checkpoint): no step, no moments
    o = cfg.optimizer
    moments = 2 if o.optimizer == "adam" else (1 if o.sgd_momentum else 0)
    if on_gpu:
        state = 4 * moments * stepping + (4 if half else 0)
        per_param += state / ((p.data_parallel_size or 1) if p.use_distributed_optimizer else 1)
    else:  # torch's optimizer on the parameters themselves: its moments in their dtype
        per_param += elt * moments * stepping
    weights = params * per_param / (tp * pp)
    seq = m.seq_length + (m.decoder_seq_length or 0)
    acts = stepping * t.micro_batch_size * seq * h * (layers / pp) * elt / (
        tp if p.sequence_parallel else 1)
    return weights + acts, params


def device_memory_bytes(device: str, world: int) -> tuple:
    """(bytes one rank can have, where); (0, '') when unknown."""
    try:
        if device == "cuda":  # this rank's GPU (the properties need no CUDA context)
            props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
            return props.total_memory, f"of {props.name}"
        import psutil

        total = psutil.virtual_memory().total
        return total / world, f"of host memory per worker ({total / 2**30:.0f} GiB / {world})"
    except Exception:  # no such information here: skip the check
        return 0, ""
