"""LoRA-FA: LoRA with the down-projection A frozen at its random init; only B trains.

The update is LoRA's ``W + s·A@B``, but A carries the ``"frozen"`` label, so
:func:`jaxlora.optimizer` gives it no optimizer state and :func:`jaxlora.train_step` closes
over it instead of differentiating it. That is where the memory saving comes from: with A
a constant, the backward of ``s·(x@A)@B`` needs only the ``r``-wide ``x@A`` (for B's
gradient), never the ``d_in``-wide input ``x`` (which A's gradient ``xᵀ·dh`` would need).

References:
  Zhang et al., 2023, LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
  Models Fine-tuning, https://arxiv.org/abs/2308.03303.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax.numpy as jnp

from jaxlora import recipes
from jaxlora.adapters import FROZEN, Method, register_adapter
from jaxlora.methods.lora import LoraAdapter, init_lora, lora_scale
from jaxlora.targets import TargetsLike

__all__ = ["LoraFaAdapter", "lora_fa"]


@register_adapter
class LoraFaAdapter(LoraAdapter):
    """LoRA factors of one kernel whose ``a`` is frozen (stacked along the stack axes)."""

    LABELS: ClassVar[dict[str, str]] = {"a": FROZEN, "b": "lora_b"}


def lora_fa(
    *,
    rank: int = 8,
    alpha: float = 8.0,
    targets: TargetsLike = "all-linear",
    rslora: bool = False,
    dtype: Any = jnp.float32,
) -> Method:
    """LoRA-FA: ``W + (alpha/r)·A@B`` with a random, frozen ``A`` and a trainable ``B``.

    Args:
      rank: The rank ``r`` of the update.
      alpha: The scale numerator; the update is multiplied by ``alpha/r``.
      targets: Which kernels to adapt (as in :func:`jaxlora.lora`).
      rslora: Scale by ``alpha/√r`` instead.
      dtype: dtype of the adapter arrays.

    Returns:
      A :class:`jaxlora.Method` named ``"lora_fa"``; A is initialised exactly as LoRA's
      (kaiming-uniform, ``a=√5``), B at zero.

    Raises:
      TargetError: If ``rank`` is not a positive integer, or (from ``init``) a target
        matches nothing or ``rank`` exceeds a kernel's ``min(d_in, d_out)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((16, 32))}}
      >>> adapters = jl.lora_fa(rank=4, targets=".*kernel").init(jax.random.key(0), params)
      >>> jl.labels(adapters)["dense"]["kernel"].a, jl.num_trainable(adapters)  # r * d_out
      ('frozen', 128)

    References:
      Zhang et al., 2023, https://arxiv.org/abs/2308.03303.
    """
    scale = lora_scale(rank=rank, alpha=alpha, rslora=rslora)
    init = functools.partial(
        init_lora, targets=targets, rank=rank, scale=scale, dtype=dtype, cls=LoraFaAdapter
    )
    return Method("lora_fa", init)


@recipes.register("lora_fa")
def _recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("lora_fa", lora_fa(**kw))
