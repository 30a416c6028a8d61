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

__all__ = [
    "COLLECTIVES",
    "Collective",
    "CompiledCost",
    "collective_bytes",
    "collectives",
    "compiled_cost",
    "cost_of",
]


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


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8})
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE_RE = re.compile(
    r"(?P<key>body|condition|to_apply|calls|true_computation|false_computation)=%?(?P<n>[\w.\-]+)"
)
_BRANCHES_RE = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_RE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 0)
    return total


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m is not None and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group("name")
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective moves in one run of a compiled program.

    Unlike :func:`collectives`, an operation inside a loop counts once per iteration: loop
    bodies are weighted by XLA's ``known_trip_count`` (a scan over ``L`` layers runs its
    per-layer gathers ``L`` times). The size is that of the whole array the collective
    works on: an all-gather's result, a reduce-scatter's operand, an all-reduce's result.

    Args:
      hlo_text: ``jitted.lower(...).compile().as_text()``.

    Returns:
      ``{op: bytes}`` for the ops of :data:`COLLECTIVES` that occur.

    Examples:
      >>> text = "\\n".join([
      ...     "%body (p: f32[1,4]) -> f32[8,4] {",
      ...     "  %ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}",
      ...     "}",
      ...     "ENTRY %main (p: f32[1,4]) -> f32[8,4] {",
      ...     '  %w = f32[8,4] while(f32[1,4] %p), condition=%c, body=%body, '
      ...     'backend_config={"known_trip_count":{"n":"3"}}',
      ...     "}",
      ... ])
      >>> collective_bytes(text)  # 3 iterations x 8*4 float32
      {'all-gather': 384}
    """
    comps, entry = _computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    calls: dict[str, list[tuple[str, int]]] = {name: [] for name in comps}
    for name, lines in comps.items():
        for line in lines:
            trip = _TRIP_RE.search(line)
            for m in _CALLEE_RE.finditer(line):
                n = int(trip.group("n")) if trip and m.group("key") == "body" else 1
                calls[name].append((m.group("n"), n))
            for m in _BRANCHES_RE.finditer(line):
                calls[name] += [(b.strip().lstrip("%"), 1) for b in m.group("names").split(",")]
    times: dict[str, int] = {}

    def visit(name: str, k: int) -> None:
        times[name] = times.get(name, 0) + k
        for callee, n in calls.get(name, ()):
            visit(callee, k * n)

    visit(entry, 1)
    out: dict[str, int] = {}
    for name, k in times.items():
        for line in comps.get(name, ()):
            m = _COLLECTIVE_RE.match(line)
            if m is None:
                continue
            op = m.group("op")
            if op == "reduce-scatter":
                args = line[m.end() :].split(")")[0]
                size = _array_bytes(args)
            elif "-start(" in line and op == "all-gather":
                # an async start's type is (operands, results): count the results
                arrays = _ARRAY_RE.findall(m.group("type"))
                size = _array_bytes(" ".join(f"{t}[{d}]" for t, d in arrays[len(arrays) // 2 :]))
            else:
                size = _array_bytes(m.group("type"))
            out[op] = out.get(op, 0) + k * size
    return out
