"""Experiment configuration: frozen dataclasses, written as code in ``experiments/configs``."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any

NONFINITE_POLICIES = ("stop", "skip", "warn")
"""What the launcher does at a step whose loss, gradients or updates are not finite."""


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """One method to train in an experiment."""

    name: str
    """A ``jaxlora.method`` registry name, or ``full`` (full fine-tuning), ``linear_probe``
    (the head only) or ``untrained`` (no training: the baseline)."""
    learning_rate: float = 1e-3
    """Peak learning rate (linear warm-up, then cosine decay to 10%)."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the method (``rank``, ``alpha``, ``targets``, ``lam``, ...)."""
    label: str | None = None
    """Name in tables and plots; defaults to ``name``."""

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; ``get_config()`` in a configs module returns one."""

    name: str
    """Experiment name; results go to ``<out>/<name>/``."""
    task: str
    """``classification`` (MiniLM + head on fortune topics) or ``causal_lm`` (SmolLM2)."""
    methods: tuple[MethodConfig, ...]
    """The methods to compare, in table order."""
    steps: int
    """Optimizer steps per method."""
    batch_size: int
    """Global batch size (sharded over the mesh's ``data``/``fsdp`` axes)."""
    max_length: int
    """Tokens per example (longer texts are truncated)."""
    buckets: tuple[int, ...] = (16, 32, 48, 64)
    """Padded lengths of the batches (capped at ``max_length``): each batch of similar-length
    examples is padded to the next of these only, so a step compiles once per bucket
    (``jaxlora.data.BucketedBatches``). ``()``: every batch padded to ``max_length``."""
    eval_batch_size: int = 64
    """Examples per evaluation batch (forward only, so larger than ``batch_size`` pays)."""
    dropout: bool = True
    """Train with the model's own dropout (hidden and attention, at the Hugging Face
    config's rates) and each method's low-rank dropout, from a per-step key
    ``fold_in(key(seed), step)``; evaluation never drops. False: deterministic training."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of data order, split and adapter init."""
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    """Mesh axis sizes over ``data``, ``fsdp``, ``tensor``; -1 takes the remaining devices."""
    rules: str = "dp"
    """Partition rules of the base params: ``dp`` (replicated) for every task; ``fsdp``,
    ``tp``, ``fsdp_tp`` for the Llama task (``jaxlora.models.llama.partition_rules``)."""
    max_train_examples: int | None = None
    """Cap on training examples (None: all): a random subset, drawn with the split's seed,
    so every class keeps about its share."""
    max_eval_examples: int | None = None
    """Cap on evaluation examples (None: all), a random subset as above."""
    eval_split: str = "validation"
    """What to evaluate on: ``validation`` (the held-out split), or ``dev``: training
    examples left out by ``max_train_examples`` (capped by ``max_eval_examples``), so that a
    learning-rate sweep (``experiments.sweep``) never sees the validation set."""
    checkpoint_every: int = 0
    """Save an adapter checkpoint every this many steps (0: only at the end)."""
    generate_prompts: tuple[str, ...] = ()
    """causal_lm only: prompts whose greedy continuations are shown before and after."""
    base_quantization: str | None = None
    """causal_lm only: keep the frozen base quantized (QLoRA): ``"nf4"`` (NF4, blocks of 64,
    double-quantized scales, from the float weights) or ``"q4_1"`` (the GGUF file's own
    Q4_1 codes). None: a float32 base."""
    on_nonfinite: str = "stop"
    """At a step whose loss, gradients or updates are NaN/inf: ``stop`` (raise, before any
    checkpoint of it is written), ``skip`` (the step leaves the state unchanged; training
    goes on) or ``warn`` (train on, but write no further checkpoints: they would hold
    NaNs and retention would delete the finite ones)."""


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (the few forms configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_matches, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, origin or hint)


def check_types(config: Any, where: str = "") -> None:
    """Checks every field of a config dataclass (and of nested ones) against its annotation.

    Raises:
      TypeError: Naming the first field whose value has the wrong type.

    Examples:
      >>> check_types(MethodConfig("lora", learning_rate="1e-3"))
      Traceback (most recent call last):
        ...
      TypeError: MethodConfig.learning_rate must be float, got '1e-3' (str)
    """
    hints = typing.get_type_hints(type(config))
    name = where or type(config).__name__
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if not _matches(value, hint):
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise TypeError(
                f"{name}.{field.name} must be {shown}, got {value!r} ({type(value).__name__})"
            )
        nested = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(nested):
            if dataclasses.is_dataclass(v):
                at = f"{name}.{field.name}[{i}]" if isinstance(value, tuple) else field.name
                check_types(v, at)


DEFAULT_LEARNING_RATES = {
    "lora": 1e-3,
    "lora_fa": 1e-3,
    "vera": 1e-2,
    "delta_lora": 1e-3,
    "lora_plus": 2.5e-4,
    "dora": 1e-3,
}
"""The usual peak rates of :func:`adapter_methods` (LoRA+'s is that of A)."""


def adapter_methods(
    *,
    rank: int,
    vera_rank: int,
    targets: str = "all-linear",
    delta_start: int = 10,
    lora_dropout: float = 0.0,
    learning_rates: dict[str, float] | None = None,
) -> tuple[MethodConfig, ...]:
    """The adapter methods every experiment compares, with their usual learning rates.

    LoRA-family methods use ``alpha = 2·rank``; LoRA+ starts A at a quarter of LoRA's rate,
    so B runs at 4x LoRA's (ratio 16, as the paper recommends); VeRA's vectors need a ~10x
    larger rate than LoRA (its paper's finding). ``learning_rates`` overrides some of
    :data:`DEFAULT_LEARNING_RATES` (e.g. with a sweep's choices). ``lora_dropout`` is
    PEFT's dropout on the low-rank branch's input, for the methods that have one (LoRA,
    LoRA-FA, LoRA+; Delta-LoRA's paper drops it, DoRA and VeRA here have none).
    """
    lr = {**DEFAULT_LEARNING_RATES, **(learning_rates or {})}
    lora = {"rank": rank, "alpha": 2 * rank, "targets": targets}
    dropped = {**lora, "lora_dropout": lora_dropout} if lora_dropout else lora
    return (
        MethodConfig("lora", learning_rate=lr["lora"], kwargs=dropped),
        MethodConfig("lora_fa", learning_rate=lr["lora_fa"], kwargs=dropped),
        MethodConfig(
            "vera", learning_rate=lr["vera"], kwargs={"rank": vera_rank, "targets": targets}
        ),
        MethodConfig(
            "delta_lora",
            learning_rate=lr["delta_lora"],
            kwargs={**lora, "lam": 0.5, "start_step": delta_start},
        ),
        MethodConfig("lora_plus", learning_rate=lr["lora_plus"], kwargs={**dropped, "ratio": 16.0}),
        MethodConfig("dora", learning_rate=lr["dora"], kwargs=lora),
    )


def load(name: str, variant: str = "local") -> ExperimentConfig:
    """Imports ``experiments.configs.<name>`` and calls its ``get_config(variant)``.

    Raises:
      ValueError: For an unknown config module or variant, naming the choices.
    """
    try:
        module = importlib.import_module(f"experiments.configs.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(
            f"unknown experiment config {name!r} (no experiments/configs/{name}.py)"
        ) from e
    return module.get_config(variant)
