"""XLA cost and memory figures of a jitted function, for benchmarks and flop-ratio tests.

Flops from ``compiled.cost_analysis()`` are deterministic for a given program and backend,
so tests may assert flop *ratios*; wall time never belongs in a test (the machine is shared
and noisy), only in the benchmark scripts that print medians and ratios.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["CompiledCost", "compiled_cost", "cost_of"]


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    """What XLA reports for one compiled program."""

    flops: float
    """Floating-point operations of one call (``cost_analysis()["flops"]``)."""
    bytes_accessed: float
    """Bytes read and written by the program's operations."""
    temp_bytes: int
    """Scratch memory the program allocates (activations kept for the backward, ...)."""
    argument_bytes: int
    """Bytes of the program's arguments."""
    output_bytes: int
    """Bytes of the program's outputs."""


def compiled_cost(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CompiledCost:
    """Compiles ``fn`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``) and reads its costs.

    Args:
      fn: A function, or an already ``jax.jit``-ed one (its shardings and donation are kept).
      *args: Example arguments; only shapes, dtypes and shardings matter.
      **kwargs: Keyword arguments passed to ``fn``.

    Returns:
      A :class:`CompiledCost`.

    Examples:
      >>> import jax.numpy as jnp
      >>> cost = compiled_cost(lambda x, w: x @ w, jnp.ones((8, 16)), jnp.ones((16, 4)))
      >>> cost.flops  # 2 * 8 * 16 * 4
      1024.0
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return cost_of(jitted.lower(*args, **kwargs).compile())


def cost_of(compiled: jax.stages.Compiled) -> CompiledCost:
    """The :class:`CompiledCost` of an already compiled program (``jit(f).lower(...).compile()``).

    Lets a training loop compile its step once and use the same executable for both the
    figures and the run.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per device program
        cost = cost[0]
    mem = compiled.memory_analysis()
    return CompiledCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
    )
