"""`build_model`: this rank's model chunks for any registered family.

The family's builder (`ModelSpec.parts().build`, registered in framework/models/registry.py)
makes one chunk (one pipeline stage, or one virtual stage) from the model sub-config, a
megatron-core `TransformerConfig` and the stage flags. `build_model` adds what every family
shares: the megatron-core patches, virtual-pipeline chunks, device placement, optional per-layer
`torch.compile`, `Float16Module` and megatron-core's `DistributedDataParallel`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional

import torch

from framework import mcore_patches
from framework.models.registry import family
from framework.models.transformer import transformer_config
from framework.models.wrappers import wrap

if TYPE_CHECKING:  # annotations only
    from framework.config import ModelConfig, ParallelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Pad the vocab to a multiple of lcm(`divisible_by`, TP).

    Megatron-LM pads to a multiple of `divisible_by * TP`, so the embedding's shape (and with
    it every checkpoint) changes with TP. With the lcm the shape is the same at every TP that
    divides `divisible_by`, so checkpoints move between layouts without vocab surgery.
    """
    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_model(
    model_cfg: "ModelConfig",
    parallel_cfg: "ParallelConfig",
    *,
    vocab_size: int,
    bf16: bool,
    fp16: bool,
    device: torch.device,
    wrap_ddp: bool,
    fp8: Optional[str] = None,
    fp8_wgrad_overwrite: bool = False,
) -> List[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage). `fp8`: a `train.fp8`
    recipe for the transformer layers' linears, or None. `fp8_wgrad_overwrite`: each step runs
    one micro-batch per rank, so a tensorwise/delayed FP8 linear's weight-gradient GEMM may
    write `main_grad` (zeroed at each step's start) instead of adding its product to it."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType

    build = family(model_cfg.type).parts().build
    mcore_patches.fix_checkpoint_without_output()
    if model_cfg.fused_wgrad and device.type == "cuda":
        mcore_patches.install_fused_wgrad()
    if model_cfg.cuda_graph and device.type == "cuda":
        mcore_patches.install_rng_neutral_graph_capture()
    tcfg = transformer_config(model_cfg, parallel_cfg, bf16=bf16, fp16=fp16,
                              on_gpu=device.type == "cuda", fp8=fp8)
    vpp = parallel_cfg.vpp
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = build(
            model_cfg, tcfg, vocab_size=vocab_size,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        model.model_type = getattr(model, "model_type", None) or ModelType.encoder_or_decoder
        chunks.append(model)
    for m in chunks:
        # mcore's TP layers mark their params; make sure the rest have the default attributes
        for p in m.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        m.to(device)
        if model_cfg.torch_compile and device.type == "cuda":
            # every transformer stack: GPT's and T5's decoder, BERT's and T5's encoder
            for stack in ("encoder", "decoder"):
                for layer in getattr(getattr(m, stack, None), "layers", []):
                    layer.compile()
    if fp8:
        from framework.fast.fp8 import Fp8History
        from framework.models.layers import Fp8Linear

        for m in chunks:
            linears = [x for x in m.modules() if isinstance(x, Fp8Linear)]
            for x in linears:
                x.fp8_wgrad_overwrite = fp8_wgrad_overwrite and fp8 in ("tensorwise", "delayed")
            if fp8 == "delayed" and linears:
                # one amax-history buffer per chunk (framework/fast/fp8.py), outside the state dict
                m.fp8_history = Fp8History(linears, device, ps.get_tensor_model_parallel_group())
    return wrap(chunks, tcfg, parallel_cfg, half=bf16 or fp16, ddp=wrap_ddp)
