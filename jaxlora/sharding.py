"""Sharding: one device mesh, base params sharded by path rules, adapters following them.

The base parameters are sharded by *rules*: ``(regex, PartitionSpec)`` pairs matched with
``re.fullmatch`` against each leaf's ``"/"``-joined key path, first match wins. A rule's
spec describes the leaf's *trailing* axes, so one rule serves a kernel ``(d_in, d_out)``
and its scanned form ``(L, d_in, d_out)``: the extra leading (stacked layer) axes stay
unsharded. Selection is strict like target specs: a leaf that no rule matches, a spec with
more axes than the leaf, a mesh axis the mesh lacks, or a mesh axis whose size does not
divide the dimension is a :class:`ShardingError` naming the path. Rule sets end with
``(".*", P())`` to replicate everything else on purpose.

Adapters never get rules of their own: each array follows the base kernel it adapts, axis
by axis, through the node's :class:`~jaxlora.targets.KernelLayout`. ``A: (stack, in, r)``
takes the kernel's sharding of its stack and input axes, ``B: (stack, r, out)`` that of its
stack and output axes, the rank axis is replicated; per-layer vectors follow the axis they
scale (VeRA's ``b`` the output, its ``d`` is rank-sized and replicated); state shared by
all layers (VeRA's random matrices under ``__shared__``) is replicated. Optimizer state
follows the adapter array it belongs to. So wherever the kernel is split or gathered, its
factors are split or gathered the same way, and the rank-sized products stay small.

Everything is initialised straight into its shards (``jax.jit(init, out_shardings=...)``;
a method's ``init`` reads only shapes), so adapters never exist on one device first.
:func:`sharded_train_step` jits :func:`jaxlora.train_step` with explicit shardings and
donation. Under FSDP it all-gathers each frozen kernel once per step at the top of the
loss (the gathered copy serves forward and backward; a frozen kernel has no gradient to
reduce-scatter). For scanned layers that gathers the whole stack at once: per-layer
gathering inside the scan would need the constraint inside the layer body.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.adapters import FULL_KEY, SHARED_KEY, Adapter
from jaxlora.targets import path_str
from jaxlora.train import train_step

__all__ = [
    "AXES",
    "BATCH_AXES",
    "COLLECTIVES",
    "Collective",
    "Rules",
    "ShardingError",
    "adapter_shardings",
    "adapter_specs",
    "batch_sharding",
    "collectives",
    "gathered",
    "init_adapters",
    "init_opt_state",
    "llama_rules",
    "make_mesh",
    "mesh_shape",
    "opt_state_shardings",
    "opt_state_specs",
    "param_shardings",
    "param_specs",
    "sharded_train_step",
]

AXES = ("data", "fsdp", "tensor")
"""Default mesh axis names: pure data parallelism, fully sharded data parallelism, tensor
(model) parallelism."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over: FSDP is data parallelism too."""

Rules = Sequence[tuple[str, P]]
"""Partition rules: ``(regex over the "/"-joined key path, PartitionSpec)``, first match
wins."""


class ShardingError(ValueError):
    """A rule set that leaves a leaf unmatched, or a spec that cannot shard it."""


# ----------------------------------------------------------------------------- mesh


def mesh_shape(
    shape: Mapping[str, int] | Sequence[int] | None,
    num_devices: int,
    axis_names: Sequence[str] = AXES,
) -> dict[str, int]:
    """Resolves a mesh shape: at most one ``-1`` means "all remaining devices".

    Args:
      shape: Axis sizes by name (axes not named get size 1), a sequence aligned with
        ``axis_names``, or ``None`` for everything on the first axis.
      num_devices: Number of devices the mesh must cover exactly.
      axis_names: Names of the mesh axes, in mesh order.

    Returns:
      ``{axis_name: size}`` in ``axis_names`` order, with product ``num_devices``.

    Raises:
      ShardingError: For unknown axis names, more than one ``-1``, or sizes that do not
        multiply to ``num_devices``.

    Examples:
      >>> mesh_shape({"fsdp": -1, "tensor": 2}, 8)
      {'data': 1, 'fsdp': 4, 'tensor': 2}
      >>> mesh_shape(None, 8)
      {'data': 8, 'fsdp': 1, 'tensor': 1}
    """
    names = tuple(axis_names)
    if shape is None:
        shape = {names[0]: -1}
    if not isinstance(shape, Mapping):
        if len(shape) != len(names):
            raise ShardingError(f"mesh shape {tuple(shape)} does not fit axis names {names}")
        shape = dict(zip(names, shape))
    unknown = sorted(set(shape) - set(names))
    if unknown:
        raise ShardingError(f"unknown mesh axes {unknown}; the mesh has axes {names}")
    sizes = {n: int(shape.get(n, 1)) for n in names}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
        raise ShardingError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh shape {shape}: {num_devices} devices are not divisible by {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh shape {sizes} covers {math.prod(sizes.values())} devices, "
            f"but there are {num_devices}"
        )
    return sizes


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] | None = None,
    *,
    axis_names: Sequence[str] = AXES,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Builds a device mesh with named axes (``data``, ``fsdp``, ``tensor`` by default).

    Works unchanged on one device, on fake CPU devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a TPU pod slice and on
    several GPU hosts: the device order comes from ``jax.make_mesh``, which lays the axes
    out along the physical interconnect (the last axis, ``tensor``, on the closest chips).
    In a multi-process run every process must build the same mesh over ``jax.devices()``.

    Args:
      shape: Axis sizes by name, e.g. ``{"fsdp": -1, "tensor": 2}``; ``-1`` means "the
        remaining devices", axes left out get size 1 (so rules naming them still apply).
        ``None`` puts all devices on the first axis (pure data parallelism).
      axis_names: The mesh axis names, outermost first.
      devices: Devices to use; defaults to all devices of all processes.

    Returns:
      A ``jax.sharding.Mesh`` whose axes are ``AxisType.Auto``: shardings are given at
      ``jit`` boundaries and the compiler propagates them inside (``jaxlora.adapt``
      re-traces functions on unsharded shapes, which explicit-axis meshes would reject).

    Raises:
      ShardingError: As :func:`mesh_shape`.

    Examples:
      >>> mesh = make_mesh({"fsdp": -1})
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices), axis_names)
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        devices=devices,
    )


# ----------------------------------------------------------------------------- rules


_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel"
_ROW = r"(o_proj|down_proj)/kernel"

_LLAMA_PRESETS: dict[str, tuple[tuple[str, P], ...]] = {
    # Everything replicated: pure data parallelism over the batch axes.
    "dp": ((r".*", P()),),
    # ZeRO-3 style: every matrix split over `fsdp` on its model-width (d) axis, gathered
    # where used. Column-parallel kernels (d, n) split d_in, row-parallel ones (n, d) d_out,
    # so for both the adapter factor on the d side is split too and the rank side small.
    "fsdp": (
        (rf"(.*/)?{_COLUMN}", P("fsdp", None)),
        (rf"(.*/)?{_ROW}", P(None, "fsdp")),
        (r"embed/embedding", P(None, "fsdp")),
        (r"lm_head/kernel", P("fsdp", None)),
        (r".*", P()),
    ),
    # Megatron tensor parallelism: column-parallel kernels split their outputs (so heads
    # and MLP units are split), row-parallel ones their inputs; the vocabulary is split too.
    "tp": (
        (rf"(.*/)?{_COLUMN}", P(None, "tensor")),
        (rf"(.*/)?{_ROW}", P("tensor", None)),
        (r"embed/embedding", P("tensor", None)),
        (r"lm_head/kernel", P(None, "tensor")),
        (r".*", P()),
    ),
    # Both: FSDP on the model-width axis, tensor parallelism on the other one.
    "fsdp_tp": (
        (rf"(.*/)?{_COLUMN}", P("fsdp", "tensor")),
        (rf"(.*/)?{_ROW}", P("tensor", "fsdp")),
        (r"embed/embedding", P("tensor", "fsdp")),
        (r"lm_head/kernel", P("fsdp", "tensor")),
        (r".*", P()),
    ),
}


def llama_rules(preset: str = "fsdp") -> tuple[tuple[str, P], ...]:
    """Partition rules for :mod:`jaxlora.models.llama` parameters, scanned or not.

    Args:
      preset: ``"dp"`` (replicated), ``"fsdp"`` (every matrix split over ``fsdp`` on its
        model-width axis), ``"tp"`` (Megatron column/row tensor parallelism over
        ``tensor``) or ``"fsdp_tp"`` (both).

    Returns:
      The rules, ending with ``(".*", P())`` (norm scales are replicated).

    Raises:
      ValueError: For an unknown preset.

    Examples:
      >>> dict(llama_rules("fsdp_tp"))[r"lm_head/kernel"]
      P('fsdp', 'tensor')
    """
    if preset not in _LLAMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(_LLAMA_PRESETS)}")
    return _LLAMA_PRESETS[preset]


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    return dict(mesh.shape)


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _check_spec(path: str, shape: Sequence[int], spec: P, sizes: Mapping[str, int], why: str):
    used: list[str] = []
    for dim, entry in zip(shape, spec):
        axes = _entry_axes(entry)
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
      A pytree like ``params`` with a full-rank ``PartitionSpec`` at each leaf.

    Raises:
      ShardingError: If a leaf matches no rule, or its rule cannot shard it (the message
        names the path, the shape and the rule).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))
      >>> params = {"q_proj": {"kernel": jnp.zeros((3, 8, 4))}, "norm": jnp.zeros(8)}
      >>> param_specs(params, [(".*kernel", P("fsdp", "tensor")), (".*", P())], mesh)
      {'norm': P(None,), 'q_proj': {'kernel': P(None, 'fsdp', 'tensor')}}
    """
    sizes = _mesh_sizes(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: _leaf_spec(path_str(kp), tuple(x.shape), rules, sizes), params
    )


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def param_shardings(params: Any, rules: Rules, mesh: Mesh) -> Any:
    """:func:`param_specs` as ``NamedSharding`` on ``mesh``, for ``jit``/``device_put``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mesh = make_mesh()
      >>> sh = param_shardings({"w": jnp.zeros((4, 2))}, llama_rules("dp"), mesh)
      >>> sh["w"].spec
      P(None, None)
    """
    return _named(mesh, param_specs(params, rules, mesh))


# ----------------------------------------------------------------------------- adapters

_GROUPS = ("stack", "in", "out", "rank")

# Shapes an adapter array may take, in canonical group order; the rank group is one axis.
# There is no (stack, in) vector: the canonical form scales outputs only (col_scale), and
# guessing "in" for a square kernel's vector would make every such vector ambiguous.
# An adapter class can instead declare AXES = {field: groups}.
_CANDIDATES = (
    ("stack", "in", "rank"),
    ("stack", "rank", "out"),
    ("stack", "in", "out"),
    ("stack", "out"),
    ("stack", "rank"),
)


def _group_axes(node: Adapter, group: str) -> tuple[int | None, ...]:
    lay = node.layout
    return {
        "stack": lay.stack_axes,
        "in": lay.in_axes,
        "out": lay.out_axes,
        "rank": (None,),
    }[group]


def _fits(node: Adapter, groups: Sequence[str], shape: tuple[int, ...]) -> bool:
    lay = node.layout
    rank = getattr(node, "rank", None)
    expect: list[int | None] = []
    for g in groups:
        expect += [None if a is None else lay.shape[a] for a in _group_axes(node, g)]
    if len(expect) != len(shape):
        return False
    for e, s in zip(expect, shape):
        if e is None:  # the rank axis: any size unless the node says its rank
            if isinstance(rank, int) and s != rank:
                return False
        elif e != s:
            return False
    return True


def _field_kernel_axes(node: Adapter, field: str, shape: tuple[int, ...]) -> list[int | None]:
    """For each axis of an adapter array, the kernel axis whose sharding it shares."""
    declared = getattr(type(node), "AXES", {}).get(field)
    where = f"{type(node).__name__}.{field} at {node.layout.path!r}"
    if declared is not None:
        if not _fits(node, declared, shape):
            raise ShardingError(f"{where} has shape {shape}, which does not fit AXES {declared}")
        candidates = [tuple(declared)]
    else:
        fits = [c for c in _CANDIDATES if _fits(node, c, shape)]
        maps = {tuple(a for g in c for a in _group_axes(node, g)) for c in fits}
        # An ambiguous shape (e.g. VeRA's d when rank == d_out) is replicated rather than
        # guessed: always correct, at worst not sharded. Declaring AXES removes the doubt.
        candidates = fits if len(maps) == 1 else []
    if candidates:
        return [a for g in candidates[0] for a in _group_axes(node, g)]
    lay = node.layout
    n = len(lay.stack_axes)
    if tuple(shape[:n]) == lay.stack_shape:
        return [*lay.stack_axes, *[None] * (len(shape) - n)]
    return [None] * len(shape)


def _node_specs(node: Adapter, kernel_spec: P) -> Any:
    full = tuple(kernel_spec) + (None,) * (len(node.layout.shape) - len(kernel_spec))

    def spec(kp, x):
        field = kp[0].name if isinstance(kp[0], jax.tree_util.GetAttrKey) else str(kp[0])
        axes = _field_kernel_axes(node, field, tuple(x.shape))
        return P(*(None if a is None else full[a] for a in axes))

    return jax.tree_util.tree_map_with_path(spec, node)


def _is_node(x: Any) -> bool:
    return isinstance(x, Adapter)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def adapter_specs(adapters: Any, param_specs: Any) -> Any:
    """``PartitionSpec`` of every adapter array, derived from its base kernel's spec.

    See the module docstring for the rule. Adapter classes may declare
    ``AXES = {"a": ("stack", "in", "rank"), ...}`` (groups of the kernel layout; ``rank``
    means replicated); otherwise the axes are inferred from the array's shape and the
    node's layout, and an array whose shape fits several readings is replicated.

    Args:
      adapters: An adapters tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from
        ``jax.eval_shape(method.init, key, params)``).
      param_specs: The base parameters' specs (from :func:`param_specs`), or their
        ``NamedSharding`` tree.

    Returns:
      A tree like ``adapters`` with a ``PartitionSpec`` at each array.

    Raises:
      ShardingError: If an adapter's kernel has no spec in ``param_specs``.

    Examples:
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

    body = {k: v for k, v in adapters.items() if k not in (SHARED_KEY, FULL_KEY)}
    out = jax.tree_util.tree_map(node_specs, body, is_leaf=_is_node)
    if SHARED_KEY in adapters:
        # cross-layer state (VeRA's random matrices) is used by every layer: replicated
        out[SHARED_KEY] = jax.tree_util.tree_map(lambda x: P(), adapters[SHARED_KEY])
    if FULL_KEY in adapters:
        out[FULL_KEY] = jax.tree_util.tree_map_with_path(full_spec, adapters[FULL_KEY])
    return out


def adapter_shardings(adapters: Any, param_shardings: Any) -> Any:
    """:func:`adapter_specs` as ``NamedSharding`` on the mesh of ``param_shardings``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, llama_rules("dp"), make_mesh())
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
    return _named(meshes.pop(), adapter_specs(adapters, param_shardings))


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
      params: For optimizers over ``(params, adapters)`` (Delta-LoRA): the base params,
        whose state (if any) follows ``param_specs``.
      param_specs: The base params' specs.

    Returns:
      A tree like ``opt_state`` with a ``PartitionSpec`` at each array.

    Examples:
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
    tx: optax.GradientTransformation,
    adapters: Any,
    adapter_shardings: Any,
    *,
    params: Any = None,
    param_shardings: Any = None,
) -> Any:
    """The ``NamedSharding`` of every array of ``tx.init(adapters)``, following the adapters.

    Args:
      tx: The optimizer.
      adapters: The adapters (arrays or shapes).
      adapter_shardings: From :func:`adapter_shardings`.
      params: Set for optimizers over ``(params, adapters)`` (Delta-LoRA): the state is
        then ``tx.init((params, adapters))``.
      param_shardings: The base params' shardings (with ``params``).

    Returns:
      A tree like the optimizer state, of ``NamedSharding``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, llama_rules("dp"), make_mesh())
      >>> ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.optimizer(optax.adam(1e-3))
      >>> sh = opt_state_shardings(tx, ad, adapter_shardings(ad, psh))
      >>> len(jax.tree_util.tree_leaves(sh))  # count, mu (a, b), nu (a, b)
      5
    """
    mesh = jax.tree_util.tree_leaves(adapter_shardings)[0].mesh
    target = adapters if params is None else (_abstract(params), adapters)
    abstract = jax.eval_shape(tx.init, target)
    specs = opt_state_specs(
        abstract, adapters, adapter_shardings, params=params, param_specs=param_shardings
    )
    return _named(mesh, specs)


# ----------------------------------------------------------------------------- init


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def init_adapters(method: Any, key: jax.Array, params: Any, param_shardings: Any) -> Any:
    """``method.init(key, params)`` computed directly into the adapters' shards.

    ``params`` may be ``jax.ShapeDtypeStruct`` for the (usual) shape-only methods. Given
    arrays, they enter the computation in their shardings, so methods whose ``init`` reads
    values (:func:`jaxlora.full`, PiSSA) work too. The random values equal the unsharded
    ``method.init`` (JAX's partitionable threefry).

    Args:
      method: A :class:`jaxlora.Method`.
      key: A PRNG key (the same on every process).
      params: The base parameters or their shapes.
      param_shardings: From :func:`param_shardings`.

    Returns:
      The adapters tree, each array a global ``jax.Array`` with its derived sharding.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, llama_rules("dp"), make_mesh())
      >>> ad = init_adapters(jl.lora(rank=2, targets=".*kernel"), jax.random.key(0),
      ...                    params, psh)
      >>> ad["up"]["kernel"].a.sharding.spec
      P(None, None)
    """
    shapes = _abstract(params)
    abstract = jax.eval_shape(method.init, key, shapes)
    out = adapter_shardings(abstract, param_shardings)
    mesh = jax.tree_util.tree_leaves(out)[0].mesh
    concrete = all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))
    # The key enters as raw bits replicated over the mesh: in a multi-process run a
    # process-local key array cannot be an argument of a computation spanning all hosts.
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    bits = np.asarray(jax.random.key_data(key) if typed else key)
    impl = jax.random.key_impl(key) if typed else None

    def init(raw, p):
        k = jax.random.wrap_key_data(raw, impl=impl) if typed else raw
        return method.init(k, shapes if p is None else p)

    in_shardings = (NamedSharding(mesh, P()), param_shardings if concrete else None)
    fn = jax.jit(init, in_shardings=in_shardings, out_shardings=out)
    return fn(bits, params if concrete else None)


def init_opt_state(
    tx: optax.GradientTransformation,
    adapters: Any,
    adapter_shardings: Any,
    *,
    params: Any = None,
    param_shardings: Any = None,
) -> Any:
    """``tx.init(adapters)`` computed directly into shards that follow the adapters.

    With ``params`` and ``param_shardings`` (optimizers that also move the base, such as
    Delta-LoRA) it is ``tx.init((params, adapters))``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, llama_rules("dp"), make_mesh())
      >>> ad = init_adapters(jl.lora(rank=2, targets=".*kernel"), jax.random.key(0),
      ...                    params, psh)
      >>> state = init_opt_state(jl.optimizer(optax.sgd(0.1)), ad, adapter_shardings(ad, psh))
    """
    out = opt_state_shardings(
        tx, adapters, adapter_shardings, params=params, param_shardings=param_shardings
    )
    if params is None:
        return jax.jit(tx.init, in_shardings=(adapter_shardings,), out_shardings=out)(adapters)
    return jax.jit(
        lambda p, a: tx.init((p, a)),
        in_shardings=(param_shardings, adapter_shardings),
        out_shardings=out,
    )(params, adapters)


# ----------------------------------------------------------------------------- training


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Sharding of a batch whose leading axis is split over ``axes`` (data and FSDP).

    Use it as the ``in_shardings`` entry of a whole batch pytree (a prefix): every leaf's
    leading dimension must be divisible by the product of those axes' sizes.

    Examples:
      >>> batch_sharding(make_mesh()).spec
      P(('data', 'fsdp'),)
    """
    names = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, P(names))


def _drop_axes(spec: P, axes: Sequence[str]) -> P:
    def keep(entry):
        kept = tuple(a for a in _entry_axes(entry) if a not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(e) for e in spec))


def gathered(loss_fn: Callable[..., Any], param_shardings: Any, axes: Sequence[str]):
    """Wraps ``loss_fn`` so its params are first resharded without the mesh ``axes``.

    ``jaxlora.adapt`` carries the constraint into the adapter factors, so under FSDP each
    frozen kernel is all-gathered once per step, used by the forward and the backward
    pass alike, and never differentiated.

    Examples:
      >>> import jax.numpy as jnp
      >>> psh = param_shardings({"w": jnp.zeros(4)}, [(".*", P("fsdp"))], make_mesh())
      >>> float(gathered(lambda p, b: p["w"].sum() + b, psh, ("fsdp",))({"w": jnp.ones(4)}, 1.0))
      5.0
    """
    axes = tuple(axes)
    if not axes:
        return loss_fn
    whole = jax.tree_util.tree_map(
        lambda s: NamedSharding(s.mesh, _drop_axes(s.spec, axes)), param_shardings
    )

    def fn(params, *args, **kwargs):
        return loss_fn(jax.lax.with_sharding_constraint(params, whole), *args, **kwargs)

    return fn


def sharded_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    param_shardings: Any,
    adapter_shardings: Any,
    opt_state_shardings: Any,
    batch_sharding: Any,
    has_aux: bool = False,
    strict: bool = False,
    donate: bool = True,
    gather: Sequence[str] = ("fsdp",),
    update_params: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """:func:`jaxlora.train_step` jitted with explicit input/output shardings and donation.

    The step keeps adapters and optimizer state in the shardings they came in with (so
    they can be donated and the next step reuses the buffers), reads the frozen base
    params in theirs, and returns replicated metrics.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      tx: The optimizer the state was initialised with.
      param_shardings: From :func:`param_shardings`.
      adapter_shardings: From :func:`adapter_shardings`.
      opt_state_shardings: From :func:`opt_state_shardings`.
      batch_sharding: A sharding (or a tree of them) for the batch, e.g.
        :func:`batch_sharding`.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux_dict)``.
      strict: Passed to :func:`jaxlora.adapt`.
      donate: Donate the adapters and optimizer state buffers.
      gather: Mesh axes over which the base params are all-gathered once at the top of the
        step (FSDP: split at rest, whole where used). Without it XLA may instead keep the
        kernels split, replicate the batch and all-reduce every activation, then gather
        each kernel again for the backward pass. ``()`` leaves the choice to XLA.
      update_params: For optimizers that also move the base (Delta-LoRA, see
        :func:`jaxlora.train_step`): the step returns ``(params, adapters, opt_state,
        metrics)``, params keep their shardings and are donated too.

    Returns:
      ``step(params, adapters, opt_state, batch) -> (adapters, opt_state, metrics)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> mesh = make_mesh()
      >>> params = {"w": {"kernel": jnp.eye(4)}}
      >>> psh = param_shardings(params, llama_rules("dp"), mesh)
      >>> ad = init_adapters(jl.lora(rank=2, targets=".*kernel"), jax.random.key(0),
      ...                    params, psh)
      >>> ash = adapter_shardings(ad, psh)
      >>> tx = jl.optimizer(optax.sgd(0.1))
      >>> state = init_opt_state(tx, ad, ash)
      >>> step = sharded_train_step(
      ...     lambda p, b: jnp.mean((b @ p["w"]["kernel"]) ** 2), tx,
      ...     param_shardings=psh, adapter_shardings=ash,
      ...     opt_state_shardings=opt_state_shardings(tx, ad, ash),
      ...     batch_sharding=batch_sharding(mesh))
      >>> ad, state, metrics = step(params, ad, state, jnp.ones((8, 4)))
      >>> float(metrics["loss"])
      1.0
    """
    mesh = next(s.mesh for s in jax.tree_util.tree_leaves(adapter_shardings) if hasattr(s, "mesh"))
    step = train_step(
        gathered(loss_fn, param_shardings, gather),
        tx,
        has_aux=has_aux,
        strict=strict,
        jit=False,
        update_params=update_params,
    )
    replicated = NamedSharding(mesh, P())
    out = (adapter_shardings, opt_state_shardings, replicated)
    if update_params:
        out = (param_shardings, *out)
    donated = ((0, 1, 2) if update_params else (1, 2)) if donate else ()
    return jax.jit(
        step,
        in_shardings=(param_shardings, adapter_shardings, opt_state_shardings, batch_sharding),
        out_shardings=out,
        donate_argnums=donated,
    )


# ----------------------------------------------------------------------------- inspection

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
