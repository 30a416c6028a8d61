"""A jitted train step that differentiates the adapters only.

``train_step(loss_fn, tx)`` builds ``step(params, adapters, opt_state, batch)`` where
``loss_fn(params, batch)`` is written for ordinary (merged) parameters. The step runs it
through :func:`jaxlora.adapt`, takes the gradient with respect to the *trainable* adapter
arrays only (frozen ones are closed over, so their gradients are never computed), applies
``tx`` and donates the buffers. ``params`` is a frozen input: it gets no gradient and no
optimizer state.

Every method has the same step, ``(params, adapters, opt_state, batch) -> (params, adapters,
opt_state, metrics)``. The params come back as :func:`jaxlora.optim.move_base` leaves them:
moved by an optimizer that moves the base (Delta-LoRA), unchanged otherwise. They are
donated, so an unchanged leaf is the same buffer going out as coming in (XLA aliases the
output to the donated input: no copy), and the caller simply rebinds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.adapt import adapt
from jaxlora.adapters import FROZEN, labels
from jaxlora.optim import move_base

__all__ = ["train_step"]


def split_trainable(tree: Any, adapters: Any) -> tuple[Any, Any]:
    """Splits ``tree`` (structured like ``adapters``) into (trainable, frozen) parts.

    Each part has ``None`` where the other holds an array; :func:`join_trainable` inverts it.
    """
    lab = labels(adapters)
    trainable = jax.tree_util.tree_map(lambda x, lb: None if lb == FROZEN else x, tree, lab)
    frozen = jax.tree_util.tree_map(lambda x, lb: x if lb == FROZEN else None, tree, lab)
    return trainable, frozen


def join_trainable(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_trainable`."""
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    strict: bool = False,
    donate: bool = True,
    jit: bool = True,
) -> Callable[..., tuple[Any, Any, Any, dict[str, Any]]]:
    """Builds ``step(params, adapters, opt_state, batch) -> (params, adapters, opt_state,
    metrics)``, the one train step of every method.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux_dict)`` with
        ``has_aux``), written for plain parameters.
      tx: The optimizer over the adapters, usually ``jaxlora.optimizer(optax.adamw(...))``
        so that frozen arrays hold no state; ``opt_state = tx.init(adapters)``. One that
        also moves the base (:func:`jaxlora.delta_lora`) moves it here.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` (a dict) is merged into
        the metrics.
      strict: Passed to :func:`jaxlora.adapt`: raise rather than merge a kernel.
      donate: Donate the params, adapters and optimizer state buffers to the step (use the
        returned ones).
      jit: Return the step jitted (the default) or as a plain function to compose.

    Returns:
      The step function. ``metrics`` holds ``loss`` and ``grad_norm`` (of trainable arrays).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.optimizer(optax.sgd(0.1))
      >>> step = jl.train_step(loss_fn, tx)
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
      >>> params, adapters, opt_state, m0 = step(params, adapters, tx.init(adapters), batch)
      >>> params, adapters, opt_state, m1 = step(params, adapters, opt_state, batch)
      >>> float(m0["loss"]), bool(m1["loss"] < m0["loss"])  # B starts at 0: base loss first
      (1.0, True)
    """
    adapted = adapt(loss_fn, strict=strict)

    def step(params, adapters, opt_state, batch):
        trainable, frozen = split_trainable(adapters, adapters)

        def objective(tr):
            return adapted(params, join_trainable(tr, frozen), batch)

        if has_aux:
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        else:
            loss, grads = jax.value_and_grad(objective)(trainable)
            aux = {}
        # frozen arrays get zeros here only to satisfy optax's tree structure; set_to_zero
        # discards them and XLA removes the dead zeros
        full = join_trainable(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        updates, new_state = tx.update(full, opt_state, adapters)
        upd_tr, _ = split_trainable(updates, adapters)
        new = join_trainable(optax.apply_updates(trainable, upd_tr), frozen)
        params = move_base(tx, params, adapters, new, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return params, new, new_state, metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())
