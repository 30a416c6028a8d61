"""Delta-LoRA: the base kernels follow the change of the low-rank product, without gradients.

From step ``K = start_step`` on, every update also moves each targeted kernel by
``W_{t+1} = W_t + λ·(A_{t+1}B_{t+1} − A_tB_t)``, the change the adapter's own update just
made to the product. ``W`` needs no gradient (so training keeps LoRA's cost) and no
optimizer state. The updates telescope: ``W_t = W_0 + λ·(A_tB_t − A_KB_K)`` for ``t ≥ K``.

This is an ``optax.GradientTransformation`` over the *pair* ``(params, adapters)``: it
wraps an inner transform for the adapters and emits, for the base, ``λ·Δ`` at the targeted
kernels and zeros elsewhere (which XLA folds away), so ``optax.apply_updates`` applies it.
The base gradient it is given is ignored (pass ``None``): :func:`jaxlora.train_step` with
``update_params=True`` does the wiring and never computes it.

Write-ups differ on whether the LoRA scale ``s`` multiplies the delta; ``scale_delta``
makes it explicit. The default (``False``) follows the paper's Algorithm 1 literally,
``λ·(A'B' − AB)``; ``True`` moves ``W`` by ``λ`` times the change of the effective update
``s·AB``. The two differ only by rescaling ``λ`` by ``s``.

References:
  Zi et al., 2023, Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
  Low-Rank Matrices, https://arxiv.org/abs/2309.02411.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlora._validate import finite
from jaxlora.adapters import adapter_nodes, shared_state
from jaxlora.lora import LoraAdapter
from jaxlora.targets import path_str

__all__ = ["DeltaLoraState", "delta_lora"]


class DeltaLoraState(NamedTuple):
    """State of :func:`delta_lora`: a step count and the inner transform's state only."""

    count: jax.Array
    """Number of updates applied so far (int32 scalar)."""
    inner_state: optax.OptState
    """State of the wrapped transform (over the adapters)."""


def _pair(tree: Any, where: str) -> tuple[Any, Any]:
    if not (isinstance(tree, tuple | list) and len(tree) == 2 and isinstance(tree[1], dict)):
        got = "None" if tree is None else type(tree).__name__
        raise ValueError(
            f"delta_lora: {where} needs the pair (params, adapters), because the base kernels "
            f"move too; got {got}. Build the step with "
            "jl.train_step(loss_fn, tx, update_params=True) and tx.init((params, adapters))."
        )
    return tree[0], tree[1]


LAM_WARN = 10.0
"""``delta_lora`` warns for a ``lam`` above this."""


def check_hyperparameters(lam: Any, start_step: Any) -> float:
    """``lam`` as a float, after refusing a ``start_step`` that is not an integer ``>= 0`` or
    a ``lam`` that is not finite and ``>= 0`` (``ValueError``), and warning for a ``lam`` above
    :data:`LAM_WARN`.

    Examples:
      >>> check_hyperparameters(0.5, 100)
      0.5
    """
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral):
        raise ValueError(f"delta_lora: start_step must be an integer, got {start_step!r}")
    if start_step < 0:
        raise ValueError(f"delta_lora: start_step must be >= 0, got {start_step!r}")
    lam = finite("delta_lora", "lam", lam)
    if lam < 0:
        raise ValueError(
            f"delta_lora: lam must be >= 0 (it moves W along the adapter's own change; a "
            f"negative lam moves it against), got lam={lam!r}"
        )
    if lam > LAM_WARN:
        warnings.warn(
            f"delta_lora: lam={lam!r} is unusually large: each step moves W by more than "
            f"{LAM_WARN:g}x the adapter's own change; values of order 1 are typical",
            stacklevel=3,
        )
    return lam


def delta_lora(
    inner: optax.GradientTransformation,
    *,
    lam: float,
    start_step: int,
    scale_delta: bool = False,
) -> optax.GradientTransformation:
    """Delta-LoRA: wraps ``inner`` (for the adapters) and also moves the targeted kernels.

    Args:
      inner: The transform for the adapters, e.g. ``jl.optimizer(optax.adamw(1e-4))``; it
        sees the adapters tree exactly as it would without Delta-LoRA.
      lam: ``λ``, the multiplier of the product's change: finite and ``>= 0`` (``0`` is
        plain LoRA); values of order 1 are typical and above :data:`LAM_WARN` a warning
        is issued.
      start_step: ``K``: updates number ``K, K+1, ...`` (counting from 0) move the base.
      scale_delta: Multiply the delta by the adapter's scale ``s`` (``λ·s·(A'B' − AB)``)
        instead of the paper's ``λ·(A'B' − AB)``.

    Returns:
      An ``optax.GradientTransformation`` over ``(params, adapters)``:
      ``init((params, adapters))`` holds only ``inner``'s state (none for ``W``);
      ``update((base_grads, adapter_grads), state, (params, adapters))`` ignores
      ``base_grads`` and returns ``(base_updates, adapter_updates)``.

    Raises:
      ValueError: If ``start_step`` is not an integer ``>= 0`` or ``lam`` is not a finite
        number ``>= 0``; from ``init``/``update``, if not given the pair
        ``(params, adapters)`` (e.g. the adapters alone, or no params) or if an adapter
        rescales columns (DoRA), where the delta rule is not defined.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.delta_lora(jl.optimizer(optax.sgd(0.1)), lam=0.5, start_step=0)
      >>> step = jl.train_step(loss_fn, tx, update_params=True, donate=False)
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
      >>> state = tx.init((params, adapters))
      >>> new_params, new_adapters, state, metrics = step(params, adapters, state, batch)
      >>> bool((new_params["dense"]["kernel"] != params["dense"]["kernel"]).any())
      True

    References:
      Zi et al., 2023, https://arxiv.org/abs/2309.02411.
    """
    lam = check_hyperparameters(lam, start_step)

    def init(params: Any) -> DeltaLoraState:
        _, adapters = _pair(params, "init")
        return DeltaLoraState(jnp.zeros([], jnp.int32), inner.init(adapters))

    def update(updates, state, params=None):
        base, adapters = _pair(params, "update")
        _, grads = _pair(updates, "update's gradients")
        adapter_updates, inner_state = inner.update(grads, state.inner_state, adapters)
        new_adapters = optax.apply_updates(adapters, adapter_updates)
        old_nodes, new_nodes = adapter_nodes(adapters), adapter_nodes(new_adapters)
        old_shared, new_shared = shared_state(adapters), shared_state(new_adapters)
        active = state.count >= start_step
        seen = set()

        def base_update(kp, w):
            path = path_str(kp)
            node = old_nodes.get(path)
            if node is None:
                return jnp.zeros_like(w)
            seen.add(path)
            old = node.kernel_factors(w, old_shared)
            new = new_nodes[path].kernel_factors(w, new_shared)
            if old.col_scale is not None:
                raise ValueError(
                    f"delta_lora: the adapter at {path!r} ({type(node).__name__}) rescales "
                    "columns; the delta rule needs an additive update W + s·A@B"
                )
            # A'B' − AB as one product [A' | A]·[B'; −B]: one kernel-sized temporary, not two
            ns = len(node.layout.stack_axes)
            both = LoraAdapter(
                layout=node.layout,
                rank=2 * old.a.shape[-1],
                scale=1.0,
                a=jnp.concatenate([new.a * new.scale, old.a * old.scale], axis=-1),
                b=jnp.concatenate([new.b, -old.b], axis=ns),
            )
            # the factors carry the scale s; dividing it out again gives the paper's rule
            factor = lam if scale_delta else lam / old.scale
            change = both.delta({})
            return jnp.where(active, factor * change, 0.0).astype(w.dtype)

        base_updates = jax.tree_util.tree_map_with_path(base_update, base)
        missing = sorted(set(old_nodes) - seen)
        if missing:
            raise ValueError(f"delta_lora: params lack the targeted kernels {missing}")
        return (base_updates, adapter_updates), DeltaLoraState(state.count + 1, inner_state)

    return optax.GradientTransformation(init, update)
