"""The static configuration of an adapters tree, recorded with a checkpoint and compared.

The adapters' treedef carries what the arrays alone do not: each node's class (the method),
kernel layout, rank and scale, the paths of fully trained leaves, the configuration of shared
state. A checkpoint records it as JSON, and a restore whose target describes itself
differently is refused with every difference named.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlora.adapters import adapter_nodes, full_leaves, shared_state
from jaxlora.targets import KernelLayout

__all__ = ["compare_descriptions", "describe_adapters", "short"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, KernelLayout):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def _static(node: Any) -> dict[str, Any]:
    """``{"class": ..., **static fields}`` of an adapter node or shared-state entry."""
    out: dict[str, Any] = {"class": type(node).__name__}
    if dataclasses.is_dataclass(node):
        arrays = getattr(type(node), "ARRAYS", ())
        for f in dataclasses.fields(node):
            if f.name not in arrays:
                out[f.name] = _jsonable(getattr(node, f.name))
    return out


def describe_adapters(adapters: Any) -> dict[str, Any]:
    """The static configuration of an adapters tree, as JSON-ready data.

    This is what a checkpoint records to refuse a mismatched restore: for every adapted
    kernel its node class (the method) and static fields (layout, rank, scale), the paths
    of fully trained leaves, and the configuration of shared state (VeRA's rank and sizes).

    Args:
      adapters: An adapters tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``{"nodes": {path: {"class": ..., **static}}, "full": [...], "shared": {...}}``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> d = describe_adapters(jl.lora(rank=2, targets=".*").init(jax.random.key(0), params))
      >>> d["nodes"]["dense/kernel"]["class"], d["nodes"]["dense/kernel"]["rank"]
      ('LoraAdapter', 2)
    """
    nodes = {path: _static(node) for path, node in sorted(adapter_nodes(adapters).items())}
    shared = {name: _static(value) for name, value in shared_state(adapters).items()}
    return {"nodes": nodes, "full": sorted(full_leaves(adapters)), "shared": shared}


def _node_problems(path: str, s: dict[str, Any], t: dict[str, Any]) -> list[str]:
    if s["class"] != t["class"]:
        return [
            f"{path!r}: the checkpoint holds a {s['class']} (another method), the target "
            f"a {t['class']}"
        ]
    return [
        f"{path!r}: {field} is {s.get(field)!r} in the checkpoint but {t.get(field)!r} in "
        "the target"
        for field in sorted(set(s) | set(t))
        if s.get(field) != t.get(field)
    ]


def compare_descriptions(saved: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """Every difference between two :func:`describe_adapters` results, in words."""
    problems = []
    s_nodes, t_nodes = saved["nodes"], target["nodes"]
    only_saved = sorted(set(s_nodes) - set(t_nodes))
    only_target = sorted(set(t_nodes) - set(s_nodes))
    if only_saved or only_target:
        problems.append(
            "the target sets differ: adapted only in the checkpoint "
            f"{short(only_saved)}, only in the target {short(only_target)}"
        )
    for path in sorted(set(s_nodes) & set(t_nodes)):
        problems += _node_problems(path, s_nodes[path], t_nodes[path])
    if saved["full"] != target["full"]:
        problems.append(
            f"fully trained leaves differ: checkpoint {short(saved['full'])}, "
            f"target {short(target['full'])}"
        )
    if saved["shared"] != target["shared"]:
        problems.append(
            f"shared state differs: checkpoint {saved['shared']}, target {target['shared']}"
        )
    return problems


def short(items: list[str], n: int = 4) -> str:
    """At most ``n`` items, then how many more."""
    if len(items) <= n:
        return str(items)
    return f"{items[:n]} and {len(items) - n} more"
