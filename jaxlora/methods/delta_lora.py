"""Delta-LoRA: the base kernels follow the change of the low-rank product, without gradients.

From step ``K = start_step`` on, every update also moves each targeted kernel by
``W_{t+1} = W_t + λ·(A_{t+1}B_{t+1} − A_tB_t)``, the change the adapter's own update just
made to the product. ``W`` needs no gradient (so training keeps LoRA's cost) and no
optimizer state. The updates telescope: ``W_t = W_0 + λ·(A_tB_t − A_KB_K)`` for ``t ≥ K``.

This is a :class:`jaxlora.optim.BaseMoving` transformation: an optax transformation over
the adapters (it wraps an inner one, so the adapters see exactly the inner update) plus the
rule that moves the base, which :func:`jaxlora.train_step` applies after every update, as it
does for every optimizer (the rule of a plain optax one returns the base unchanged). Only
the targeted kernels move; every other base leaf is returned as it came in.

Write-ups differ on whether the LoRA scale ``s`` multiplies the delta; ``scale_delta``
makes it explicit. The default (``False``) follows the paper's Algorithm 1 literally,
``λ·(A'B' − AB)``; ``True`` moves ``W`` by ``λ`` times the change of the effective update
``s·AB``. The two differ only by rescaling ``λ`` by ``s``.

References:
  Zi et al., 2023, Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
  Low-Rank Matrices, https://arxiv.org/abs/2309.02411.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlora import recipes
from jaxlora.adapters import adapter_nodes, shared_state
from jaxlora.methods.lora import LoraAdapter, lora
from jaxlora.optim import BaseMoving
from jaxlora.targets import path_str

__all__ = ["DeltaLoraState", "delta_lora"]


class DeltaLoraState(NamedTuple):
    """State of :func:`delta_lora`: a step count and the inner transform's state only."""

    count: jax.Array
    """Number of updates applied so far (int32 scalar)."""
    inner_state: optax.OptState
    """State of the wrapped transform (over the adapters)."""


def delta_lora(
    inner: optax.GradientTransformation,
    *,
    lam: float,
    start_step: int,
    scale_delta: bool = False,
) -> BaseMoving:
    """Delta-LoRA: wraps ``inner`` (for the adapters) and also moves the targeted kernels.

    Args:
      inner: The transform for the adapters, e.g. ``jl.optimizer(optax.adamw(1e-4))``; it
        sees the adapters tree exactly as it would without Delta-LoRA.
      lam: ``λ``, the multiplier of the product's change.
      start_step: ``K``: updates number ``K, K+1, ...`` (counting from 0) move the base.
      scale_delta: Multiply the delta by the adapter's scale ``s`` (``λ·s·(A'B' − AB)``)
        instead of the paper's ``λ·(A'B' − AB)``.

    Returns:
      A :class:`jaxlora.optim.BaseMoving`: ``init(adapters)`` holds only ``inner``'s state
      and a step count (none for ``W``); ``update`` is ``inner``'s;
      ``move_base(params, adapters, new_adapters, state)`` returns the params with each
      targeted kernel moved by ``λ·(A'B' − AB)`` once ``state.count >= start_step``.

    Raises:
      ValueError: If ``start_step < 0``; from ``move_base``, if the params lack a targeted
        kernel or an adapter rescales columns (DoRA), where the delta rule is not defined.
      TypeError: From ``init``, if not given an adapters tree.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.delta_lora(jl.optimizer(optax.sgd(0.1)), lam=0.5, start_step=0)
      >>> step = jl.train_step(loss_fn, tx, donate=False)
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
      >>> state = tx.init(adapters)
      >>> new_params, new_adapters, state, metrics = step(params, adapters, state, batch)
      >>> bool((new_params["dense"]["kernel"] != params["dense"]["kernel"]).any())
      True

    References:
      Zi et al., 2023, https://arxiv.org/abs/2309.02411.
    """
    if start_step < 0:
        raise ValueError(f"delta_lora: start_step must be >= 0, got {start_step!r}")

    def init(adapters: Any) -> DeltaLoraState:
        adapter_nodes(adapters)  # anything but an adapters tree is a clear error here
        return DeltaLoraState(jnp.zeros([], jnp.int32), inner.init(adapters))

    def update(updates, state, params=None):
        adapter_updates, inner_state = inner.update(updates, state.inner_state, params)
        return adapter_updates, DeltaLoraState(state.count + 1, inner_state)

    def move(base, adapters, new_adapters, state):
        old_nodes, new_nodes = adapter_nodes(adapters), adapter_nodes(new_adapters)
        old_shared, new_shared = shared_state(adapters), shared_state(new_adapters)
        active = state.count >= start_step
        seen = set()

        def moved(kp, w):
            path = path_str(kp)
            node = old_nodes.get(path)
            if node is None:
                return w  # untargeted leaves come back as they came in (donated through)
            seen.add(path)
            change = _product_change(node, new_nodes[path], w, old_shared, new_shared)
            # the factors carry the scale s; dividing it out again gives the paper's rule
            factor = lam if scale_delta else lam / node.factors(w, old_shared).scale
            return (w + jnp.where(active, factor * change, 0.0).astype(w.dtype)).astype(w.dtype)

        out = jax.tree_util.tree_map_with_path(moved, base)
        missing = sorted(set(old_nodes) - seen)
        if missing:
            raise ValueError(f"delta_lora: params lack the targeted kernels {missing}")
        return out

    return BaseMoving(init, update, move)


def _product_change(old_node, new_node, w, old_shared, new_shared) -> jax.Array:
    """``s'·A'B' − s·AB`` laid out like the kernel, as one product ``[s'A' | sA]·[B'; −B]``
    (one kernel-sized temporary, not two)."""
    old = old_node.factors(w, old_shared)
    new = new_node.factors(w, new_shared)
    if old.col_scale is not None:
        raise ValueError(
            f"delta_lora: the adapter at {old_node.layout.path!r} ({type(old_node).__name__}) "
            "rescales columns; the delta rule needs an additive update W + s·A@B"
        )
    ns = len(old_node.layout.stack_axes)
    both = LoraAdapter(
        layout=old_node.layout,
        rank=2 * old.a.shape[-1],
        scale=1.0,
        a=jnp.concatenate([new.a * new.scale, old.a * old.scale], axis=-1),
        b=jnp.concatenate([new.b, -old.b], axis=ns),
    )
    return both.delta(w, {})


@recipes.register("delta_lora")
def _recipe(*, lam: float, start_step: int, scale_delta: bool = False, **kw) -> recipes.Recipe:
    """LoRA adapters trained by :func:`delta_lora` around the default optimizer."""
    delta_lora(optax.identity(), lam=lam, start_step=start_step)  # validate now, not later

    def build(make, *, learning_rate, **okw):
        inner = recipes.default_optimizer(make, learning_rate=learning_rate, **okw)
        return delta_lora(inner, lam=lam, start_step=start_step, scale_delta=scale_delta)

    return recipes.Recipe("delta_lora", lora(**kw), build, moves_base=True)
