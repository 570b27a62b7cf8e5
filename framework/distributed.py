"""This process's place in the distributed world: process groups, seeds, a free port."""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Dict

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:  # annotations only
    from framework.config import ParallelConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(p: "ParallelConfig", device: str) -> None:
    """The process group (NCCL on GPU, gloo on CPU) and megatron-core's model-parallel groups."""
    from megatron.core import parallel_state as ps

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL: a timed-out collective raises (naming the op) instead of hanging forever
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if not dist.is_initialized():
        extra = {}
        if device != "cuda" and os.environ.get("WORLD_SIZE", "1") == "1":
            # one CPU rank: an in-process store, not a TCP one on a port that free_port() found
            # free and another process may have taken since (EADDRINUSE under parallel tests)
            extra = dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(
            backend=p.distributed_backend if device == "cuda" else "gloo",
            timeout=timedelta(minutes=p.distributed_timeout_minutes), **extra)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.vpp,
    )


def set_seeds(seed: int, device: str, cuda_graph: bool = False) -> None:
    """Megatron's scheme: distinct per pipeline stage; TP ranks differ through mcore's tracker
    (graph-safe generator states when layers are captured as CUDA graphs)."""
    from megatron.core import parallel_state as ps

    s = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(s, use_cudagraphable_rng=cuda_graph,
                                        force_reset_rng=cuda_graph)


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def rng_state() -> Dict[str, Any]:
    """Every RNG state training draws from: Python's, numpy's, torch's CPU generator and, once
    CUDA is up, the default CUDA generator and megatron-core's RNG tracker (as tensors)."""
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "np": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = _tracker_states(tensor_parallel.get_cuda_rng_tracker().get_states())
    return state


def _tracker_states(states: Dict[str, Any], graphable: bool = False) -> Dict[str, Any]:
    """The RNG tracker's states as byte tensors (graphable=False: what a checkpoint stores), or
    as graph-safe generators (graphable=True: what a tracker made for model.cuda_graph holds).
    A weights-only load, as every load here is, refuses generators; the tensor form is the same
    state and loads into an eager or a graphed run alike."""
    from megatron.core.tensor_parallel.random import convert_cuda_rng_state

    return {k: convert_cuda_rng_state(v, to_graphable=graphable) for k, v in states.items()}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore `rng_state()`. A tracker state the tracker holds as a generator (graph-safe, for
    model.cuda_graph) is set in place: captured CUDA graphs read those very objects."""
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        tracker = tensor_parallel.get_cuda_rng_tracker()
        graphable = bool(getattr(tracker, "use_cudagraphable_rng", False))
        current = tracker.get_states()
        states = {}
        for k, v in state["tracker"].items():
            g = current.get(k)
            if isinstance(g, torch.Generator) and isinstance(v, torch.Tensor):
                g.set_state(v)
                states[k] = g
            else:
                states[k] = _tracker_states({k: v}, graphable)[k]
        tracker.set_states(states)
