"""Kernel axes inferred from use: which axes of a kernel the model contracts, and which it stacks.

A kernel of three or more axes does not say by its shape which axes are its input, its
output and its stacked layers: ``(L, d, H, Dh)`` may be a scanned ``DenseGeneral`` query
projection or many other things. The model's program does say it. :func:`infer_targets`
traces ``fn`` to a jaxpr (abstractly: only shapes are read) and follows each selected
kernel, as ``adapt`` does, through layout ops (transposes, reshapes, casts, sharding
constraints), nested ``jit``/remat/``custom_vjp`` bodies, ``cond`` branches and ``scan``
bodies (a ``scan`` over a kernel slices its leading axis: a stacked layer axis) to every
``dot_general`` that consumes it. There the contracting dimensions are its input axes, the
batch dimensions (a ``vmap`` over stacked layers) stacked axes, the rest its output axes.

Use is all it reads: a ``vmap`` that batches the kernel but not its input (``in_axes=(0,
None)``) lowers to a ``dot_general`` that produces the layer axis like an output axis, and
that is what is inferred; give ``stack_axes`` explicitly there.

A kernel whose uses disagree, or that is never contracted, cannot be split from use: that is
an error naming the kernel and every use found, so the user can write the
:class:`~jaxlora.Target` by hand.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from jaxlora.keypaths import path_str
from jaxlora.targets import Target, TargetError, match

__all__ = ["infer_layouts", "infer_targets"]


@dataclasses.dataclass(frozen=True)
class _Flow:
    """A kernel seen through layout ops: view axis ``i`` holds original axes ``axes[i]``."""

    path: str
    axes: tuple[tuple[int, ...], ...]
    sliced: tuple[int, ...] = ()  # original axes a scan sliced away on the way here


class _Uses:
    """Every use of every followed kernel, in the order met."""

    def __init__(self):
        self.dots: dict[str, list[tuple[tuple[int, ...], ...]]] = {}
        self.other: dict[str, list[str]] = {}

    def dot(self, path, layout):
        self.dots.setdefault(path, []).append(layout)

    def opaque(self, path, where):
        self.other.setdefault(path, []).append(where)


def _orig(flow: _Flow, view_axes) -> set[int]:
    return {a for v in view_axes for a in flow.axes[v]}


def _dot_general(uses: _Uses, eqn, vals) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for flow, contract, batch in ((vals[0], lc, lb), (vals[1], rc, rb)):
        if not isinstance(flow, _Flow):
            continue
        free = [i for i in range(len(flow.axes)) if i not in contract and i not in batch]
        c, b, f = _orig(flow, contract), _orig(flow, batch), _orig(flow, free)
        stack = b | set(flow.sliced)
        if c & f or c & stack or f & stack or not c or not f:
            uses.opaque(flow.path, "dot_general splitting one kernel axis across roles")
            continue
        uses.dot(flow.path, (tuple(sorted(stack)), tuple(sorted(c)), tuple(sorted(f))))


def _reshape_axes(old_shape, new_shape, axes) -> tuple[tuple[int, ...], ...] | None:
    """Original axes of each axis of ``reshape(old -> new)`` (row-major chunks)."""
    out: list[tuple[int, ...]] = []
    i = j = 0
    while i < len(old_shape) or j < len(new_shape):
        if i < len(old_shape) and old_shape[i] == 1 and (j >= len(new_shape) or new_shape[j] != 1):
            i += 1
            continue
        if j < len(new_shape) and new_shape[j] == 1 and (i >= len(old_shape) or old_shape[i] != 1):
            out.append(())
            j += 1
            continue
        if i >= len(old_shape) or j >= len(new_shape):
            return None
        i0, j0 = i, j
        po, pn = old_shape[i], new_shape[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                po *= old_shape[i]
                i += 1
            else:
                pn *= new_shape[j]
                j += 1
        chunk = tuple(sorted({a for k in range(i0, i) for a in axes[k]}))
        out.extend([chunk] * (j - j0))
    return tuple(out)


def _view(eqn, flow: _Flow) -> _Flow | None:
    name = eqn.primitive.name
    shape_in = eqn.invars[0].aval.shape
    shape_out = eqn.outvars[0].aval.shape
    if name in (
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "reduce_precision",
    ):
        return flow
    if name == "transpose":
        return dataclasses.replace(
            flow, axes=tuple(flow.axes[p] for p in eqn.params["permutation"])
        )
    if name == "squeeze":
        dims = {d % len(shape_in) for d in eqn.params["dimensions"]}
        return dataclasses.replace(
            flow, axes=tuple(a for i, a in enumerate(flow.axes) if i not in dims)
        )
    if name in ("reshape", "broadcast_in_dim"):
        if name == "reshape" and eqn.params.get("dimensions") is not None:
            return None
        if name == "broadcast_in_dim":
            dims = eqn.params["broadcast_dimensions"]
            if list(dims) != sorted(dims) or any(shape_out[d] != s for d, s in zip(dims, shape_in)):
                return None
            if any(shape_out[i] != 1 for i in range(len(shape_out)) if i not in dims):
                return None
        axes = _reshape_axes(shape_in, shape_out, flow.axes)
        return None if axes is None else dataclasses.replace(flow, axes=axes)
    return None


_VIEWS = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "reduce_precision",
    "transpose",
    "squeeze",
    "reshape",
    "broadcast_in_dim",
}


def _walk(uses: _Uses, jaxpr, inputs: Sequence[Any]) -> list[Any]:
    """Follows the flows in ``inputs`` (a ``_Flow`` or None per invar) through ``jaxpr``."""
    env = {v: x for v, x in zip(jaxpr.invars, inputs, strict=True) if isinstance(x, _Flow)}

    def read(v):
        return None if isinstance(v, jex.core.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        if not any(isinstance(x, _Flow) for x in vals):
            continue
        outs = _rule(uses, eqn, vals)
        for v, x in zip(eqn.outvars, outs):
            if isinstance(x, _Flow):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _sub(closed):
    return getattr(closed, "jaxpr", closed)


def _rule(uses: _Uses, eqn, vals) -> list[Any]:
    name = eqn.primitive.name
    p = eqn.params
    none = [None] * len(eqn.outvars)
    if name == "dot_general":
        _dot_general(uses, eqn, vals)
        return none
    if name in _VIEWS:
        new = _view(eqn, vals[0]) if isinstance(vals[0], _Flow) else None
        if new is None:
            for x in vals:
                if isinstance(x, _Flow):
                    uses.opaque(x.path, name)
        return [new]
    if name == "scan":
        nc, ncarry = p["num_consts"], p["num_carry"]
        body = []
        for i, x in enumerate(vals):
            if isinstance(x, _Flow) and i >= nc + ncarry:  # xs: the leading axis is sliced
                x = _Flow(x.path, x.axes[1:], x.sliced + x.axes[0])
            body.append(x)
        outs = _walk(uses, _sub(p["jaxpr"]), body)
        return [o if i < ncarry else None for i, o in enumerate(outs)]
    if name == "cond":
        outs = [_walk(uses, _sub(br), vals[1:]) for br in p["branches"]]
        return [o[0] if all(x == o[0] for x in o) else None for o in zip(*outs)]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        ops = vals[cn + bn :]
        _walk(uses, _sub(p["cond_jaxpr"]), [*vals[:cn], *ops])
        return _walk(uses, _sub(p["body_jaxpr"]), [*vals[cn : cn + bn], *ops])
    for key in ("jaxpr", "call_jaxpr"):  # jit, remat, closed_call, custom_jvp/vjp bodies
        sub = p.get(key)
        if sub is not None and len(_sub(sub).invars) == len(vals):
            return _walk(uses, _sub(sub), vals)
    for x in vals:
        if isinstance(x, _Flow):
            uses.opaque(x.path, name)
    return none


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def _describe(layout) -> str:
    stack, inn, out = layout
    return f"contracts axes {inn}, produces {out}, stacked {stack}"


def infer_layouts(
    fn: Callable, params: Any, args: Sequence[Any], paths: Sequence[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``(stack_axes, in_axes, out_axes)`` of each kernel in ``paths``, read off ``fn``'s uses.

    The engine behind :func:`infer_targets` (which see); ``paths`` are ``"/"``-joined key
    paths of leaves of ``params``.

    Raises:
      TargetError: For a kernel used with different contractions, or never contracted.
    """
    leaves, treedef = jax.tree_util.tree_flatten((params, tuple(args)))
    names = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    static = [None if _is_dynamic(x) else x for x in leaves]
    dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x)]

    def flat_fn(*xs):
        full = list(static)
        for i, x in zip(dyn, xs):
            full[i] = x
        p, a = jax.tree_util.tree_unflatten(treedef, full)
        return fn(p, *a)

    avals = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in dyn]
    closed = jax.make_jaxpr(flat_fn)(*avals)
    wanted = set(paths)
    inputs = []
    for i in dyn:
        path = names[i] if i < len(names) else None
        ndim = len(leaves[i].shape)
        inputs.append(_Flow(path, tuple((a,) for a in range(ndim))) if path in wanted else None)
    uses = _Uses()
    _walk(uses, closed.jaxpr, inputs)

    shapes = {names[i]: tuple(leaves[i].shape) for i in range(len(names))}
    out = {}
    for path in paths:
        found = list(dict.fromkeys(uses.dots.get(path, [])))
        other = sorted(set(uses.other.get(path, [])))
        seen = [_describe(u) for u in found] + [f"{o} (no contraction)" for o in other]
        if len(found) != 1:
            why = (
                "is never contracted by a dot_general"
                if not found
                else ("is used with different contractions")
            )
            raise TargetError(
                f"cannot infer the axes of {path!r} {shapes[path]} from use: it {why}; uses "
                f"found: {seen or ['none: fn never reads it']}. Pass an explicit "
                f"jl.Target({re.escape(path)!r}, in_axes=..., out_axes=..., stack_axes=...)"
            )
        stack, inn, o = found[0]
        ndim = len(shapes[path])
        # axes no use names (size-1 axes squeezed away) carry no data: count them as stacked
        rest = tuple(a for a in range(ndim) if a not in stack + inn + o)
        out[path] = (tuple(sorted(stack + rest)), inn, o)
    return out


def infer_targets(
    fn: Callable, params: Any, *args: Any, pattern: str, exclude: str | None = None
) -> tuple[Target, ...]:
    """Exact :class:`~jaxlora.Target` s for the kernels ``pattern`` selects, read off ``fn``.

    ``fn(params, *args)`` is traced abstractly (only shapes and dtypes are read) and each
    selected kernel is followed to the ``dot_general`` s that consume it: contracted axes are
    its input axes, the axes a ``scan`` slices or a ``vmap`` batches are stacked layer axes,
    the rest are output axes. ``method.init(key, params, like=(fn, *args))`` does the same
    for the kernels whose target gives no axes.

    Args:
      fn: The model function; its first argument is the parameter pytree.
      params: The parameters (arrays or ``jax.ShapeDtypeStruct``).
      *args: Example arguments of ``fn`` (arrays, shape structs, or static Python values).
      pattern: A regex matched with ``re.fullmatch`` against ``"/"``-joined key paths; leaves
        with fewer than two axes are skipped.
      exclude: Optional regex; matching paths are skipped.

    Returns:
      One :class:`~jaxlora.Target` per selected kernel, in the order of ``params``' leaves,
      with ``pattern`` the escaped path and explicit ``in_axes``/``out_axes``/``stack_axes``.

    Raises:
      TargetError: If ``pattern`` matches nothing, or a kernel is used with two different
        contractions or never contracted (the message lists the uses found).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"q": jnp.zeros((3, 8, 2, 4))}  # (layers, d, heads, head_dim)
      >>> def fn(p, x):
      ...     step = lambda h, w: (jnp.einsum("bd,dhk->bhk", h, w).reshape(h.shape), None)
      ...     return jax.lax.scan(step, x, p["q"])[0]
      >>> (t,) = jl.infer_targets(fn, params, jnp.ones((5, 8)), pattern="q")
      >>> t.stack_axes, t.in_axes, t.out_axes
      ((0,), (1,), (2, 3))
      >>> adapters = jl.lora(rank=2, targets="q").init(
      ...     jax.random.key(0), params, like=(fn, jnp.ones((5, 8))))
      >>> adapters["q"].a.shape, adapters["q"].b.shape
      ((3, 8, 2), (3, 2, 2, 4))
    """
    spec = Target(pattern, exclude=exclude)
    paths = list(match(params, spec))
    layouts = infer_layouts(fn, params, args, paths)
    return tuple(
        Target(re.escape(p), in_axes=inn, out_axes=out, stack_axes=stack)
        for p, (stack, inn, out) in layouts.items()
    )
