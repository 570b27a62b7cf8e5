"""The megatron-core module globals we replace, each where mcore 0.16 without Transformer Engine
or apex has a missing or slow piece. All are idempotent and leave mcore alone when TE or apex
provides the piece. `framework.models.build.build_model`,
`framework.models.transformer.transformer_config` and `framework.optimizer.build_optimizer`
install them; the kernels themselves are in framework/fast/.

* `fix_checkpoint_without_output`: selective recompute of "layernorm" without TE.
* `install_fused_wgrad` (`AddmmWgrad`): `gradient_accumulation_fusion` without apex.
* `install_fused_rope`: our Triton RoPE in mcore's fused-RoPE slot (`transformer_config`
  installs it before mcore validates `apply_rope_fusion`).
* `install_foreach_optimizer_kernels`: foreach grad-norm / scale / copy kernels in mcore's
  optimizer instead of its per-tensor loops.
* `install_rng_neutral_graph_capture`: mcore's per-layer CUDA-graph capture (`model.cuda_graph`)
  leaves the RNG states as it found them, so that a resumed run draws like an uninterrupted one.

Patches that hold only for one call (a norm class for one constructor, a CUDA-only helper during
one forward) use `framework.patching.patched` where they are needed.
"""
from __future__ import annotations

import contextlib

import torch

from framework.fast.multi_tensor import (foreach_copy_this_to_that, foreach_l2norm,
                                         foreach_multi_tensor_applier, foreach_scale)
from framework.fast.rope import fused_rope


def fix_checkpoint_without_output() -> None:
    """Make megatron-core's selective recompute of "layernorm" run without Transformer Engine
    (`build_model` calls it).

    mcore 0.16's TransformerLayer builds `tensor_parallel.CheckpointWithoutOutput()` for it, whose
    default fp8=False is read as "fp8 on" (`self.fp8 = fp8 is not None`), so its forward calls
    TE's FP8GlobalStateManager, a name that only exists when TE is installed, and without TE it
    raises NameError. Without TE, the class is replaced by a subclass that passes
    fp8=None unless fp8 is really requested; everything else is mcore's. Idempotent; nothing
    changes when TE is installed."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    base = tensor_parallel.CheckpointWithoutOutput
    if tp_random.HAVE_TE or getattr(base, "fp8_none_unless_requested", False):
        return

    class CheckpointWithoutOutputNoTE(base):
        fp8_none_unless_requested = True

        def __init__(self, fp8=None):
            super().__init__(fp8=fp8 or None)

    tensor_parallel.CheckpointWithoutOutput = CheckpointWithoutOutputNoTE


class AddmmWgrad:
    """Stands in for apex's `fused_weight_gradient_mlp_cuda` in megatron-core's linear layers
    (`gradient_accumulation_fusion`): main_grad += grad_output^T @ input, accumulated in fp32
    straight from the bf16/fp16 GEMM (torch.addmm with out_dtype), with no bf16 weight gradient
    and no separate add."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        if total_input.dtype == torch.float32:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32,
                        out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        main_grad.addmm_(grad_output.t(), total_input)


def install_fused_wgrad() -> None:
    """Let megatron-core's `gradient_accumulation_fusion` run without apex, through
    `AddmmWgrad` (`build_model` calls it for `model.fused_wgrad` on GPU). Keeps apex's kernel
    when it is installed; idempotent."""
    from megatron.core.tensor_parallel import layers as tp_layers

    if not tp_layers._grad_accum_fusion_available:
        tp_layers.fused_weight_gradient_mlp_cuda = AddmmWgrad
        tp_layers._grad_accum_fusion_available = True


def install_fused_rope() -> None:
    """Make `framework.fast.rope.fused_rope` megatron-core's fused RoPE when Transformer Engine's is absent, so
    `TransformerConfig(apply_rope_fusion=True)` validates and uses it; idempotent."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope


def install_foreach_optimizer_kernels() -> bool:
    """Point megatron-core's optimizer modules at our foreach kernels
    (framework/fast/multi_tensor.py) when it fell back to its local, per-tensor loops (no apex,
    no TE). Returns True when installed."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptim

    if clip_grads.multi_tensor_applier is not mutils.local_multi_tensor_applier and \
            clip_grads.multi_tensor_applier is not foreach_multi_tensor_applier:
        return False  # apex or TE kernels are in use: keep them
    clip_grads.multi_tensor_applier = foreach_multi_tensor_applier
    clip_grads.l2_norm_impl = foreach_l2norm
    clip_grads.multi_tensor_scale_impl = foreach_scale
    moptim.multi_tensor_applier = foreach_multi_tensor_applier
    moptim.multi_tensor_scale_impl = foreach_scale
    moptim._multi_tensor_copy_this_to_that = foreach_copy_this_to_that
    return True


@contextlib.contextmanager
def rng_states_kept():
    """Put every RNG state training draws from back as it was on exit (`rng_state` /
    `set_rng_state`, which checkpoints use too; the tracker's graph-safe generators are restored
    in place: they are the objects captured CUDA graphs read at replay)."""
    from framework.distributed import rng_state, set_rng_state

    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def install_rng_neutral_graph_capture() -> None:
    """Make megatron-core's CUDA-graph capture (`model.cuda_graph`) leave every CUDA RNG state as
    it found it (`build_model` calls it when the switch is on); idempotent.

    mcore captures the per-layer graphs at the end of a process's first forward-backward
    (`create_cudagraphs`, called by the schedule), after running each layer's forward and
    backward a few more times as warm-up and once under capture. With dropout on, those runs
    draw from the default CUDA generator and the RNG tracker's generators. An uninterrupted run
    captures after step 1, a resumed one after its first step: the two then draw from different
    offsets from the resumed run's second step on, and a resume is no longer exact (the GPU test
    `test_resume_under_cuda_graphs_is_exact` saw it). The states are restored in place: the
    graph-safe generators are the objects the captured graphs read at replay.
    (`framework.training.loop.Trainer` also runs that first pass before the first counted step,
    so that every counted step is a graphed one.)"""
    from megatron.core.transformer import cuda_graphs

    record = cuda_graphs._CudagraphGlobalRecord
    if getattr(record.create_cudagraphs, "rng_neutral", False):
        return
    capture = record.create_cudagraphs.__func__

    def create_cudagraphs(cls):
        if cls.cudagraph_created or not cls.cudagraph_record:
            return capture(cls)  # nothing to capture (mcore calls this after every schedule)
        with rng_states_kept():
            return capture(cls)

    create_cudagraphs.rng_neutral = True
    record.create_cudagraphs = classmethod(create_cudagraphs)
