"""BERT: megatron-core's `BertModel` with our layer spec (bidirectional self-attention), masked-LM
and (with `model.add_binary_head`) sentence-order losses.

* `model.py`: the builder (`Bert`: mcore's BertModel without TE/apex);
* `step.py`: `BertTrainStep`, masked-LM cross-entropy (+ sentence-order loss);
* `data.py`: megatron-core's BERT masked-LM datasets; the tokenizer's [CLS]/[SEP]/[MASK];
* `config.py`: BERT's config checks;
* `hf_megatron_bert.py`: Hugging Face Megatron-BERT weights and config.

`SPEC` registers all of it (framework/models/registry.py).
"""
from framework.models.bert.config import check_model
from framework.models.spec import ModelParts, ModelSpec


def _load() -> ModelParts:
    from framework.models.bert import data, hf_megatron_bert, model, step
    from framework.tokenizer import embedded_mlm_tokenizer

    return ModelParts(build=model.build_bert, train_step=step.BertTrainStep,
                      datasets=data.datasets, embedded_tokenizer=embedded_mlm_tokenizer,
                      check_tokenizer=data.check_tokenizer,
                      hf={"megatron-bert": hf_megatron_bert})


SPEC = ModelSpec(
    name="bert",
    cpu_model="bert_tiny",
    title="BERT",
    load=_load,
    position_embeddings=("learned_absolute", "rope"),
    options=("add_binary_head",),
    data_types=("embedded", "indexed"),
    check_model=check_model,
    hf_types=("megatron-bert",),
)
