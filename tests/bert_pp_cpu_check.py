"""BERT through megatron-core's 1F1B pipeline schedule on CPU (gloo): PP=2 must give the losses
(masked LM and sentence order) and per-parameter gradient norms of PP=1. A diagnostic beside
tests/pipeline_cpu_worker.py (same CUDA-to-CPU redirects), not collected by pytest:

    torchrun --nproc-per-node 1 tests/bert_pp_cpu_check.py 1 > pp1.txt
    torchrun --nproc-per-node 2 tests/bert_pp_cpu_check.py 2 > pp2.txt   # compare the RESULT lines

2026-11-27 (CPU, gloo): 4 micro-batches, binary head on, a padded sample: PP1 and PP2 losses
equal to all printed digits and every gradient norm equal (max relative difference 0.0).
"""
import json, os, re, sys, zlib
import torch
import torch.distributed as dist
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_cpu_worker  # noqa: E402,F401  (redirects mcore's CUDA calls to the CPU)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from framework.config import ModelConfig, ParallelConfig



def global_name(chunk, name):
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return "embedding.word_embeddings.weight" if name == "output_layer.weight" else name
    layer = chunk.encoder.layers[int(m.group(1))]
    return f"encoder.layers.{layer.layer_number - 1}.{m.group(2)}"



def main():
    pp = int(sys.argv[1])
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from framework.models import build_model, unwrap
    from framework.training.step import BertTrainStep
    mc = ModelConfig(name="t", type="bert", num_layers=4, hidden_size=64, num_attention_heads=4,
                     seq_length=32, hidden_dropout=0.0, attention_dropout=0.0, add_binary_head=True)
    par = ParallelConfig(pipeline_model_parallel_size=pp)
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp)
    model = build_model(mc, par, vocab_size=96, bf16=False, fp16=False, device=torch.device("cpu"), wrap_ddp=False)
    model[0].config.deallocate_pipeline_outputs = False  # see pipeline_cpu_worker.py
    with torch.no_grad():
        for chunk in model:
            for name, p in chunk.named_parameters():
                g = torch.Generator().manual_seed(zlib.crc32(global_name(chunk, name).encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm.weight" in name else 0.0))
    S, mb, nmb = 32, 2, 4
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(5, 90, (nmb, mb, S), generator=gen)
    def batches():
        for i, t in enumerate(toks):
            pad = torch.ones(mb, S, dtype=torch.long); pad[0, 20:] = -1
            lm = (torch.rand(mb, S, generator=torch.Generator().manual_seed(i)) < 0.2).long()
            yield {"text": t, "types": (torch.arange(S) >= 10).long().expand(mb, S), "labels": t,
                   "is_random": torch.tensor([0, 1]), "padding_mask": pad, "loss_mask": lm.float()}
    out = get_forward_backward_func()(forward_step_func=BertTrainStep(torch.device("cpu")).forward_step,
        data_iterator=batches(), model=model[0], num_microbatches=nmb, seq_length=S, micro_batch_size=mb, forward_only=False)
    grads = {}
    for chunk in model:
        for name, p in unwrap(chunk).named_parameters():
            if p.grad is not None:
                key = global_name(unwrap(chunk), name)
                grads[key] = grads.get(key, 0) + p.grad.double()
    res = {"losses": [[float(o["lm loss"]), float(o.get("sop loss", -1))] for o in out], "grads": grads}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        total = {}
        for r in gathered:
            for k, g in r["grads"].items():
                total[k] = total.get(k, 0) + g
        print("RESULT", json.dumps({"losses": [x for r in gathered for x in r["losses"]],
              "grads": {k: round(float(g.norm()), 6) for k, g in sorted(total.items())}}))
    ps.destroy_model_parallel(); dist.destroy_process_group()
if __name__ == "__main__":
    main()
