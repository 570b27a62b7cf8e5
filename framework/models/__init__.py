"""Model registry and builders.

`MODEL_BUILDERS` maps `model.type` to a function that builds one model chunk (one pipeline stage,
or one virtual stage) from the model sub-config, a megatron-core `TransformerConfig` and the
stage flags. `build_model` adds what every family shares: virtual-pipeline chunks, device
placement, `Float16Module` and megatron-core's `DistributedDataParallel`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from framework.config import ModelConfig, ParallelConfig
from framework.models.bert import build_bert
from framework.models.gpt import build_gpt, transformer_config
from framework.models.layers import fix_checkpoint_without_output, install_fused_wgrad
from framework.models.t5 import build_t5

MODEL_BUILDERS: Dict[str, Callable[..., torch.nn.Module]] = {
    "gpt": build_gpt, "bert": build_bert, "t5": build_t5}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Pad the vocab to a multiple of lcm(`divisible_by`, TP).

    Megatron-LM pads to a multiple of `divisible_by * TP`, so the embedding's shape (and with
    it every checkpoint) changes with TP. With the lcm the shape is the same at every TP that
    divides `divisible_by`, so checkpoints move between layouts without vocab surgery.
    """
    import math

    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    vocab_size: int,
    bf16: bool,
    fp16: bool,
    device: torch.device,
    wrap_ddp: bool,
    fp8: Optional[str] = None,
) -> List[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage). `fp8`: a `train.fp8`
    recipe for the transformer layers' linears (GPT), or None."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    if model_cfg.type not in MODEL_BUILDERS:
        from framework.config import ConfigError

        raise ConfigError(f"model.type={model_cfg.type!r} is not one of {sorted(MODEL_BUILDERS)}")
    fix_checkpoint_without_output()
    if model_cfg.fused_wgrad and device.type == "cuda":
        install_fused_wgrad()
    tcfg = transformer_config(model_cfg, parallel_cfg, bf16=bf16, fp16=fp16,
                              on_gpu=device.type == "cuda", fp8=fp8)
    builder = MODEL_BUILDERS[model_cfg.type]
    vpp = parallel_cfg.vpp
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = builder(
            model_cfg, tcfg, vocab_size=vocab_size,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        model.model_type = getattr(model, "model_type", None) or _encoder_or_decoder()
        chunks.append(model)
    for m in chunks:
        # mcore's TP layers mark their params; make sure the rest have the default attributes
        from megatron.core import tensor_parallel

        for p in m.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        m.to(device)
        if model_cfg.torch_compile and device.type == "cuda":
            for layer in getattr(getattr(m, "decoder", None), "layers", []):
                layer.compile()
    if bf16 or fp16:
        chunks = [Float16Module(tcfg, m) for m in chunks]
    if wrap_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
            overlap_param_gather=parallel_cfg.overlap_param_gather,
            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=None if not parallel_cfg.overlap_grad_reduce else 40_000_000,
        )
        chunks = [
            DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=m,
                                    disable_bucketing=(i > 0))
            for i, m in enumerate(chunks)
        ]
    return chunks


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
