"""jaxlora: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees."""

from jaxlora import distributed, sharding
from jaxlora.adapt import AdaptError, AdaptReport, adapt, adapt_report
from jaxlora.adapters import Adapter, Method, compose, labels, merge, num_trainable, unmerge
from jaxlora.checkpoint import CheckpointError, CheckpointManager
from jaxlora.infer import infer_targets
from jaxlora.interop import export_merged, export_peft, hf_module_names, import_peft
from jaxlora.methods.delta_lora import delta_lora
from jaxlora.methods.dora import dora
from jaxlora.methods.full import full
from jaxlora.methods.lora import lora
from jaxlora.methods.lora_fa import lora_fa
from jaxlora.methods.lora_plus import lora_plus
from jaxlora.methods.vera import vera
from jaxlora.optim import optimizer
from jaxlora.quant import QuantizedKernel, dequantize, quantize
from jaxlora.recipes import Recipe, recipe, with_full
from jaxlora.sharding import make_mesh, sharded_train_step
from jaxlora.targets import ALL_LINEAR, Target, TargetError
from jaxlora.train import train_step, trainable

__all__ = [
    "ALL_LINEAR",
    "AdaptError",
    "AdaptReport",
    "Adapter",
    "CheckpointError",
    "CheckpointManager",
    "Method",
    "QuantizedKernel",
    "Recipe",
    "Target",
    "TargetError",
    "adapt",
    "adapt_report",
    "compose",
    "delta_lora",
    "dequantize",
    "distributed",
    "dora",
    "export_merged",
    "export_peft",
    "full",
    "hf_module_names",
    "import_peft",
    "infer_targets",
    "labels",
    "lora",
    "lora_fa",
    "lora_plus",
    "make_mesh",
    "merge",
    "num_trainable",
    "optimizer",
    "quantize",
    "recipe",
    "sharded_train_step",
    "sharding",
    "train_step",
    "trainable",
    "unmerge",
    "vera",
    "with_full",
]
