"""Interoperability with Hugging Face: the PEFT adapter format and merged full weights.

* :mod:`~jaxlora.interop.peft`: :func:`export_peft` / :func:`import_peft` of
  ``adapter_config.json`` + ``adapter_model.safetensors``; each method registers the
  format of its tensors (LoRA, LoRA-FA, rsLoRA, DoRA as ``LORA``, VeRA as ``VERA``).
* :mod:`~jaxlora.interop.hf`: :func:`hf_module_names` (kernel path -> torch module name for
  jaxlora's Llama and BERT) and :func:`export_merged` (``W + ΔW`` as a Hugging Face
  checkpoint).
* :mod:`~jaxlora.interop.heads`: fully trained leaves (a classifier head) as PEFT's
  ``modules_to_save``, and module maps re-keyed under a sub-tree (``prefix=``).
* :mod:`~jaxlora.interop.files`: atomic directories and safetensors I/O.
"""

from jaxlora.interop.hf import export_merged, hf_module_names
from jaxlora.interop.peft import CONFIG_NAME, WEIGHTS_NAME, export_peft, import_peft

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "export_merged",
    "export_peft",
    "hf_module_names",
    "import_peft",
]
