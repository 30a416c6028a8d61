"""LoRA (and rsLoRA): a trainable low-rank update ``W + s·A@B`` for each targeted kernel.

``A: (stack..., in..., r)`` starts as kaiming-uniform with ``a=√5`` (the reference code's
``nn.init.kaiming_uniform_``, i.e. ``U(-1/√d_in, 1/√d_in)``) and ``B: (stack..., r, out...)``
at zero, so training starts exactly at the base model. The scale is ``alpha/r``
(``alpha/√r`` for rsLoRA, whose updates keep their size as the rank grows).

References:
  Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models,
  https://arxiv.org/abs/2106.09685. Kalajdzievski, 2023, A Rank Stabilization Scaling
  Factor for Fine-Tuning with LoRA, https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora.adapters import Adapter, Factors, Method, nest, register_adapter
from jaxlora.targets import KernelLayout, TargetError, TargetsLike, select

__all__ = ["LoraAdapter", "check_rank", "kaiming_a", "lora"]


@register_adapter
class LoraAdapter(Adapter):
    """LoRA factors of one kernel (stacked along the kernel's stack axes)."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b")
    LABELS: ClassVar[dict[str, str]] = {"a": "lora_a", "b": "lora_b"}

    layout: KernelLayout
    rank: int
    scale: float
    a: Any
    b: Any

    def factors(self, shared: dict[str, Any]) -> Factors:
        del shared
        return Factors(self.a, self.b, self.scale)


def check_rank(layout: KernelLayout, rank: int) -> None:
    """Raises a :class:`TargetError` if ``rank`` does not fit the kernel."""
    if not isinstance(rank, int) or rank < 1:
        raise TargetError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(layout.d_in, layout.d_out):
        raise TargetError(
            f"rank {rank} is larger than min(d_in, d_out) = min({layout.d_in}, "
            f"{layout.d_out}) of {layout.path!r} (shape {layout.shape})"
        )


def kaiming_a(key: jax.Array, layout: KernelLayout, rank: int, dtype: Any) -> jax.Array:
    """The reference LoRA init of A: kaiming-uniform with ``a=√5`` over fan-in ``d_in``."""
    bound = 1.0 / math.sqrt(layout.d_in)
    shape = (*layout.stack_shape, *layout.in_shape, rank)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora(
    *,
    rank: int = 8,
    alpha: float = 8.0,
    targets: TargetsLike = "all-linear",
    rslora: bool = False,
    dtype: Any = jnp.float32,
) -> Method:
    """LoRA: ``W + (alpha/r)·A@B`` with trainable ``A``, ``B`` and a frozen ``W``.

    Args:
      rank: The rank ``r`` of the update.
      alpha: The scale numerator; the update is multiplied by ``alpha/r``.
      targets: Which kernels to adapt: a regex over ``"/"``-joined key paths, a
        :class:`jaxlora.Target`, a list of them, or ``"all-linear"``.
      rslora: Scale by ``alpha/√r`` instead (rank-stabilised LoRA).
      dtype: dtype of the adapter arrays (float32 by default, whatever the base dtype: the
        adapted product casts them to the compute dtype where they are used).

    Returns:
      A :class:`jaxlora.Method` whose ``init(key, params)`` returns the adapters tree.

    Raises:
      TargetError: From ``init``, if a target matches nothing or ``rank`` exceeds a kernel's
        ``min(d_in, d_out)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}
      >>> adapters = jl.lora(rank=4, alpha=8, targets=r".*q_proj/kernel").init(
      ...     jax.random.key(0), params)
      >>> node = adapters["attn"]["q_proj"]["kernel"]
      >>> node.a.shape, node.b.shape, node.scale
      ((16, 4), (4, 32), 2.0)

    References:
      Hu et al., 2021, https://arxiv.org/abs/2106.09685 (LoRA);
      Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732 (rsLoRA).
    """
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank

    def init(key: jax.Array, params: Any) -> dict[str, Any]:
        layouts = select(params, targets)
        for layout in layouts.values():
            check_rank(layout, rank)
        keys = jax.random.split(key, len(layouts))
        nodes = {}
        for k, (path, layout) in zip(keys, layouts.items()):
            nodes[path] = LoraAdapter(
                layout=layout,
                rank=rank,
                scale=float(scale),
                a=kaiming_a(k, layout, rank, dtype),
                b=jnp.zeros((*layout.stack_shape, rank, *layout.out_shape), dtype),
            )
        return nest(nodes)

    return Method("lora", init)
