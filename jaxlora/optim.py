"""Trainability as optax: label trees over adapters, frozen leaves without optimizer state.

Every array of an adapters tree carries a label (``"lora_a"``, ``"lora_b"``, ``"frozen"``,
...; see :func:`jaxlora.labels`). :func:`optimizer` turns any optax transform (or one per
label) into an ``optax.multi_transform`` over those labels in which ``"frozen"`` maps to
``optax.set_to_zero()``: frozen arrays (LoRA-FA's A, VeRA's shared matrices) get no
optimizer state and never move. The label tree is computed from the adapters passed to
``init``/``update``, so the transform can be built before any adapter exists.

Every optimizer updates the adapters tree only. One that also moves the frozen base
(Delta-LoRA) is a :class:`BaseMoving` transformation: an optax transformation over the
adapters plus a ``move_base`` rule, which :func:`move_base` applies (and which is the
identity for every other optimizer). That is what gives every method one train step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

from jaxlora.adapters import FROZEN, labels

__all__ = ["BaseMoving", "move_base", "optimizer"]

_TRAINABLE = "trainable"


def optimizer(
    tx: optax.GradientTransformation | Mapping[str, optax.GradientTransformation],
) -> optax.GradientTransformation:
    """Wraps ``tx`` so that it updates only the trainable arrays of an adapters tree.

    Args:
      tx: One transform for every trainable array, or a mapping from label (``"lora_a"``,
        ``"lora_b"``, ...) to transform, e.g. to give each matrix its own learning rate.

    Returns:
      An ``optax.GradientTransformation`` over the whole adapters tree; ``"frozen"`` arrays
      get ``optax.set_to_zero()`` (no state, no movement).

    Raises:
      ValueError: If ``tx`` is a mapping that names ``"frozen"``, or (from ``init``) that
        lacks a label present in the adapters.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.optimizer(optax.adam(1e-3))
      >>> state = tx.init(adapters)
      >>> sum(x.size for x in jax.tree_util.tree_leaves(state)) - 1  # mu, nu; minus count
      28
    """
    if isinstance(tx, Mapping):
        if FROZEN in tx:
            raise ValueError(
                f"optimizer: label {FROZEN!r} is reserved for arrays that are never trained"
            )
        transforms = dict(tx)
        single = False
    else:
        transforms = {_TRAINABLE: tx}
        single = True
    known = set(transforms)
    transforms[FROZEN] = optax.set_to_zero()

    def label_fn(adapters):
        def relabel(lb: str) -> str:
            if lb == FROZEN:
                return FROZEN
            if single:
                return _TRAINABLE
            if lb not in known:
                raise ValueError(
                    f"optimizer: adapters have arrays labelled {lb!r} but the transform "
                    f"mapping only has {sorted(known)}"
                )
            return lb

        return jax.tree_util.tree_map(relabel, labels(adapters))

    return optax.multi_transform(transforms, label_fn)


class BaseMoving(NamedTuple):
    """An optax transformation over the adapters that also moves the base params.

    ``init`` and ``update`` are those of an ``optax.GradientTransformation`` over the
    adapters tree; ``move_base(params, adapters, new_adapters, state) -> params`` is called
    after each update with the state *before* it, and must not need a gradient or state
    for the base.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]
    move_base: Callable[[Any, Any, Any, Any], Any]


def move_base(tx: Any, params: Any, adapters: Any, new_adapters: Any, state: Any) -> Any:
    """The base params after an update of ``adapters`` to ``new_adapters`` by ``tx``.

    ``params`` themselves (the same object) unless ``tx`` is :class:`BaseMoving`.

    Examples:
      >>> import optax
      >>> params = {"w": 1.0}
      >>> move_base(optax.sgd(0.1), params, {}, {}, None) is params
      True
    """
    rule = getattr(tx, "move_base", None)
    return params if rule is None else rule(params, adapters, new_adapters, state)
