"""What XLA says about a compiled program: cost and memory figures, and its collectives.

Flops from ``compiled.cost_analysis()`` are deterministic for a given program and backend,
so tests may assert flop *ratios*; wall time never belongs in a test (the machine is shared
and noisy), only in the benchmark scripts that print medians and ratios. The collectives of
a compiled program's HLO text (:func:`collectives`) tell whether a sharded step gathers each
kernel once, as intended.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["COLLECTIVES", "Collective", "CompiledCost", "collectives", "compiled_cost", "cost_of"]


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
    mem = compiled.memory_analysis()
    return CompiledCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
    )


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
"""The cross-device operations :func:`collectives` finds in compiled HLO."""

_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+"
    rf"(?P<op>{'|'.join(COLLECTIVES)})(?:-start)?\("
)
_ARRAY_RE = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective operation of a compiled program."""

    op: str
    """Its kind: one of :data:`COLLECTIVES`."""
    shapes: tuple[tuple[int, ...], ...]
    """Shapes of its results (several for a combined operation)."""


def collectives(hlo_text: str) -> list[Collective]:
    """The collective operations in the text of a compiled program.

    Each operation is counted once where it appears, so one inside a loop body (a scan over
    layers) counts once however many times it runs. Asynchronous pairs count once (the
    ``-start`` half).

    Args:
      hlo_text: ``jitted.lower(...).compile().as_text()``.

    Returns:
      The collectives in program order.

    Examples:
      >>> text = "%ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}"
      >>> collectives(text)
      [Collective(op='all-gather', shapes=((8, 4),))]
    """
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_RE.match(line)
        if m is None:
            continue
        shapes = tuple(
            tuple(int(d) for d in dims.split(",") if d)
            for _, dims in _ARRAY_RE.findall(m.group("type"))
        )
        out.append(Collective(m.group("op"), shapes))
    return out
