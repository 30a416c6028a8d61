"""DoRA: weight-decomposed LoRA, a trained magnitude times the direction of ``W + s·A@B``.

Each output column ``j`` of the adapted kernel is ``m_j · (W + s·A@B)_j / ||(W + s·A@B)_j||``
with the norm over the kernel's input axes. In jaxlora's canonical form that is LoRA's
factors plus a per-column scale, ``col_scale = m / ||W + s·A@B||``, so
:func:`jaxlora.adapt` computes it unmerged as ``(x@W + s·(x@A)@B) * col_scale``; the norm
costs one ``Aᵀ@W`` per step (weight-sized flops, independent of the batch).

Following the paper (§4.3) and PEFT, the norm is treated as a constant in the backward
(``stop_gradient``): it still tracks ``A``, ``B`` in the forward, but the gradient reaches
``A``, ``B`` only through the direction's numerator. :func:`jaxlora.merge` uses the same
expression, so adapted and merged gradients agree. The norm is expanded as
``||W||² + 2s·⟨AᵀW, B⟩ + s²·Bᵀ(AᵀA)B`` per column, so no kernel-sized temporary is
formed (it agrees with the direct form to float rounding). ``m`` starts at the column norms of
``W``, so ``init`` reads the kernels' values (not only their shapes), and training starts
exactly at the base model. A merged DoRA kernel cannot be unmerged (the norm of the
unmerged kernel is lost).

References:
  Liu et al., 2024, DoRA: Weight-Decomposed Low-Rank Adaptation,
  https://arxiv.org/abs/2402.09353.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora import recipes
from jaxlora.adapters import Adapter, Factors, Method, register_adapter
from jaxlora.methods.lora import PEFT_FORMAT, canonical_kernel, init_lora, lora_scale
from jaxlora.targets import KernelLayout, TargetsLike

__all__ = ["DoraAdapter", "column_norm", "dora"]


def column_norm(w: jax.Array, layout: KernelLayout) -> jax.Array:
    """The L2 norm of each output column of ``w`` over its input axes: ``(stack..., out...)``.

    Computed in float32 (or wider) whatever ``w``'s dtype.
    """
    v = canonical_kernel(w, layout).astype(jnp.promote_types(w.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(v * v, axis=-2))
    return norm.reshape(*layout.stack_shape, *layout.out_shape)


@functools.partial(PEFT_FORMAT.add_variant, use_dora=True)
@register_adapter
class DoraAdapter(Adapter):
    """DoRA factors and magnitude of one kernel (stacked along the kernel's stack axes)."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b", "m")
    LABELS: ClassVar[dict[str, str]] = {"a": "lora_a", "b": "lora_b", "m": "dora_magnitude"}
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "a": ("stack", "in", "rank"),
        "b": ("stack", "rank", "out"),
        "m": ("stack", "out"),
    }

    layout: KernelLayout
    rank: int
    scale: float
    a: Any
    b: Any
    m: Any

    def factors(self, w: jax.Array, shared: dict[str, Any]) -> Factors:
        del shared
        lay = self.layout
        dtype = jnp.promote_types(jnp.result_type(w.dtype, self.a.dtype), jnp.float32)
        a = self.a.astype(dtype).reshape(*lay.stack_shape, lay.d_in, self.rank)
        b = self.b.astype(dtype).reshape(*lay.stack_shape, self.rank, lay.d_out)
        wc = canonical_kernel(w, lay).astype(dtype)
        s = self.scale
        # ||W_j + s·(AB)_j||² = ||W_j||² + 2s·Σ_k (AᵀW)_kj·B_kj + s²·B_jᵀ(AᵀA)B_j: the same
        # flops as forming W + s·A@B, but the temporaries are r-wide instead of kernel-sized.
        aw = jnp.einsum("...ir,...io->...ro", a, wc)
        gram = jnp.einsum("...ir,...is->...rs", a, a)
        sq = (
            jnp.sum(wc * wc, axis=-2)
            + 2.0 * s * jnp.sum(aw * b, axis=-2)
            + s * s * jnp.sum(b * (gram @ b), axis=-2)
        )
        norm = jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(*lay.stack_shape, *lay.out_shape)
        # the paper's §4.3 (and PEFT): the norm is a constant for the backward pass
        col = self.m / jax.lax.stop_gradient(norm).astype(self.m.dtype)
        return Factors(self.a, self.b, self.scale, col)


def dora(
    *,
    rank: int = 8,
    alpha: float = 8.0,
    targets: TargetsLike = "all-linear",
    rslora: bool = False,
    dtype: Any = jnp.float32,
) -> Method:
    """DoRA: ``m · (W + s·A@B) / ||W + s·A@B||`` per output column; ``m``, ``A``, ``B`` train.

    Args:
      rank: The rank ``r`` of the directional update.
      alpha: The scale numerator; the low-rank update is multiplied by ``alpha/r``.
      targets: Which kernels to adapt (as in :func:`jaxlora.lora`).
      rslora: Scale by ``alpha/√r`` instead.
      dtype: dtype of the adapter arrays.

    Returns:
      A :class:`jaxlora.Method` named ``"dora"``. Its ``init(key, params)`` reads the
      kernels' values: ``m`` starts at their column norms (A kaiming-uniform, B = 0 as in
      LoRA). Labels: ``"lora_a"``, ``"lora_b"``, ``"dora_magnitude"``.

    Raises:
      TargetError: If ``rank`` is not a positive integer, or (from ``init``) a target
        matches nothing or ``rank`` exceeds a kernel's ``min(d_in, d_out)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.full((4, 3), 2.0)}}
      >>> adapters = jl.dora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> adapters["dense"]["kernel"].m  # ||column|| = sqrt(4 * 2²)
      Array([4., 4., 4.], dtype=float32)
      >>> bool(jnp.allclose(jl.merge(params, adapters)["dense"]["kernel"], 2.0))
      True

    References:
      Liu et al., 2024, https://arxiv.org/abs/2402.09353.
    """
    scale = lora_scale(rank=rank, alpha=alpha, rslora=rslora)

    def magnitude(layout: KernelLayout, w: jax.Array) -> jax.Array:
        return column_norm(w, layout).astype(dtype)

    init = functools.partial(
        init_lora,
        targets=targets,
        rank=rank,
        scale=scale,
        dtype=dtype,
        cls=DoraAdapter,
        m=magnitude,
    )
    return Method("dora", init)


@recipes.register("dora")
def _recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("dora", dora(**kw))
