"""Selective recompute of a dense MLP's activation ("mlp_act" in `parallel.recompute_modules`).

linear_fc2 keeps its input, the activation output act(fc1 output + bias), [s, b, ffn/TP], for its
weight gradient. With "mlp_act" that tensor's memory is freed after the forward and refilled right
before fc2's backward by recomputing the activation from fc1's output (kept anyway), at the cost
of one elementwise kernel per layer. It is megatron-core's "moe_act" mechanism
(`tensor_parallel.CheckpointWithoutOutput`, transformer/moe/experts.py) applied to the dense MLP,
which mcore 0.16 offers no such option for.

mcore's TransformerConfig rejects module names it does not know, so `transformer_config()`
(framework/models/gpt.py) removes "mlp_act" from the list mcore sees and sets
`ExtendedTransformerConfig.recompute_mlp_act` instead, which `ActRecomputeMLP` reads the way
mcore's modules read `recompute_modules`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from framework.models.layers import Fp8ColumnParallelLinear, Fp8MLPOutputLinear, MLPOutputLinear


@dataclass
class ExtendedTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus our recompute option mcore does not know."""

    # recompute the dense MLP's activation before fc2's backward instead of keeping it
    recompute_mlp_act: bool = False
    # FP8 GEMMs in the transformer layers' linears (`train.fp8`): None, "tensorwise" or
    # "rowwise" (framework/fast/fp8.py). Not mcore's `fp8`, which means Transformer Engine.
    fp8_gemm: Optional[str] = None


class _ActivationStep:
    """Stands in for an MLP in mcore's `MLP.forward` so that only its activation step runs:
    linear_fc1 hands over the given fc1 output and bias, linear_fc2 returns its input. mcore's own
    dispatch (fused bias-GeLU / GeGLU / SwiGLU, GLU, plain activation) thus picks the kernels, as
    in the forward without recompute."""

    def __init__(self, mlp: MLP, bias):
        self.config = mlp.config
        self.activation_func = mlp.activation_func
        self.linear_fc1 = lambda x: (x, bias)
        self.linear_fc2 = lambda y: (y, None)


class ActRecomputeMLP(MLP):
    """megatron-core's MLP that, with `config.recompute_mlp_act`, in training with grad enabled,
    does not keep its activation output (see the module docstring). Otherwise it is mcore's MLP
    unchanged (same parameters, same state dict).

    A layer spec names the class itself, not a ModuleSpec: mcore 0.16's TransformerLayer passes
    `tp_group` only to a ModuleSpec of exactly `MLP` and logs "Unknown MLP type" for any other
    (once per layer). So the class takes the TP group the layer's default process groups hold
    (megatron's global one, as for every layer we build), and its linears default to ours."""

    def __init__(self, config, submodules: Optional[MLPSubmodules] = None, **kwargs):
        if submodules is None:
            fp8 = getattr(config, "fp8_gemm", None)
            submodules = MLPSubmodules(
                linear_fc1=Fp8ColumnParallelLinear if fp8 else tensor_parallel.ColumnParallelLinear,
                linear_fc2=Fp8MLPOutputLinear if fp8 else MLPOutputLinear)
        kwargs.setdefault("ffn_hidden_size", config.ffn_hidden_size)
        kwargs.setdefault("tp_group",
                          parallel_state.get_tensor_model_parallel_group(check_initialized=False))
        super().__init__(config, submodules, **kwargs)
        # (build_model makes mcore's CheckpointWithoutOutput usable without TE before this)
        self.recompute_act = bool(getattr(config, "recompute_mlp_act", False))

    def _activation(self, fc1_output, bias):
        return MLP.forward(_ActivationStep(self, bias), fc1_output)[0]

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not (self.recompute_act and self.training and torch.is_grad_enabled()
                and per_token_scale is None):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        return self._forward_recompute_act(hidden_states)

    # eager also inside a torch.compile'd layer (model.torch_compile): CheckpointWithoutOutput
    # works by side effects on real tensors (the activation's storage resized to 0, a hook on
    # fc2's output), kept out of dynamo's tracing; mcore's jit-fused activations still compile
    @torch.compiler.disable
    def _forward_recompute_act(self, hidden_states):
        fc1_output, bias = self.linear_fc1(hidden_states)
        ckpt = tensor_parallel.CheckpointWithoutOutput()
        act = ckpt.checkpoint(self._activation, fc1_output, bias)
        output, output_bias = self.linear_fc2(act)
        # frees act's storage; refilled by a hook when the gradient reaches fc2's output
        ckpt.discard_output_and_register_recompute(output)
        return output, output_bias
