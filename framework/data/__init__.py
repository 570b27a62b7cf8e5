"""The data layer.

* `gpt`: causal-LM datasets (megatron-core's GPT datasets; embedded, indexed or mock data);
* `masked_lm`: BERT / T5 masked-LM datasets over sentence-split data;
* `builder`: what dataset families share (blends, the index cache, split and memory checks);
* `batches`: `MicroBatchIterator`, this data-parallel rank's resumable micro-batches;
* `embedded`, `indexed`, `sentences`: the arithmetic corpus, `.bin/.idx` files and the offline
  sentence splitter.

A model family names the datasets it trains on in its `ModelSpec` (framework/models/).
"""
from framework.data.batches import MicroBatchIterator, collate
from framework.data.builder import default_cache_root
from framework.data.gpt import build_datasets

__all__ = ["build_datasets", "MicroBatchIterator", "collate", "default_cache_root"]
