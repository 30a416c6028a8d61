"""How pytrees are laid out on disk: plain nested dicts keyed by key path, small arrays packed.

Every tree is written as a nested dict of arrays keyed by the string entries of each leaf's
key path (:func:`jaxlora.keypaths.path_tuple`, boxes kept so the tree round-trips exactly),
so the files do not depend on pytree node classes. A *manifest* (path, shape, dtype of every
leaf) is recorded beside it, and a restore target whose manifest differs is refused.

orbax spends a few KB of index and metadata per array, which would more than double a VeRA
checkpoint (hundreds of vectors of a few hundred floats each). Arrays up to
:data:`PACK_LIMIT` bytes are therefore packed into one flat buffer per dtype, each at a
recorded offset, so restoring one is an exact slice.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxlora.checkpoint.errors import CheckpointError
from jaxlora.keypaths import lookup, nest, path_tuple

__all__ = [
    "PACK_LIMIT",
    "leaf_paths",
    "manifest",
    "pack",
    "packed_slots",
    "restore_target",
    "to_host",
    "unpack",
]

PACKED = "__packed__"
PACK_LIMIT = 1 << 18
"""Arrays up to this many bytes are packed into one buffer per dtype."""

Path = tuple[str, ...]


def leaf_paths(tree: Any) -> tuple[list[Path], list[Any], Any]:
    """``(paths, leaves, treedef)`` of ``tree``, each path a tuple of strings."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_tuple(kp, unbox=False) for kp, _ in flat], [x for _, x in flat], treedef


def manifest(paths: list[Path], leaves: list[Any]) -> list[list[Any]]:
    """``[joined path, shape, dtype name]`` of every leaf."""
    return [
        ["/".join(p), list(np.shape(x)), np.dtype(x.dtype).name]
        for p, x in zip(paths, leaves, strict=True)
    ]


def _nbytes(x: Any) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def to_host(leaves: list[Any], small_only: bool = False) -> list[np.ndarray | None]:
    """Host copies of the leaves this process holds in full (``None`` for the others, and
    with ``small_only`` for those too large to pack), fetched in one batch: every
    device-to-host copy is started before any is waited for. On CPU the copy is a view of
    the device buffer."""
    local = [
        (not isinstance(x, jax.Array) or x.is_fully_addressable)
        and (not small_only or _nbytes(x) <= PACK_LIMIT)
        for x in leaves
    ]
    for x, ok in zip(leaves, local, strict=True):
        if ok and isinstance(x, jax.Array):
            x.copy_to_host_async()
    return [np.asarray(x) if ok else None for x, ok in zip(leaves, local, strict=True)]


def pack(
    paths: list[Path], leaves: list[Any], host: list[Any] | None = None
) -> tuple[dict[str, Any], dict[str, list]]:
    """The nested dict for orbax, and ``{dtype: [[joined path, offset], ...]}`` of the packed.

    Packing copies the small arrays to the host (they are small), from ``host`` (their
    :func:`to_host` copies) when given; arrays another process holds parts of are left
    alone.
    """
    plain: dict[Path, Any] = {}
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    host = [None] * len(leaves) if host is None else host
    for path, x, h in zip(paths, leaves, host, strict=True):
        local = not isinstance(x, jax.Array) or x.is_fully_addressable
        if _nbytes(x) <= PACK_LIMIT and local:
            h = np.asarray(x) if h is None else h
            groups.setdefault(np.dtype(x.dtype).name, []).append(("/".join(path), h))
        else:
            plain[path] = x
    nested = nest(plain)
    if PACKED in nested:
        raise CheckpointError(f"a tree with a top-level key {PACKED!r} cannot be saved")
    slots: dict[str, list[list[Any]]] = {}
    buffers = {}
    for dtype, members in groups.items():
        offset, rows = 0, []
        for joined, x in members:
            rows.append([joined, offset])
            offset += x.size
        slots[dtype] = rows
        buffers[dtype] = np.concatenate([x.ravel() for _, x in members])
    if buffers:
        nested[PACKED] = buffers
    return nested, slots


def packed_slots(slots: dict[str, list]) -> dict[str, tuple[str, int]]:
    """``{joined path: (dtype, offset)}`` from the slots :func:`pack` recorded."""
    return {joined: (dt, off) for dt, rows in slots.items() for joined, off in rows}


def restore_target(
    paths: list[Path], abstract: list[Any], slots: dict[str, list], replicated: Any
) -> dict[str, Any]:
    """The nested abstract tree orbax restores: unpacked leaves plus the packed buffers.

    The buffers are read whole on every process (``replicated``) and sliced afterwards.
    """
    where = packed_slots(slots)
    nested = nest({p: a for p, a in zip(paths, abstract) if "/".join(p) not in where})
    if slots:
        sizes = dict.fromkeys(slots, 0)
        for p, a in zip(paths, abstract):
            hit = where.get("/".join(p))
            if hit is not None:
                sizes[hit[0]] = max(sizes[hit[0]], hit[1] + math.prod(a.shape))
        nested[PACKED] = {
            dt: jax.ShapeDtypeStruct((n,), dt, sharding=replicated) for dt, n in sizes.items()
        }
    return nested


def unpack(
    restored: dict[str, Any], paths: list[Path], abstract: list[Any], slots, on_host=None
) -> list:
    """The leaves in ``paths`` order: read plainly or sliced out of their packed buffer and
    placed in the abstract leaf's sharding.

    Args:
      on_host: Called with ``{joined path: host array}`` of the packed leaves before they
        are put on devices (the checksums are verified there).
    """
    where = packed_slots(slots)
    host: dict[str, np.ndarray] = {}
    for dt in slots:
        buf = restored[PACKED][dt]
        if isinstance(buf, jax.Array) and not buf.is_fully_addressable:
            buf = buf.addressable_data(0)  # replicated: every process holds all of it
        host[dt] = np.asarray(buf)
    chunks: dict[int, np.ndarray] = {}
    members: dict[str, np.ndarray] = {}
    for i, (p, a) in enumerate(zip(paths, abstract)):
        joined = "/".join(p)
        hit = where.get(joined)
        if hit is not None:
            dt, off = hit
            chunks[i] = members[joined] = host[dt][off : off + math.prod(a.shape)].reshape(a.shape)
    if on_host is not None and members:
        on_host(members)
    order = list(chunks)
    placed = dict(
        zip(
            order,
            jax.device_put([chunks[i] for i in order], [abstract[i].sharding for i in order]),
        )
    )
    return [placed[i] if i in placed else lookup(restored, p) for i, p in enumerate(paths)]
