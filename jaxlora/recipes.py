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

Any recipe also trains chosen leaves in full beside its adapters (PEFT's
``modules_to_save``): ``jl.recipe("lora", ..., train="head/.*")`` for a classifier head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.adapters import FULL_KEY, Method, _deep_update, adapter_nodes, full_leaves
from jaxlora.keypaths import nest
from jaxlora.optim import optimizer
from jaxlora.targets import Target, TargetError, TargetsLike, as_targets, match

__all__ = ["Recipe", "default_optimizer", "names", "recipe", "register", "with_full"]

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

    def init(self, key: Any, params: Any, like: Any = None) -> dict[str, Any]:
        """The adapters tree (use :meth:`prepare` to start training: PiSSA needs its base).

        ``like=(fn, *args)`` infers kernel axes from use (:func:`jaxlora.infer_targets`).
        """
        if like is None:
            return self.method.init(key, params)
        return self.method.init(key, params, like=like)

    def prepare(self, key: Any, params: Any, like: Any = None) -> tuple[Any, dict[str, Any]]:
        """``(base_params, adapters)`` to train with; see :meth:`jaxlora.Method.prepare`."""
        return self.method.prepare(key, params, like=like)

    def optimizer(
        self, make: OptimizerFn = optax.adamw, *, learning_rate: Any, **kwargs: Any
    ) -> optax.GradientTransformation:
        """The method's optimizer around ``make`` (an optax constructor) and its arguments."""
        return self.build_optimizer(make, learning_rate=learning_rate, **kwargs)


def with_full(method: Method, train: TargetsLike) -> Method:
    """``method`` with the leaves ``train`` selects trained in full beside its adapters.

    PEFT's ``modules_to_save``: a classifier head (or a norm, an embedding) trained as a
    whole while the backbone gets the method's low-rank adapters. The result equals
    ``jaxlora.compose(method, jaxlora.full(targets=train))`` (the same PRNG keys, so the
    same adapters), with errors that name ``train``. Its trained copies are labelled
    ``"full"``.

    Args:
      method: Any :class:`jaxlora.Method`.
      train: Regex over ``"/"``-joined key paths (leaves of any rank), a
        :class:`jaxlora.Target` or a list of them.

    Returns:
      A :class:`jaxlora.Method` named ``"<method>+full"``.

    Raises:
      TargetError: From ``init``, if a ``train`` pattern matches no leaf (the message lists
        the paths seen).
      ValueError: From ``init``, if ``train`` selects a leaf that ``method`` adapts (the
        message names the paths): a leaf is trained in full or adapted, not both.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"body": {"kernel": jnp.ones((8, 8))},
      ...           "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros((2,))}}
      >>> method = jl.with_full(jl.lora(rank=2, targets="body/kernel"), train="head/.*")
      >>> adapters = method.init(jax.random.key(0), params)
      >>> jl.num_trainable(adapters)  # 2 * 2 * 8 (LoRA) + 8 * 2 + 2 (the head)
      50
    """
    specs = tuple(Target(t.pattern, min_ndim=0, exclude=t.exclude) for t in as_targets(train))
    shown = train if isinstance(train, str) else [t.pattern for t in specs]

    def init(key: jax.Array, params: Any, like: Any = None) -> dict[str, Any]:
        try:
            chosen = match(params, specs)
        except TargetError as e:
            raise TargetError(f"train={shown!r}: {e}") from e
        # the key jaxlora.compose(method, jaxlora.full(...)) gives the method
        k_method, _ = jax.random.split(key)
        if like is None:
            tree = method.init(k_method, params)
        else:
            tree = method.init(k_method, params, like=like)
        taken = {*adapter_nodes(tree), *full_leaves(tree)}
        clash = sorted(p for p in chosen if p in taken)
        if clash:
            raise ValueError(
                f"train={shown!r} selects leaves that {method.name!r} already adapts: "
                f"{clash}; a leaf is trained in full or adapted, not both (narrow train, or "
                "exclude them from the method's targets)"
            )
        # copies, so that donating the adapters to a train step never frees a base leaf
        copies = {p: jnp.array(x, copy=True) for p, (_, x) in chosen.items()}
        out = dict(tree)
        _deep_update(out, {FULL_KEY: nest(copies)})
        return out

    return Method(f"{method.name}+full", init, method.replaces_base)


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


def recipe(name: str, *, train: TargetsLike | None = None, **kwargs: Any) -> Recipe:
    """Looks up a method by name and configures it, with its optimizer.

    Args:
      name: One of :func:`names`: ``"lora"``, ``"rslora"``, ``"pissa"``, ``"lora_fa"``,
        ``"vera"``, ``"dora"``, ``"lora_plus"``, ``"delta_lora"``.
      train: Leaves to train in full beside the adapters (PEFT's ``modules_to_save``),
        e.g. ``"head/.*"`` for a classifier head: a regex over key paths, a
        :class:`jaxlora.Target` or a list (see :func:`with_full`). The recipe's optimizer
        trains them (LoRA+ at the base learning rate).
      **kwargs: The method's hyper-parameters: those of its adapter factory (``rank``,
        ``alpha``, ``targets``, ...), plus ``ratio`` for ``"lora_plus"`` and ``lam``,
        ``start_step``, ``scale_delta`` for ``"delta_lora"`` (which are
        :func:`jaxlora.lora` adapters with :func:`jaxlora.lora_plus` /
        :func:`jaxlora.delta_lora` optimizers).

    Returns:
      A :class:`Recipe`.

    Raises:
      ValueError: For an unknown name (the message lists :func:`names`) or a bad value;
        from ``init``, for a ``train`` pattern that matches nothing (a
        :class:`jaxlora.TargetError`) or selects an adapted leaf.
      TypeError: For an unknown or missing hyper-parameter.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((8, 8))}}
      >>> r = jl.recipe("lora_plus", rank=2, targets=".*kernel", ratio=4)
      >>> params, adapters = r.prepare(jax.random.key(0), params)
      >>> tx = r.optimizer(optax.sgd, learning_rate=0.1)
      >>> r.name, jl.num_trainable(adapters)
      ('lora_plus', 32)

      With a classifier head trained in full beside the adapters:

      >>> params = {"dense": {"kernel": jnp.ones((8, 8))}, "head": {"kernel": jnp.ones((8, 3))}}
      >>> r = jl.recipe("lora", rank=2, targets="dense/kernel", train="head/.*")
      >>> sorted(set(jax.tree_util.tree_leaves(jl.labels(r.init(jax.random.key(0), params)))))
      ['full', 'lora_a', 'lora_b']
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {list(names())}")
    made = _REGISTRY[name](**kwargs)
    if train is None:
        return made
    return dataclasses.replace(made, method=with_full(made.method, train))
