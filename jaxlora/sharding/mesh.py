"""Device meshes with named axes, and the sharding of a batch over them.

One ``Mesh`` with the axes ``data`` (pure data parallelism), ``fsdp`` (fully sharded data
parallelism) and ``tensor`` (model parallelism), built the same way on one device, on fake
CPU devices, on a TPU pod slice or on several GPU hosts. The batch is split over the data
axes, FSDP included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.sharding.errors import ShardingError

__all__ = ["AXES", "BATCH_AXES", "batch_sharding", "make_mesh", "mesh_shape"]

AXES = ("data", "fsdp", "tensor")
"""Default mesh axis names: pure data parallelism, fully sharded data parallelism, tensor
(model) parallelism."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over: FSDP is data parallelism too."""


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
      >>> from jaxlora.sharding import mesh_shape
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
      >>> from jaxlora.sharding import make_mesh
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


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Sharding of a batch whose leading axis is split over ``axes`` (data and FSDP).

    Use it as the ``in_shardings`` entry of a whole batch pytree (a prefix): every leaf's
    leading dimension must be divisible by the product of those axes' sizes.

    Examples:
      >>> from jaxlora.sharding import make_mesh, batch_sharding
      >>> batch_sharding(make_mesh()).spec
      P(('data', 'fsdp'),)
    """
    names = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, P(names))
