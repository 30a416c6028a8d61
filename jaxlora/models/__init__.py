"""Real models for jaxlora: a Llama-family decoder and a BERT encoder in Flax linen.

Each model module exposes a frozen-dataclass config, ``init_params(key, config)`` and a pure
``apply(params, input_ids, attention_mask=None, *, config, ...)``; ``loaders`` builds the
same parameter trees from Hugging Face safetensors and llama.cpp GGUF files, and tokenizers
from the files shipped with a model.
"""

from jaxlora.models import bert, llama, loaders
from jaxlora.models.bert import BertConfig
from jaxlora.models.llama import LlamaConfig
from jaxlora.models.loaders import (
    load_bert_safetensors,
    load_gguf_tokenizer,
    load_llama_gguf,
    load_llama_safetensors,
    load_tokenizer,
    to_hf_state_dict,
)

__all__ = [
    "BertConfig",
    "LlamaConfig",
    "bert",
    "llama",
    "load_bert_safetensors",
    "load_gguf_tokenizer",
    "load_llama_gguf",
    "load_llama_safetensors",
    "load_tokenizer",
    "loaders",
    "to_hf_state_dict",
]
