"""Hugging Face model interop: module names of jaxlora's models, merged full weights.

PEFT keys adapters by the torch module they adapt; jaxlora keys them by the JAX key path of
the kernel. :func:`hf_module_names` is the map between the two for jaxlora's Llama
(``LlamaForCausalLM`` names) and BERT (``BertModel`` names), scanned layers included, whose
stacked kernel maps to one module per layer. :func:`export_merged` writes ``W + ΔW`` as a
Hugging Face checkpoint. The models (and flax) load only when these are called.

A model with a head keeps its backbone in a sub-tree (``{"encoder": bert, "head": ...}``)
and, in torch, under an attribute (``BertForSequenceClassification.bert``): ``prefix`` names
the first, ``module_prefix`` the second, and the head's own entry is added by hand
(``{"head": "classifier"}``), since only the user knows what it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxlora.adapters import merge
from jaxlora.interop import files
from jaxlora.keypaths import lookup

if TYPE_CHECKING:
    from jaxlora.models.bert import BertConfig
    from jaxlora.models.llama import LlamaConfig

__all__ = ["export_merged", "hf_module_names"]


def hf_module_names(
    config: LlamaConfig | BertConfig, *, prefix: str = "", module_prefix: str = ""
) -> dict[str, str | tuple[str, ...]]:
    """Kernel path -> Hugging Face module name, for jaxlora's Llama and BERT.

    Llama kernels map to ``LlamaForCausalLM`` module names (``model.layers.0.self_attn.
    q_proj``, ``lm_head``), BERT kernels to ``BertModel`` names (``encoder.layer.0.attention.
    self.query``). With ``scan_layers`` a stacked kernel maps to the tuple of its layers'
    modules, in stack order.

    Args:
      config: A :class:`~jaxlora.models.llama.LlamaConfig` or
        :class:`~jaxlora.models.bert.BertConfig`.
      prefix: Where the model's tree sits in a wrapping tree (``"encoder"`` for
        ``{"encoder": bert, "head": ...}``): prepended to every kernel path.
      module_prefix: Where the model sits in the torch model (``"bert"`` for
        ``BertForSequenceClassification``): prepended to every module name.

    Returns:
      The module map.

    Examples:
      >>> from jaxlora.models.llama import LlamaConfig
      >>> c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2,
      ...                 num_heads=2, num_kv_heads=1)
      >>> hf_module_names(c)["layers/1/attn/q_proj/kernel"]
      'model.layers.1.self_attn.q_proj'
      >>> import dataclasses
      >>> hf_module_names(dataclasses.replace(c, scan_layers=True))["layers/mlp/up_proj/kernel"]
      ('model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj')

      A BERT under ``params["encoder"]``, exported for ``BertForSequenceClassification``:

      >>> from jaxlora.models.bert import BertConfig
      >>> b = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
      ...                intermediate_size=16)
      >>> names = hf_module_names(b, prefix="encoder", module_prefix="bert")
      >>> names["encoder/layers/0/attn/query/kernel"]
      'bert.encoder.layer.0.attention.self.query'
    """
    # The loaders' plans already pair every tensor's HF name with its jaxlora path; kernels
    # are the transposed entries. Reusing them keeps one name table per model.
    from jaxlora.models import loaders
    from jaxlora.models.bert import BertConfig
    from jaxlora.models.llama import LlamaConfig

    if isinstance(config, LlamaConfig):
        plan = loaders._llama_plan(config, "hf")
        stacked = config.scan_layers
        full = lambda n: n if n.startswith("lm_head.") else "model." + n
    elif isinstance(config, BertConfig):
        plan, stacked, full = loaders._bert_plan(config), False, lambda n: n
    else:
        raise TypeError(f"expected a LlamaConfig or BertConfig, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for t in plan:
        if t.transform is None or t.path[-1] != "kernel":
            continue  # embeddings, norms and biases are not linear modules
        module = full(t.source).removesuffix(".weight")
        if stacked and t.path[0] == "layers":
            out.setdefault("/".join(("layers", *t.path[2:])), []).append(module)
        else:
            out["/".join(t.path)] = module
    path_pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
    module_pre = module_prefix.strip(".") + "." if module_prefix.strip(".") else ""
    return {
        path_pre + k: tuple(module_pre + n for n in v) if isinstance(v, list) else module_pre + v
        for k, v in out.items()
    }


def export_merged(
    directory: str | os.PathLike,
    params: Any,
    adapters: Any,
    config: LlamaConfig | BertConfig,
    *,
    dtype: Any = None,
    prefix: str = "",
    overwrite: bool = False,
) -> Path:
    """Writes the merged model (``W + ΔW``) as a Hugging Face checkpoint.

    ``model.safetensors`` (torch layout and names, via
    :func:`jaxlora.models.loaders.to_hf_state_dict`) and ``config.json``, loadable with
    ``transformers.LlamaForCausalLM.from_pretrained`` / ``BertModel.from_pretrained``.

    Args:
      directory: The output directory.
      params: The base params.
      adapters: The adapters to merge in (any method; VeRA with its shared matrices).
      config: The model's config.
      dtype: Cast the weights to this dtype (default: keep the params' dtype).
      prefix: The sub-tree of ``params`` that holds the model (``"encoder"`` for
        ``{"encoder": bert, "head": ...}``). Everything is merged, and only that sub-tree
        is written: a head outside it is no part of a ``BertModel`` checkpoint (export it
        with :func:`jaxlora.export_peft`, or take it from ``jl.merge(params, adapters)``).
      overwrite: Replace an existing ``directory`` (only after the new one is complete).

    Returns:
      The directory.

    Raises:
      FileExistsError: If ``directory`` exists and ``overwrite`` is false.
      ValueError: If ``prefix`` names no sub-tree of ``params``.
    """
    from jaxlora.models.loaders import to_hf_state_dict

    merged = jax.jit(merge)(params, adapters)
    state = to_hf_state_dict(_subtree(merged, prefix), config)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    hf_config = dict(config.to_hf_config())
    hf_config.setdefault(
        "dtype", np.dtype(next(iter(state.values())).dtype).name if state else "float32"
    )
    with files.atomic_directory(directory, overwrite) as tmp:
        files.save_safetensors(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()


def _subtree(tree: Any, prefix: str) -> Any:
    """``tree`` at the ``"/"``-joined path ``prefix`` (the whole tree for ``""``)."""
    parts = [p for p in prefix.split("/") if p]
    try:
        return lookup(tree, parts)
    except (KeyError, TypeError, IndexError):
        top = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"prefix {prefix!r} matches nothing: params have no sub-tree there; their "
            f"top-level keys are {top}"
        ) from None
