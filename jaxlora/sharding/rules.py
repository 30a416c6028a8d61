"""Partition rules: base parameters sharded by regexes over their key paths.

A rule is ``(regex, PartitionSpec)`` matched with ``re.fullmatch`` against each leaf's
``"/"``-joined key path, first match wins. A rule's spec describes the leaf's *trailing*
axes, so one rule serves a kernel ``(d_in, d_out)`` and its scanned form ``(L, d_in,
d_out)``: the extra leading (stacked layer) axes stay unsharded. Selection is strict like
target specs: a leaf that no rule matches, a spec with more axes than the leaf, a mesh axis
the mesh lacks, or a mesh axis whose size does not divide the dimension is a
:class:`ShardingError` naming the path. Rule sets end with ``(".*", P())`` to replicate
everything else on purpose. Model presets live with their model
(:func:`jaxlora.models.llama.partition_rules`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.keypaths import path_str
from jaxlora.sharding.errors import ShardingError
from jaxlora.targets import is_kernel_leaf

__all__ = ["Rules", "entry_axes", "named", "param_shardings", "param_specs"]

Rules = Sequence[tuple[str, P]]
"""Partition rules: ``(regex over the "/"-joined key path, PartitionSpec)``, first match
wins."""


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    return dict(mesh.shape)


def entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _check_spec(path: str, shape: Sequence[int], spec: P, sizes: Mapping[str, int], why: str):
    used: list[str] = []
    for dim, entry in zip(shape, spec):
        axes = entry_axes(entry)
        for a in axes:
            if a not in sizes:
                raise ShardingError(
                    f"{path!r}: {why} names mesh axis {a!r}, but the mesh has axes {tuple(sizes)}"
                )
        used += axes
        n = math.prod(sizes[a] for a in axes)
        if dim % n:
            raise ShardingError(
                f"{path!r} with shape {tuple(shape)}: {why} splits a dimension of size {dim} "
                f"over mesh axes {axes} of total size {n}, which does not divide it"
            )
    if len(set(used)) != len(used):
        raise ShardingError(f"{path!r}: {why} uses a mesh axis twice: {spec}")


def _leaf_spec(path: str, shape: Sequence[int], rules: Rules, sizes: Mapping[str, int]) -> P:
    for pattern, spec in rules:
        if re.fullmatch(pattern, path) is None:
            continue
        spec = P(*spec)
        if len(spec) > len(shape):
            raise ShardingError(
                f"{path!r} with shape {tuple(shape)} has fewer axes than the spec {spec} of "
                f"rule {pattern!r}"
            )
        # right-aligned: leading axes the spec does not describe (stacked layers) stay whole
        full = P(*(None,) * (len(shape) - len(spec)), *spec)
        _check_spec(path, shape, full, sizes, f"rule {pattern!r} (spec {full})")
        return full
    raise ShardingError(
        f"no partition rule matches {path!r} (shape {tuple(shape)}); rules tried: "
        f"{[r for r, _ in rules]}. End the rules with ('.*', P()) to replicate the rest."
    )


def param_specs(params: Any, rules: Rules, mesh: Any) -> Any:
    """The ``PartitionSpec`` of every leaf of ``params`` under ``rules``.

    Args:
      params: A pytree of arrays or ``jax.ShapeDtypeStruct``.
      rules: ``(regex, PartitionSpec)`` pairs; see the module docstring.
      mesh: A ``Mesh`` or ``jax.sharding.AbstractMesh`` (only its axis sizes are read).

    Returns:
      A pytree like ``params`` with a full-rank ``PartitionSpec`` at each leaf (at a
      quantized kernel, a :class:`~jaxlora.quant.QuantizedKernel` of the specs of its
      codes and scales, which shard like the kernel).

    Raises:
      ShardingError: If a leaf matches no rule, or its rule cannot shard it (the message
        names the path, the shape and the rule).

    Examples:
      >>> from jaxlora.sharding import param_specs
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))
      >>> params = {"q_proj": {"kernel": jnp.zeros((3, 8, 4))}, "norm": jnp.zeros(8)}
      >>> param_specs(params, [(".*kernel", P("fsdp", "tensor")), (".*", P())], mesh)
      {'norm': P(None,), 'q_proj': {'kernel': P(None, 'fsdp', 'tensor')}}
    """
    sizes = _mesh_sizes(mesh)

    def leaf(kp, x):
        path = path_str(kp)
        spec = _leaf_spec(path, tuple(x.shape), rules, sizes)
        if not is_kernel_leaf(x):
            return spec
        # a quantized kernel: its codes and scales shard like the kernel (same blocks)
        try:
            return x.partition_specs(spec, sizes)
        except ValueError as e:
            raise ShardingError(f"{path!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_kernel_leaf)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def param_shardings(params: Any, rules: Rules, mesh: Mesh) -> Any:
    """:func:`param_specs` as ``NamedSharding`` on ``mesh``, for ``jit``/``device_put``.

    Examples:
      >>> from jaxlora.sharding import make_mesh, param_shardings
      >>> import jax, jax.numpy as jnp
      >>> mesh = make_mesh()
      >>> sh = param_shardings({"w": jnp.zeros((4, 2))}, [(".*", P())], mesh)
      >>> sh["w"].spec
      P(None, None)
    """
    return named(mesh, param_specs(params, rules, mesh))
