"""T5: megatron-core's `T5Model` (encoder-decoder) with our layer specs and relative position
bias, trained on span corruption.

* `model.py`: the builder (`T5`, `CrossAttention` with grouped key/value heads);
* `step.py`: `T5TrainStep`, decoder cross-entropy over the target positions;
* `data.py`: megatron-core's T5 masked-LM datasets; the tokenizer's sentinels;
* `config.py`: T5's config checks and FLOP formula (encoder + decoder with cross-attention);
* `hf_t5.py`, `hf_mt5.py`: Hugging Face T5 (v1.0, v1.1) and mT5 weights and config.

`SPEC` registers all of it (framework/models/registry.py).
"""
from framework.models.spec import ModelParts, ModelSpec
from framework.models.t5.config import check_model, check_run, flops_per_token


def _load() -> ModelParts:
    from framework.models.t5 import data, hf_mt5, hf_t5, model, step
    from framework.tokenizer import embedded_mlm_tokenizer

    return ModelParts(build=model.build_t5, train_step=step.T5TrainStep, datasets=data.datasets,
                      embedded_tokenizer=embedded_mlm_tokenizer,
                      check_tokenizer=data.check_tokenizer, hf={"t5": hf_t5, "mt5": hf_mt5})


SPEC = ModelSpec(
    name="t5",
    cpu_model="t5_tiny",
    title="T5",
    load=_load,
    position_embeddings=("relative", "learned_absolute", "rope"),
    options=("decoder_seq_length", "encoder_num_layers", "scale_decoder_output", "lm_head_bias"),
    data_types=("embedded", "indexed"),
    check_model=check_model,
    check_run=check_run,
    flops_per_token=flops_per_token,
    encoder_decoder=True,
    hf_types=("t5", "mt5"),
)
