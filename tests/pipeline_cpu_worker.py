"""Run megatron-core's own pipeline schedules (1F1B, interleaved) on CPU over gloo: one global
batch through our GPT model and train step, printing the per-micro-batch losses and per-parameter
gradient norms keyed by *global* parameter names, so layouts can be compared.

mcore's p2p code allocates on `torch.cuda.current_device()` and synchronises CUDA; for this
diagnostic those calls are redirected to the CPU. Weights are re-initialised from the global
parameter name so every layout starts from the same model. Used by tests/test_pipeline_cpu.py:

    torchrun --nproc-per-node 2 tests/pipeline_cpu_worker.py pp=2 vpp=2 [model=bert]

`model=bert`: BERT with the binary head (masked-LM and sentence-order losses), a padded sample.
"""
import json
import os
import re
import sys
import zlib

import torch
import torch.distributed as dist

_zeros = torch.zeros


def _zeros_cpu(*a, device=None, **k):
    return _zeros(*a, device="cpu" if device == "cuda" else device, **k)


def redirect_cuda_to_cpu():
    """Point the CUDA calls of mcore's p2p code and schedules at the CPU (diagnostics only)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.zeros = _zeros_cpu


redirect_cuda_to_cpu()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.config import ModelConfig, ParallelConfig  # noqa: E402


def global_name(chunk, name):
    """`<stack>.layers.<global layer index>.<rest>`; the tied output layer is the embedding."""
    m = re.match(r"(decoder|encoder)\.layers\.(\d+)\.(.*)", name)
    if not m:
        return "embedding.word_embeddings.weight" if name == "output_layer.weight" else name
    layer = getattr(chunk, m.group(1)).layers[int(m.group(2))]
    return f"{m.group(1)}.layers.{layer.layer_number - 1}.{m.group(3)}"


def gpt_batches(S, mb, nmb):
    toks = torch.randint(0, 90, (nmb, mb, S + 1), generator=torch.Generator().manual_seed(1))
    for t in toks:
        yield {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mb, S),
               "position_ids": torch.arange(S).expand(mb, S)}


def bert_batches(S, mb, nmb):
    toks = torch.randint(5, 90, (nmb, mb, S), generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(toks):
        pad = torch.ones(mb, S, dtype=torch.long)
        pad[0, 20:] = -1
        lm = (torch.rand(mb, S, generator=torch.Generator().manual_seed(i)) < 0.2).float()
        yield {"text": t, "types": (torch.arange(S) >= 10).long().expand(mb, S), "labels": t,
               "is_random": torch.tensor([0, 1]), "padding_mask": pad, "loss_mask": lm}


def main():
    args = dict(a.split("=") for a in sys.argv[1:])
    pp, vpp = int(args.get("pp", 1)), int(args.get("vpp", 0)) or None
    overlap = None if "overlap_p2p_comm" not in args else bool(int(args["overlap_p2p_comm"]))
    kind = args.get("model", "gpt")
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from framework.models.build import build_model
    from framework.models.wrappers import unwrap
    from framework.models.registry import family

    model_cfg = ModelConfig(name="t", type=kind, num_layers=4, hidden_size=64,
                            num_attention_heads=4, seq_length=32, hidden_dropout=0.0,
                            attention_dropout=0.0, add_binary_head=kind == "bert")
    par = ParallelConfig(pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp, overlap_p2p_comm=overlap)
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=par.vpp)
    torch.manual_seed(0)
    model = build_model(model_cfg, par, vocab_size=96, bf16=False, fp16=False,
                        device=torch.device("cpu"), wrap_ddp=False)
    # gloo's isend is asynchronous on the host: mcore's deallocate_pipeline_outputs frees an
    # output right after posting its send, which is safe on a CUDA stream but lets the CPU send
    # read freed memory under load. Keep outputs alive here.
    model[0].config.deallocate_pipeline_outputs = False
    with torch.no_grad():
        for chunk in model:
            for name, p in chunk.named_parameters():
                g = torch.Generator().manual_seed(zlib.crc32(global_name(chunk, name).encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm.weight" in name
                                                                     else 0.0))
    S, mb, nmb = model_cfg.seq_length, 2, 4
    batches = bert_batches if kind == "bert" else gpt_batches
    iters = [batches(S, mb, nmb) for _ in model]
    out = get_forward_backward_func()(
        forward_step_func=family(kind).parts().train_step(torch.device("cpu")).forward_step,
        data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0], num_microbatches=nmb, seq_length=S,
        micro_batch_size=mb, forward_only=False)
    grads = {}  # tied embedding: the first and last stages each hold part of its gradient
    for chunk in model:
        for name, p in unwrap(chunk).named_parameters():
            if p.grad is not None:
                key = global_name(unwrap(chunk), name)
                grads[key] = grads.get(key, 0) + p.grad.double()
    result = {"losses": [float(v) for o in out for _, v in sorted(o.items())], "grads": grads}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        total = {}
        for r in gathered:
            for k, g in r["grads"].items():
                total[k] = total.get(k, 0) + g
        merged = {"losses": [x for r in gathered for x in r["losses"]],
                  "grads": {k: float(g.norm()) for k, g in total.items()}}
        print("RESULT " + json.dumps(merged), flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
