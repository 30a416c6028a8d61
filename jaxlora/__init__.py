"""jaxlora: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees."""

from jaxlora.adapt import AdaptError, AdaptReport, adapt, adapt_report
from jaxlora.adapters import Adapter, Method, compose, labels, merge, num_trainable, unmerge
from jaxlora.full import full
from jaxlora.lora import lora
from jaxlora.optim import optimizer
from jaxlora.targets import ALL_LINEAR, Target, TargetError
from jaxlora.train import train_step

__all__ = [
    "ALL_LINEAR",
    "AdaptError",
    "AdaptReport",
    "Adapter",
    "Method",
    "Target",
    "TargetError",
    "adapt",
    "adapt_report",
    "compose",
    "full",
    "labels",
    "lora",
    "merge",
    "num_trainable",
    "optimizer",
    "train_step",
    "unmerge",
]
