"""Adapter and optimizer-state shardings, derived from the base kernels' shardings.

Adapters never get rules of their own: each array follows the base kernel it adapts, axis
by axis, through the node's :class:`~jaxlora.targets.KernelLayout` and the groups its class
declares in ``AXES``. ``A: (stack, in, r)`` takes the kernel's sharding of its stack and
input axes, ``B: (stack, r, out)`` that of its stack and output axes, the rank axis is
replicated; per-layer vectors follow the axis they scale (VeRA's ``b`` the output, its ``d``
is rank-sized and replicated); state shared by all layers (VeRA's random matrices under
``__shared__``) is replicated; a fully trained copy takes its base leaf's spec. Optimizer
state follows the adapter array it belongs to. So wherever the kernel is split or gathered,
its factors are split or gathered the same way, and the rank-sized products stay small.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.adapters import Adapter, map_parts
from jaxlora.keypaths import path_str, path_tuple
from jaxlora.sharding.errors import ShardingError
from jaxlora.sharding.rules import named

__all__ = [
    "adapter_shardings",
    "adapter_specs",
    "opt_state_shardings",
    "opt_state_specs",
]

GROUPS = ("stack", "in", "out", "rank")
"""The groups ``Adapter.AXES`` may name: the kernel's stack, input or output axes, or
``"rank"``: one axis that is never sharded (the rank, or any other axis of its own)."""


def _group_axes(node: Adapter, group: str) -> tuple[int | None, ...]:
    lay = node.layout
    return {
        "stack": lay.stack_axes,
        "in": lay.in_axes,
        "out": lay.out_axes,
        "rank": (None,),
    }[group]


def _field_kernel_axes(node: Adapter, field: str, shape: tuple[int, ...]) -> list[int | None]:
    """For each axis of an adapter array, the kernel axis whose sharding it shares."""
    where = f"{type(node).__name__}.{field} at {node.layout.path!r}"
    groups = type(node).AXES.get(field)
    if groups is None:
        raise ShardingError(
            f"{where} has no axis groups: declare {type(node).__name__}.AXES[{field!r}] as a "
            f"tuple of {GROUPS} (e.g. ('stack', 'in', 'rank') for a LoRA A)"
        )
    axes = [a for g in groups for a in _group_axes(node, g)]
    lay = node.layout
    fits = len(axes) == len(shape) and all(
        a is None or lay.shape[a] == s for a, s in zip(axes, shape)
    )
    if not fits:
        raise ShardingError(f"{where} has shape {shape}, which does not fit AXES {groups}")
    return axes


def _node_specs(node: Adapter, kernel_spec: P) -> Any:
    full = tuple(kernel_spec) + (None,) * (len(node.layout.shape) - len(kernel_spec))

    def spec(kp, x):
        (field,) = path_tuple(kp[:1], unbox=False)
        axes = _field_kernel_axes(node, field, tuple(x.shape))
        return P(*(None if a is None else full[a] for a in axes))

    return jax.tree_util.tree_map_with_path(spec, node)


def _is_node(x: Any) -> bool:
    return isinstance(x, Adapter)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def adapter_specs(adapters: Any, param_specs: Any) -> Any:
    """``PartitionSpec`` of every adapter array, derived from its base kernel's spec.

    See the module docstring for the rule. Adapter classes declare the groups of each
    array's axes, ``AXES = {"a": ("stack", "in", "rank"), ...}`` (groups of the kernel
    layout, see :data:`GROUPS`).

    Args:
      adapters: An adapters tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from
        ``jax.eval_shape(method.init, key, params)``).
      param_specs: The base parameters' specs (from :func:`param_specs`), or their
        ``NamedSharding`` tree.

    Returns:
      A tree like ``adapters`` with a ``PartitionSpec`` at each array.

    Raises:
      ShardingError: If an adapter's kernel has no spec in ``param_specs``, or an adapter
        array has no ``AXES`` entry or a shape that does not fit it.

    Examples:
      >>> from jaxlora.sharding import adapter_specs
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> specs = {"up": {"kernel": P("fsdp", "tensor")}}
      >>> ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> node = adapter_specs(ad, specs)["up"]["kernel"]
      >>> node.a, node.b
      (P('fsdp', None), P(None, 'tensor'))
    """
    flat = {
        path_str(kp): getattr(s, "spec", s)
        for kp, s in jax.tree_util.tree_flatten_with_path(
            param_specs, is_leaf=lambda x: _is_spec(x) or isinstance(x, NamedSharding)
        )[0]
    }

    def node_specs(x):
        if not isinstance(x, Adapter):
            raise ShardingError(
                f"adapters tree holds a {type(x).__name__} outside any adapter node; pass the "
                "tree returned by a method's init()"
            )
        path = x.layout.path
        if path not in flat:
            raise ShardingError(
                f"adapter for {path!r} has no base spec: the kernel is missing from the "
                "parameter specs"
            )
        return _node_specs(x, flat[path])

    def full_spec(kp, x):
        # a fully trained copy (jaxlora.full) stands in for its base leaf: same sharding
        path = path_str(kp)
        if path not in flat:
            raise ShardingError(f"fully trained leaf {path!r} has no base spec")
        return flat[path]

    return map_parts(
        adapters,
        lambda body: jax.tree_util.tree_map(node_specs, body, is_leaf=_is_node),
        # cross-layer state (VeRA's random matrices) is used by every layer: replicated
        lambda shared: jax.tree_util.tree_map(lambda x: P(), shared),
        lambda full: jax.tree_util.tree_map_with_path(full_spec, full),
    )


def adapter_shardings(adapters: Any, param_shardings: Any) -> Any:
    """:func:`adapter_specs` as ``NamedSharding`` on the mesh of ``param_shardings``.

    Examples:
      >>> from jaxlora.sharding import make_mesh, param_shardings, adapter_shardings
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, [(".*", P())], make_mesh())
      >>> ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> adapter_shardings(ad, psh)["up"]["kernel"].b.spec
      P(None, None)
    """
    meshes = {
        s.mesh for s in jax.tree_util.tree_leaves(param_shardings) if isinstance(s, NamedSharding)
    }
    if len(meshes) != 1:
        raise ShardingError(
            f"param_shardings must be NamedShardings on one mesh, found {len(meshes)} meshes"
        )
    return named(meshes.pop(), adapter_specs(adapters, param_shardings))


# ----------------------------------------------------------------------------- optimizer


def opt_state_specs(
    opt_state: Any,
    adapters: Any,
    adapter_specs: Any,
    *,
    params: Any = None,
    param_specs: Any = None,
) -> Any:
    """``PartitionSpec`` of every optimizer state array: the spec of its adapter array.

    Optax keeps per-parameter state (``mu``, ``nu``, ...) in trees that mirror the
    parameters, possibly nested in ``multi_transform``/``chain``/``masked`` states, so the
    key path of a state leaf ends with the key path of the adapter array it belongs to.
    Each leaf takes the spec of the adapter array with the longest such path suffix and the
    same shape; everything else (step counts, scalars) is replicated. Unlike
    ``optax.tree_map_params`` this needs no placeholder ``init``, which label functions over
    the adapters tree (``jaxlora.optimizer``) cannot take.

    Args:
      opt_state: The state or its shapes (``jax.eval_shape(tx.init, adapters)``).
      adapters: The adapters tree the state belongs to (arrays or shapes).
      adapter_specs: :func:`adapter_specs` of ``adapters``.
      params: For an optimizer with state for (some of) the base params too, e.g. one over
        ``(params, adapters)``: the base params, whose state follows ``param_specs``.
      param_specs: The base params' specs.

    Returns:
      A tree like ``opt_state`` with a ``PartitionSpec`` at each array.

    Examples:
      >>> from jaxlora.sharding import adapter_specs, opt_state_specs
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> aspecs = adapter_specs(ad, {"up": {"kernel": P("fsdp", None)}})
      >>> state = jl.optimizer(optax.adam(1e-3)).init(ad)
      >>> specs = opt_state_specs(state, ad, aspecs)
      >>> sorted({str(s) for s in jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)})
      ["P('fsdp', None)", 'P()', 'P(None, None)']
    """
    by_path = {}
    pairs = [(adapters, adapter_specs)]
    if params is not None:
        pairs.append((params, param_specs))
    for tree, specs in pairs:
        spec_leaves = jax.tree_util.tree_leaves(
            specs, is_leaf=lambda x: _is_spec(x) or isinstance(x, NamedSharding)
        )
        arr_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        if len(spec_leaves) != len(arr_leaves):
            raise ShardingError("the specs do not have the structure of their tree")
        for (kp, x), spec in zip(arr_leaves, spec_leaves):
            by_path.setdefault(tuple(kp), (tuple(x.shape), getattr(spec, "spec", spec)))
    longest = max((len(k) for k in by_path), default=0)

    def spec(kp, x):
        kp = tuple(kp)
        for n in range(min(longest, len(kp)), 0, -1):
            hit = by_path.get(kp[-n:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec, opt_state)


def opt_state_shardings(
    tx: optax.GradientTransformation, adapters: Any, adapter_shardings: Any
) -> Any:
    """The ``NamedSharding`` of every array of ``tx.init(adapters)``, following the adapters.

    Args:
      tx: The optimizer.
      adapters: The adapters (arrays or shapes).
      adapter_shardings: From :func:`adapter_shardings`.

    Returns:
      A tree like the optimizer state, of ``NamedSharding``.

    Examples:
      >>> from jaxlora.sharding import (
      ...     make_mesh, param_shardings, adapter_shardings, opt_state_shardings)
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, [(".*", P())], make_mesh())
      >>> ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.optimizer(optax.adam(1e-3))
      >>> sh = opt_state_shardings(tx, ad, adapter_shardings(ad, psh))
      >>> len(jax.tree_util.tree_leaves(sh))  # count, mu (a, b), nu (a, b)
      5
    """
    mesh = jax.tree_util.tree_leaves(adapter_shardings)[0].mesh
    abstract = jax.eval_shape(tx.init, adapters)
    return named(mesh, opt_state_specs(abstract, adapters, adapter_shardings))
