"""Full training of selected leaves: a trainable copy replaces the base leaf.

This is PEFT's ``modules_to_save``: a classifier head trained alongside LoRA, or, with
``targets=".*"``, plain full fine-tuning through the same train step as every adapter
method (which is how the experiments compare against it). The copies live under
:data:`jaxlora.adapters.FULL_KEY`, labelled ``"full"``; ``merge`` substitutes them and
``adapt`` feeds them to the function in place of the base values, so their gradient is the
ordinary weight gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.adapters import FULL_KEY, Method
from jaxlora.keypaths import nest
from jaxlora.targets import Target, TargetsLike, as_targets, match

__all__ = ["full"]


def full(*, targets: TargetsLike = ".*") -> Method:
    """Trains the selected leaves in full (a trainable copy of each).

    Unlike the low-rank methods this matches leaves of any rank (biases, norm scales) and its
    ``init`` copies the values of ``params`` (it is not shape-only).

    Args:
      targets: Regex (over ``"/"``-joined key paths), :class:`jaxlora.Target` or a list.

    Returns:
      A :class:`jaxlora.Method`.

    Raises:
      TargetError: From ``init``, if a pattern matches nothing.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))}}
      >>> adapters = jl.full(targets="head/.*").init(jax.random.key(0), params)
      >>> jl.num_trainable(adapters)
      10
    """
    specs = tuple(Target(t.pattern, min_ndim=0, exclude=t.exclude) for t in as_targets(targets))

    def init(key: jax.Array, params: Any) -> dict[str, Any]:
        del key
        # a copy, so that donating the adapters to a train step never frees the base leaf
        chosen = {
            path: jnp.array(leaf, copy=True) for path, (_, leaf) in match(params, specs).items()
        }
        return {FULL_KEY: nest(chosen)}

    return Method("full", init)
