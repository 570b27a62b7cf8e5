"""Model families and the layers they share.

* `registry.py`: the families, registered once (`model.type` -> `ModelSpec`);
* `spec.py`: `ModelSpec` / `ModelParts`, what a family provides;
* `gpt/`, `bert/`, `t5/`: one folder per family (builder and layer spec, train step and loss,
  data and tokenizer needs, config checks, FLOP formula, Hugging Face mapping);
* `layers.py`: the shared layers (attention, linears, MLP, norms); `transformer.py`: megatron-core's
  TransformerConfig and the transformer layer spec built from them; `hf_rules.py`: the shared
  machinery of Hugging Face weight mappings;
* `build.py`: `build_model` for any family; `wrappers.py`: Float16Module / DDP and `unwrap`.

This package face imports nothing, so that the config layer can import the registry (and with it
each family's light half) without torch or megatron-core.
"""
