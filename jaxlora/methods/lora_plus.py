"""LoRA+: the up-projection B learns ``ratio`` times faster than the down-projection A.

Hayou et al. show that with one learning rate for both factors, feature learning is
inefficient at large width, and that ``lr_B = ratio · lr_A`` (ratio ≈ 16) fixes it. Here
that is a label-tree ``optax.multi_transform``: the optimizer constructor is called twice,
with ``learning_rate`` and with ``ratio · learning_rate`` (a schedule is wrapped, so
``ratio`` scales every step's rate), and ``"lora_b"`` arrays get the second. Other
trainable arrays (DoRA's magnitude, VeRA's vectors) learn at the base rate; ``"frozen"``
ones get ``optax.set_to_zero()``, so no optimizer state, as in :func:`jaxlora.optimizer`.

References:
  Hayou et al., 2024, LoRA+: Efficient Low Rank Adaptation of Large Models,
  https://arxiv.org/abs/2402.12354.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxlora import recipes
from jaxlora.adapters import FROZEN, labels
from jaxlora.methods.lora import lora

__all__ = ["check_ratio", "lora_plus"]

_FAST = "lora_b"
_BASE = "base"


def check_ratio(ratio: float) -> None:
    """LoRA+'s one rule on its ratio: ``lr_B / lr_A`` must be positive."""
    if not ratio > 0:
        raise ValueError(f"lora_plus: ratio must be > 0, got ratio={ratio!r}")


def lora_plus(
    make: Callable[..., optax.GradientTransformation],
    *,
    learning_rate: float | optax.Schedule = 1e-4,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+: ``make(learning_rate=lr)`` for A, ``make(learning_rate=ratio·lr)`` for B.

    Args:
      make: An optax optimizer constructor taking ``learning_rate`` (``optax.adamw``,
        ``optax.sgd``, ``optax.lion``, ...).
      learning_rate: The learning rate of A (and of any other trainable array): a float or
        an optax schedule (a callable of the step count).
      ratio: ``lr_B / lr_A``; 16 by default, as recommended by the paper.
      **kwargs: Further arguments of ``make`` (``weight_decay``, ``b1``, ...), shared by
        both.

    Returns:
      An ``optax.GradientTransformation`` over an adapters tree (use it like the output of
      :func:`jaxlora.optimizer`).

    Raises:
      ValueError: If ``ratio <= 0``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.lora_plus(optax.sgd, learning_rate=0.25, ratio=16)
      >>> grads = jax.tree_util.tree_map(jnp.ones_like, adapters)
      >>> updates, _ = tx.update(grads, tx.init(adapters), adapters)
      >>> node = updates["dense"]["kernel"]
      >>> float(node.a[0, 0]), float(node.b[0, 0])
      (-0.25, -4.0)

    References:
      Hayou et al., 2024, https://arxiv.org/abs/2402.12354.
    """
    check_ratio(ratio)
    if callable(learning_rate):
        schedule = learning_rate

        def fast_lr(count):
            return ratio * schedule(count)
    else:
        fast_lr = ratio * learning_rate
    transforms = {
        _BASE: make(learning_rate=learning_rate, **kwargs),
        _FAST: make(learning_rate=fast_lr, **kwargs),
        FROZEN: optax.set_to_zero(),
    }

    def label_fn(adapters):
        return jax.tree_util.tree_map(
            lambda lb: lb if lb in (FROZEN, _FAST) else _BASE, labels(adapters)
        )

    return optax.multi_transform(transforms, label_fn)


@recipes.register("lora_plus")
def _recipe(*, ratio: float = 16.0, **kw: Any) -> recipes.Recipe:
    """LoRA adapters trained by :func:`lora_plus` (the ratio is checked now, not at the
    first step)."""
    check_ratio(ratio)

    def build(make, *, learning_rate, **okw):
        return lora_plus(make, learning_rate=learning_rate, ratio=ratio, **okw)

    return recipes.Recipe("lora_plus", lora(**kw), build)
