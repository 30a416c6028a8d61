"""Recipes: methods picked by name, with their optimizer, for experiments driven by configs.

A fine-tuning method is two things: the adapters it adds (a :class:`jaxlora.Method`) and how
they are optimised (LoRA+ is plain LoRA adapters with a per-matrix learning rate, Delta-LoRA
is LoRA adapters with an optimizer that also moves the base kernels). A :class:`Recipe`
bundles both, and every method module registers its recipes here (:func:`register`), so an
experiment loop is the same for every name in :func:`names` (``jaxlora.methods.NAMES``)::

    recipe = jl.recipe("delta_lora", rank=8, lam=0.5, start_step=100)
    params, adapters = recipe.prepare(key, params)      # PiSSA replaces the base here
    tx = recipe.optimizer(optax.adamw, learning_rate=1e-4)
    opt_state = tx.init(adapters)
    step = jl.train_step(loss_fn, tx)                    # one signature for every method
    params, adapters, opt_state, metrics = step(params, adapters, opt_state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from jaxlora.adapters import Method
from jaxlora.optim import optimizer

__all__ = ["Recipe", "default_optimizer", "names", "recipe", "register"]

OptimizerFn = Callable[..., optax.GradientTransformation]


def default_optimizer(
    make: OptimizerFn, *, learning_rate: Any, **kwargs: Any
) -> optax.GradientTransformation:
    """``jaxlora.optimizer(make(learning_rate=..., **kwargs))``: one transform for every
    trainable array, none for the frozen ones. The optimizer of most recipes.

    Examples:
      >>> import optax
      >>> tx = default_optimizer(optax.adamw, learning_rate=1e-3, weight_decay=0.0)
    """
    return optimizer(make(learning_rate=learning_rate, **kwargs))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method picked by name: its adapters and the optimizer it trains them with."""

    name: str
    """The registry name (a member of :func:`names`), or an experiment's own name."""
    method: Method
    """Builds the adapters tree: ``method.prepare(key, params)`` / ``method.init``."""
    build_optimizer: OptimizerFn = default_optimizer
    """``build_optimizer(make, learning_rate=..., **kw)``; see :meth:`optimizer`."""
    moves_base: bool = False
    """Whether the optimizer also moves the base kernels (Delta-LoRA), so that a checkpoint
    must store them (``jl.CheckpointManager(..., store_base=recipe.moves_base)``)."""

    def init(self, key: Any, params: Any) -> dict[str, Any]:
        """The adapters tree (use :meth:`prepare` to start training: PiSSA needs its base)."""
        return self.method.init(key, params)

    def prepare(self, key: Any, params: Any) -> tuple[Any, dict[str, Any]]:
        """``(base_params, adapters)`` to train with; see :meth:`jaxlora.Method.prepare`."""
        return self.method.prepare(key, params)

    def optimizer(
        self, make: OptimizerFn = optax.adamw, *, learning_rate: Any, **kwargs: Any
    ) -> optax.GradientTransformation:
        """The method's optimizer around ``make`` (an optax constructor) and its arguments."""
        return self.build_optimizer(make, learning_rate=learning_rate, **kwargs)


_REGISTRY: dict[str, Callable[..., Recipe]] = {}


def register(name: str) -> Callable[[Callable[..., Recipe]], Callable[..., Recipe]]:
    """Decorator: registers ``factory(**hyper_parameters) -> Recipe`` under ``name``.

    Each method module registers its own recipes when it is imported.
    """

    def deco(factory: Callable[..., Recipe]) -> Callable[..., Recipe]:
        if name in _REGISTRY:
            raise ValueError(f"recipe {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> tuple[str, ...]:
    """Every registered recipe name, in registration order."""
    return tuple(_REGISTRY)


def recipe(name: str, **kwargs: Any) -> Recipe:
    """Looks up a method by name and configures it, with its optimizer.

    Args:
      name: One of :func:`names`: ``"lora"``, ``"rslora"``, ``"pissa"``, ``"lora_fa"``,
        ``"vera"``, ``"dora"``, ``"lora_plus"``, ``"delta_lora"``.
      **kwargs: The method's hyper-parameters: those of its adapter factory (``rank``,
        ``alpha``, ``targets``, ...), plus ``ratio`` for ``"lora_plus"`` and ``lam``,
        ``start_step``, ``scale_delta`` for ``"delta_lora"`` (which are
        :func:`jaxlora.lora` adapters with :func:`jaxlora.lora_plus` /
        :func:`jaxlora.delta_lora` optimizers).

    Returns:
      A :class:`Recipe`.

    Raises:
      ValueError: For an unknown name (the message lists :func:`names`) or a bad value.
      TypeError: For an unknown or missing hyper-parameter.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((8, 8))}}
      >>> r = jl.recipe("lora_plus", rank=2, targets=".*kernel", ratio=4)
      >>> params, adapters = r.prepare(jax.random.key(0), params)
      >>> tx = r.optimizer(optax.sgd, learning_rate=0.1)
      >>> r.name, jl.num_trainable(adapters)
      ('lora_plus', 32)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {list(names())}")
    return _REGISTRY[name](**kwargs)
