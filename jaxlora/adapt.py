"""``adapt``: run any JAX function on adapted parameters without merging them.

``adapt(fn)(params, adapters, *args) == fn(merge(params, adapters), *args)`` in value and in
gradient, but the merged kernel is never formed where it is used as a linear map. Training
through a merged ``W + s·A@B`` makes XLA compute the full weight gradient ``xᵀ·dy`` of every
targeted kernel (it does not re-associate it away), which costs as much as full
fine-tuning. ``adapt`` instead traces ``fn`` to a jaxpr once (cached by input
shapes/dtypes) and re-evaluates it with each targeted kernel replaced by a lazy value
``(W, A, B)``:

* a ``dot_general`` that meets a lazy kernel computes ``x·W`` plus the low-rank term
  ``s·(x·A)·B`` with the same index labels, for any dimension numbers (multi-axis inputs,
  batch dims from a ``vmap`` over stacked layers, ``W.T`` uses such as a tied decoder);
* transposes, reshapes, squeezes, ``expand_dims``, dtype casts and sharding constraints are
  applied to ``W`` and carried into the factors, so the kernel stays lazy;
* nested ``jit`` is inlined, ``scan`` is rebuilt with :func:`jax.lax.scan` (a stacked lazy
  kernel is passed as ``xs``, so its factors are sliced with it), remat is rebuilt with
  :func:`jax.checkpoint` and ``cond`` with :func:`jax.lax.switch`; a lazy kernel that such a
  body only passes through (``nnx.remat`` returns the module's state, kernels included)
  leaves it still lazy;
* anywhere else the kernel is materialised as ``W + ΔW`` at that point: never wrong, only
  slower. Every such merge is recorded in an :class:`AdaptReport` (see
  :func:`adapt_report`), and ``adapt(fn, strict=True)`` raises instead.

Everything primitive-specific lives in the ``_RULES`` table at the bottom: ``jax.extend.core``
has no compatibility promise, so the supported jax range is pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora.adapters import Adapter, adapter_nodes, map_targeted, shared_state
from jaxlora.quant import constrain, gather_rows
from jaxlora.targets import is_kernel_leaf, path_str

__all__ = ["AdaptError", "AdaptReport", "adapt", "adapt_report", "layer_shardings"]

STACK, IN, OUT = 0, 1, 2


class AdaptError(RuntimeError):
    """Raised by ``adapt(fn, strict=True)`` where a targeted kernel would be merged."""


@dataclasses.dataclass
class AdaptReport:
    """Where each targeted kernel went during one trace of an adapted function.

    Attributes:
      targets: Paths of all targeted kernels.
      fast: Path -> number of distinct ``dot_general`` sites computed unmerged.
      merged: Path -> names of the primitives at which the kernel was materialised.
    """

    targets: tuple[str, ...] = ()
    fast: dict[str, int] = dataclasses.field(default_factory=dict)
    merged: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def num_merged(self) -> int:
        """Total number of places where a kernel was materialised as ``W + ΔW``."""
        return sum(len(v) for v in self.merged.values())

    @property
    def unused(self) -> tuple[str, ...]:
        """Targets that never reached a ``dot_general`` nor a merge."""
        return tuple(t for t in self.targets if t not in self.fast and t not in self.merged)

    @property
    def all_fast(self) -> bool:
        """Every target took the unmerged path at least once and nothing was merged."""
        return not self.merged and not self.unused


class _Ctx:
    """Per-call interpretation state: strictness and the report being filled in."""

    def __init__(self, strict: bool, targets: Sequence[str], fuse: bool = True, rng: Any = None):
        self.strict = strict
        # the low-rank dropout key of the current scope (a scan body folds in its step);
        # each dropout site folds in its own number, in trace order
        self.rng = rng
        self._sites = itertools.count()
        self.fuse = fuse and rng is None  # dropout draws one mask per target, as PEFT
        # first low-rank products computed ahead for a group sharing one input, by eqn id
        self.prefused: dict[int, jax.Array] = {}
        self.report = AdaptReport(targets=tuple(targets))
        # sites are deduplicated because scan/cond may trace a body more than once
        self._fast_sites: set[tuple[str, int]] = set()
        self._merge_sites: set[tuple[str, int]] = set()
        # id(stacked input) -> sharding of one of its scanned slices (see layer_shardings)
        self.layers: dict[int, Any] = {}
        self.frozen: set[int] = set()  # ids of the params leaves that get no gradient

    def dropout_key(self) -> jax.Array:
        return jax.random.fold_in(self.rng, next(self._sites))

    def hit(self, path: str | None, eqn: Any) -> None:
        if path is None:  # a non-targeted quantized kernel: nothing to report
            return
        if (path, id(eqn)) not in self._fast_sites:
            self._fast_sites.add((path, id(eqn)))
            self.report.fast[path] = self.report.fast.get(path, 0) + 1

    def merged(self, k: _Lazy, where: str, site: Any) -> jax.Array:
        if k.path is None:  # a non-targeted quantized kernel, dequantized where it is used
            return k.materialize()
        if self.strict:
            raise AdaptError(
                f"adapt(strict=True): targeted kernel {k.path!r} flows into {where!r}, which "
                "has no unmerged rule, so W + ΔW would be materialised there. Restructure "
                "the model so the kernel meets a dot_general (matmul/einsum), or drop "
                "strict=True to accept the merge."
            )
        if (k.path, id(site)) not in self._merge_sites:
            self._merge_sites.add((k.path, id(site)))
            self.report.merged.setdefault(k.path, []).append(where)
        return k.materialize()


def _letters():
    return iter(string.ascii_letters)


class _Lazy:
    """A targeted kernel seen through a chain of layout ops, with its low-rank factors.

    ``w`` is the base kernel as the program sees it (the chain applied). ``roles[i]`` says
    whether view axis ``i`` is a stack, input or output axis. The factors are kept in the
    same view order: ``a: (stack..., in..., r)``, ``b: (stack..., r, out...)``, optional
    ``c: (stack..., out...)`` (per-column scale), each group in view-axis order.
    """

    def __init__(self, w, a, b, c, roles, scale, path, dropout=0.0, src=None):
        self.w, self.a, self.b, self.c = w, a, b, c
        self.roles, self.scale, self.path = tuple(roles), scale, path
        self.dropout = dropout
        # (node, shared) the factors were made from, while the kernel is still as it came
        # in: a scan over its layers then slices the node, not the stacked factors
        self.src = src

    @property
    def ndim(self) -> int:
        return len(self.roles)

    def groups(self) -> tuple[list[int], list[int], list[int]]:
        return tuple([i for i, r in enumerate(self.roles) if r == g] for g in (STACK, IN, OUT))

    def replace(self, **kw) -> _Lazy:
        d = dict(w=self.w, a=self.a, b=self.b, c=self.c, roles=self.roles, scale=self.scale)
        d.update(kw)
        return _Lazy(**d, path=self.path, dropout=self.dropout)

    def labelled(self, labels: Sequence[str]):
        """Einsum labels of ``a``, ``b``, ``c`` given one label per view axis (+ rank)."""
        st, inn, out = self.groups()
        s = "".join(labels[i] for i in st)
        i = "".join(labels[j] for j in inn)
        o = "".join(labels[j] for j in out)
        r = labels[-1]
        return f"{s}{i}{r}", f"{s}{r}{o}", f"{s}{o}"

    def factors_as(self, dtype):
        return self.a.astype(dtype), self.b.astype(dtype)

    def materialize(self) -> jax.Array:
        labels = list(itertools.islice(_letters(), self.ndim + 1))
        la, lb, lc = self.labelled(labels)
        view = "".join(labels[: self.ndim])
        a, b = self.factors_as(jnp.result_type(self.w.dtype, self.a.dtype))
        delta = jnp.einsum(f"{la},{lb}->{view}", a * self.scale, b)
        w = _dense(self.w) + delta.astype(self.w.dtype)
        if self.c is not None:
            w = (w * _broadcast(self.c, lc, view)).astype(self.w.dtype)
        return w


def _lazy_flatten(k: _Lazy):
    return (k.w, k.a, k.b, k.c), (k.roles, k.scale, k.path, k.dropout)


def _lazy_unflatten(aux, children):
    roles, scale, path, dropout = aux
    return _Lazy(*children, roles=roles, scale=scale, path=path, dropout=dropout)


jax.tree_util.register_pytree_node(_Lazy, _lazy_flatten, _lazy_unflatten)


def _broadcast(x: jax.Array, x_labels: str, out_labels: str) -> jax.Array:
    """Transposes/reshapes ``x`` so it broadcasts against an array labelled ``out_labels``."""
    order = [lb for lb in out_labels if lb in x_labels]
    x = jnp.transpose(x, [x_labels.index(lb) for lb in order])
    shape = [x.shape[order.index(lb)] if lb in order else 1 for lb in out_labels]
    return x.reshape(shape)


def _from_node(w: jax.Array, node: Adapter, shared: dict[str, Any]) -> _Lazy:
    f = node.factors(w, shared)
    lay = node.layout
    per_layer = getattr(node, "PER_LAYER_FACTORS", False) and lay.stack_axes[:1] == (0,)
    roles = [STACK] * len(lay.shape)
    for ax in lay.in_axes:
        roles[ax] = IN
    for ax in lay.out_axes:
        roles[ax] = OUT
    a, scale = f.a, f.scale
    if not isinstance(scale, int | float):
        a, scale = a * scale, 1.0
    src = (node, shared) if per_layer else None
    return _Lazy(w, a, f.b, f.col_scale, roles, float(scale), lay.path, f.dropout, src)


def _layer_node(node: Adapter, arrays: Sequence[Any]) -> Adapter:
    """``node`` for one layer of its leading stack axis, from its sliced arrays."""
    lay = node.layout

    def shift(axes):
        return tuple(a - 1 for a in axes)

    layout = dataclasses.replace(
        lay,
        shape=lay.shape[1:],
        stack_axes=shift(lay.stack_axes[1:]),
        in_axes=shift(lay.in_axes),
        out_axes=shift(lay.out_axes),
    )
    return dataclasses.replace(node, layout=layout, **dict(zip(node.ARRAYS, arrays)))


# ----------------------------------------------------------------------------- quantized


class _Deferred:
    """A quantized kernel seen through layout ops (``ops``) not yet applied to it.

    It stands where a lazy kernel's ``w`` would be. Layout ops are recorded, not run;
    any other use dequantizes it right there (see :func:`_bind`), so a quantized base is
    only ever dequantized per use, per scan step for a stacked kernel.
    """

    def __init__(self, q, ops: tuple = ()):
        self.q, self.ops = q, ops
        if ops and not _shape_preserving(ops):
            aval = ops[-1].outvars[0].aval
            self.shape, self.dtype = tuple(aval.shape), aval.dtype
        else:  # from the codes' shape, so that a scan-sliced kernel knows its own shape
            self.shape = tuple(q.shape)
            self.dtype = ops[-1].outvars[0].aval.dtype if ops else q.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def then(self, eqn) -> _Deferred:
        sharding = eqn.params.get("sharding")
        if eqn.primitive is _SHARDING and not self.ops and hasattr(sharding, "mesh"):
            # constrain (e.g. all-gather) the codes and scales, not a float copy
            return _Deferred(constrain(self.q, sharding))
        return _Deferred(self.q, (*self.ops, eqn))

    def value(self) -> jax.Array:
        x = self.q.dequantize()
        for eqn in self.ops:
            x = _bind(eqn, [x])[0]
        return x

    __jax_array__ = value  # value-reading factor code (DoRA's column norms)


class _Ops:
    """Recorded equations as pytree aux data (jaxpr equations are not hashable)."""

    def __init__(self, ops):
        self.ops = ops


jax.tree_util.register_pytree_node(
    _Deferred, lambda d: ((d.q,), _Ops(d.ops)), lambda aux, ch: _Deferred(ch[0], aux.ops)
)


def _shape_preserving(ops) -> bool:
    return all(e.primitive in (_CONVERT, _COPY) for e in ops)


def _dense(w: Any) -> Any:
    return w.value() if isinstance(w, _Deferred) else w


def _untargeted(q) -> _Lazy:
    """A quantized kernel without adapter: a lazy kernel with an empty (rank-0) update.

    It then travels through scan/remat/cond/jit and layout ops exactly like a targeted
    one and is dequantized only where it is used.
    """
    w = _Deferred(q)
    ax = q.axis % w.ndim
    roles = [STACK] * ax + [IN] + [OUT] * (w.ndim - ax - 1)
    a = jnp.zeros((*w.shape[: ax + 1], 0), w.dtype)
    b = jnp.zeros((*w.shape[:ax], 0, *w.shape[ax + 1 :]), w.dtype)
    return _Lazy(w, a, b, None, roles, 1.0, None)


def _kernel_input(x: Any, node: Adapter | None, shared: dict[str, Any]) -> Any:
    if node is not None:
        return _from_node(_Deferred(x) if is_kernel_leaf(x) else x, node, shared)
    return _untargeted(x) if is_kernel_leaf(x) else x


# ----------------------------------------------------------------------------- evaluation


def _bind(eqn, invals: Sequence[Any]) -> list[Any]:
    if any(isinstance(x, _Deferred) for x in invals):
        # Dequantize inside a remat region: the backward pass recomputes it from the codes
        # instead of saving a float copy of the kernel (stacked over a scan: of the model).
        def dequantized(*vals):
            return _bind(eqn, [_dense(x) for x in vals])

        return jax.checkpoint(dequantized)(*invals)
    params = eqn.primitive.get_bind_params(eqn.params)
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    with manager if manager is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(ctx: _Ctx, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    eqns = jaxpr.eqns
    uses: dict[Any, list[int]] = collections.defaultdict(list)
    for j, e in enumerate(eqns):
        if e.primitive is _DOT_GENERAL:
            for v in e.invars:
                if not isinstance(v, jex.core.Literal):
                    uses[v].append(j)
    for i, eqn in enumerate(eqns):
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(isinstance(x, _Lazy) for x in invals):
            if eqn.primitive is _DOT_GENERAL and ctx.fuse:
                _fuse_shared_inputs(ctx, eqns, i, invals, env, uses)
            rule = _RULES.get(eqn.primitive)
            if rule is not None:
                outs = rule(ctx, eqn, invals)
            if outs is None:
                name = eqn.primitive.name
                invals = [ctx.merged(x, name, eqn) if isinstance(x, _Lazy) else x for x in invals]
        if outs is None:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _plain(ctx: _Ctx, values: Sequence[Any], where: str, site: Any) -> list[Any]:
    return [ctx.merged(x, where, site) if isinstance(x, _Lazy) else x for x in values]


# ----------------------------------------------------------------------------- rules


class _Plan(NamedTuple):
    """How one ``dot_general`` against a lazy kernel splits into base + low-rank products."""

    k: _Lazy
    x: Any
    xs: str  # einsum labels of x
    lf: str  # labels of the factor contracted with x first
    ls: str  # labels of the second factor
    mid: str  # labels of the rank-r intermediate
    out: str  # labels of the result
    lc: str  # labels of the column scale
    a_first: bool  # x·A first (the usual case); x·Wᵀ contracts with B first
    kw: dict


def _plan(eqn, invals) -> _Plan | None:
    lhs, rhs = invals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k_is_rhs = isinstance(rhs, _Lazy)
    k, x = (rhs, lhs) if k_is_rhs else (lhs, rhs)
    kc, xc, kb, xb = (rc, lc, rb, lb) if k_is_rhs else (lc, rc, lb, rb)

    gen = _letters()
    xl = [next(gen) for _ in range(x.ndim)]
    kl: list[str | None] = [None] * k.ndim
    for a, b in zip(kc, xc):
        kl[a] = xl[b]
    for a, b in zip(kb, xb):
        kl[a] = xl[b]
    kl = [lbl if lbl is not None else next(gen) for lbl in kl]
    r = next(gen)
    xfree = [xl[i] for i in range(x.ndim) if i not in xc and i not in xb]
    kfree = [kl[i] for i in range(k.ndim) if i not in kc and i not in kb]
    out = "".join([xl[i] for i in xb] + (xfree + kfree if k_is_rhs else kfree + xfree))
    la, lb_, lc_ = k.labelled([*kl, r])
    if k.c is not None and not set(lc_) <= set(out):
        return None  # a column scale over contracted axes is not separable: merge
    roles_contracted = {k.roles[i] for i in kc}
    a_first = not (roles_contracted and roles_contracted <= {OUT})
    lf, ls = (la, lb_) if a_first else (lb_, la)
    xs = "".join(xl)
    keep = set(out) | set(ls)
    mid = "".join(dict.fromkeys(lbl for lbl in xs + lf if lbl in keep))
    kw = dict(
        preferred_element_type=eqn.params.get("preferred_element_type"),
        precision=eqn.params.get("precision"),
    )
    return _Plan(k, x, xs, lf, ls, mid, out, lc_, a_first, kw)


def _spec(plan: _Plan, *labels: str) -> tuple:
    """Hashable (labels..., preferred type, precision) for the custom-VJP products."""
    return (*labels, plan.kw["preferred_element_type"], plan.kw["precision"])


def _first_product(plan: _Plan, factor) -> jax.Array:
    if plan.a_first:
        return _x_times_a(_spec(plan, plan.xs, plan.lf, plan.mid), plan.x, factor)
    return jnp.einsum(f"{plan.xs},{plan.lf}->{plan.mid}", plan.x, factor, **plan.kw)


def _einsum(spec, expr, *ops):
    _, _, _, pet, precision = spec
    return jnp.einsum(expr, *ops, preferred_element_type=pet, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _x_times_a(spec, x, a):
    """``x·A``, whose backward computes ``dA`` rank-major.

    The gradient ``dA = xᵀ·dh`` has the shape ``(d_in, r)``. Computed in that layout, XLA's
    CPU backend emits a skinny, rank-minor matmul that is 10-25x slower than the same
    product computed as ``dhᵀ·x`` (``(r, d_in)``, long axis minor), which dominated LoRA's
    step time with MLP targets. So the backward computes it rank-major and transposes
    behind an optimisation barrier (without it XLA folds the transpose back into the dot).
    """
    xs, lf, mid, _, _ = spec
    return _einsum(spec, f"{xs},{lf}->{mid}", x, a)


def _x_times_a_fwd(spec, x, a):
    return _x_times_a(spec, x, a), (x, a)


def _x_times_a_bwd(spec, res, g):
    x, a = res
    xs, lf, mid, _, _ = spec
    dx = _einsum(spec, f"{mid},{lf}->{xs}", g, a).astype(x.dtype)
    rank_major = lf[-1] + lf[:-1]
    da = lax.optimization_barrier(_einsum(spec, f"{mid},{xs}->{rank_major}", g, x))
    da = jnp.transpose(da, [*range(1, len(lf)), 0]).astype(a.dtype)
    return dx, da


_x_times_a.defvjp(_x_times_a_fwd, _x_times_a_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _h_times_b(spec, h, b):
    """``h·B``, whose backward computes ``dB = hᵀ·g`` as a plain matmul.

    Left to autodiff, XLA:CPU lays ``dB``'s operands out by transposing the wide output
    gradient ``g`` (a ``(tokens, d_out)`` copy per target and step, the largest remaining
    cost of all-linear LoRA on CPU, found by profiling). Putting the small ``h`` rank-first
    instead, behind an optimisation barrier so XLA cannot fold the transpose back, makes
    ``dB`` an ordinary GEMM and moves only an r-wide array.
    """
    mid, ls, out, _, _ = spec
    return _einsum(spec, f"{mid},{ls}->{out}", h, b)


def _h_times_b_fwd(spec, h, b):
    return _h_times_b(spec, h, b), (h, b)


def _h_times_b_bwd(spec, res, g):
    h, b = res
    mid, ls, out, _, _ = spec
    dh = _einsum(spec, f"{out},{ls}->{mid}", g, b).astype(h.dtype)
    rank = [lbl for lbl in mid if lbl in ls and lbl not in out]
    rank_major = "".join(rank + [lbl for lbl in mid if lbl not in rank])
    ht = lax.optimization_barrier(jnp.einsum(f"{mid}->{rank_major}", h))
    db = _einsum(spec, f"{rank_major},{out}->{ls}", ht, g).astype(b.dtype)
    return dh, db


_h_times_b.defvjp(_h_times_b_fwd, _h_times_b_bwd)


def _dot_general(ctx: _Ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, _Lazy) and isinstance(rhs, _Lazy):
        lhs = ctx.merged(lhs, "dot_general of two targeted kernels", eqn)
        invals = [lhs, rhs]
    plan = _plan(eqn, invals)
    if plan is None:
        return None
    k = plan.k
    base = _bind(eqn, [lhs.w if k is lhs else lhs, rhs.w if k is rhs else rhs])[0]
    if k.a.shape[-1] == 0:  # a non-targeted quantized kernel: no update
        return [base]
    a, b = k.factors_as(k.w.dtype)
    first, second = (a, b) if plan.a_first else (b, a)
    h = ctx.prefused.pop(id(eqn), None)
    if h is None:
        h = _first_product(_dropped(ctx, plan), first)
    h = h * jnp.asarray(k.scale, h.dtype)
    if plan.a_first:
        spec = (
            plan.mid,
            plan.ls,
            plan.out,
            plan.kw["preferred_element_type"],
            plan.kw["precision"],
        )
        low = _h_times_b(spec, h, second)
    else:
        low = jnp.einsum(f"{plan.mid},{plan.ls}->{plan.out}", h, second, **plan.kw)
    y = base + low.astype(base.dtype)
    if k.c is not None:
        y = (y * _broadcast(k.c, plan.lc, plan.out)).astype(base.dtype)
    ctx.hit(k.path, eqn)
    return [y]


def _dropped(ctx: _Ctx, plan: _Plan) -> _Plan:
    """The plan with PEFT's ``lora_dropout`` applied to the low-rank branch's input."""
    rate = plan.k.dropout
    if not rate or ctx.rng is None:
        return plan  # exactly the undropped branch: no mask is drawn at all
    keep = 1.0 - rate
    mask = jax.random.bernoulli(ctx.dropout_key(), keep, plan.x.shape)
    x = jnp.where(mask, plan.x / jnp.asarray(keep, plan.x.dtype), jnp.zeros((), plan.x.dtype))
    return plan._replace(x=x)


def _fusion_key(plan: _Plan) -> tuple | None:
    """Plans with equal keys share ``x`` and can compute ``x·[A_1|A_2|...]`` at once."""
    a = plan.k.a
    stacked = STACK in plan.k.roles
    if not plan.a_first or stacked or plan.mid[-1:] != plan.lf[-1:] or not a.shape[-1]:
        return None
    kw = tuple(sorted((k, str(v)) for k, v in plan.kw.items()))
    return (plan.xs, plan.lf, plan.mid, a.shape[:-1], str(a.dtype), str(plan.k.w.dtype), kw)


def _fuse_shared_inputs(ctx: _Ctx, eqns, i: int, invals, env, uses) -> None:
    """Computes the first low-rank product of every lazy ``dot_general`` sharing eqn i's input.

    Several targets often read the same activation (q/k/v, gate/up). One ``x·[A_q|A_k|A_v]``
    reads ``x`` once and runs one rank-3r matmul (and one in the backward pass) instead of
    three skinny rank-r ones, which on CPU are memory-bound. The results are stashed in
    ``ctx.prefused`` for the later equations of the group.
    """
    eqn = eqns[i]
    if id(eqn) in ctx.prefused or sum(isinstance(x, _Lazy) for x in invals) != 1:
        return
    head = _plan(eqn, invals)
    key = None if head is None else _fusion_key(head)
    if key is None:
        return
    xvar = eqn.invars[1 if isinstance(invals[0], _Lazy) else 0]
    group = [(eqn, head)]
    for j in uses.get(xvar, ()):
        if j <= i:
            continue
        vals = [v.val if isinstance(v, jex.core.Literal) else env.get(v) for v in eqns[j].invars]
        if sum(isinstance(x, _Lazy) for x in vals) != 1:
            continue  # its kernel is not lazy (yet): it simply runs on its own
        plan = _plan(eqns[j], vals)
        if plan is not None and plan.x is head.x and _fusion_key(plan) == key:
            group.append((eqns[j], plan))
    if len(group) < 2:
        return
    factors = [p.k.factors_as(p.k.w.dtype)[0] for _, p in group]
    h = _first_product(head, jnp.concatenate(factors, axis=-1))
    splits = np.cumsum([f.shape[-1] for f in factors])[:-1]
    for (e, _), part in zip(group, jnp.split(h, splits, axis=-1)):
        ctx.prefused[id(e)] = part


def _view_op(fn: Callable[[_Lazy, Any, Any], _Lazy | None]):
    """A rule for a layout op: applies the primitive to ``w`` and ``fn`` to the factors."""

    def rule(ctx, eqn, invals):
        (k,) = invals[:1]
        if not isinstance(k, _Lazy) or any(isinstance(x, _Lazy) for x in invals[1:]):
            return None
        if isinstance(k.w, _Deferred) and len(invals) == 1:
            w = k.w.then(eqn)  # a quantized kernel: recorded, applied once dequantized
        else:
            w = _bind(eqn, [k.w, *invals[1:]])[0]
        new = fn(k, w, eqn)
        return None if new is None else [new]

    return rule


def _transpose(k: _Lazy, w, eqn):
    perm = eqn.params["permutation"]
    st, inn, out = k.groups()
    new = [[p for p in perm if k.roles[p] == g] for g in (STACK, IN, OUT)]
    ns = len(st)
    sp = [st.index(p) for p in new[0]]
    a = jnp.transpose(k.a, sp + [ns + inn.index(p) for p in new[1]] + [ns + len(inn)])
    b = jnp.transpose(k.b, [*sp, ns] + [ns + 1 + out.index(p) for p in new[2]])
    c = None if k.c is None else jnp.transpose(k.c, sp + [ns + out.index(p) for p in new[2]])
    return k.replace(w=w, a=a, b=b, c=c, roles=[k.roles[p] for p in perm])


def _reshape_roles(old: Sequence[int], new: Sequence[int], roles: Sequence[int]):
    """Roles of the axes of ``reshape(old -> new)``, or None if a new axis mixes roles.

    The reshape is split into chunks of old axes whose product equals a chunk of new axes
    (row-major). Size-1 axes carry no data, so they may join any chunk; a new size-1 axis
    on its own becomes a (size-1) stack axis.
    """
    out: list[int] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            out.append(STACK)
            j += 1
            continue
        i0, j0 = i, j
        po, pn = old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                po *= old[i]
                i += 1
            else:
                pn *= new[j]
                j += 1
        real = {roles[a] for a in range(i0, i) if old[a] != 1} or {roles[i0]}
        if len(real) != 1:
            return None
        out.extend([real.pop()] * (j - j0))
    return out


def _relayout(k: _Lazy, w) -> _Lazy | None:
    new_roles = _reshape_roles(k.w.shape, w.shape, k.roles)
    if new_roles is None:
        return None
    grp = [[w.shape[i] for i, r in enumerate(new_roles) if r == g] for g in (STACK, IN, OUT)]
    rank = k.a.shape[-1]
    a = k.a.reshape(*grp[0], *grp[1], rank)
    b = k.b.reshape(*grp[0], rank, *grp[2])
    c = None if k.c is None else k.c.reshape(*grp[0], *grp[2])
    return k.replace(w=w, a=a, b=b, c=c, roles=new_roles)


def _reshape(k: _Lazy, w, eqn):
    if eqn.params.get("dimensions") is not None:
        return None
    return _relayout(k, w)


def _broadcast_in_dim(k: _Lazy, w, eqn):
    # only expand_dims-style broadcasts (new axes of size 1) keep the kernel lazy
    dims = eqn.params["broadcast_dimensions"]
    shape = eqn.params["shape"]
    if list(dims) != sorted(dims) or any(shape[d] != s for d, s in zip(dims, k.w.shape)):
        return None
    if any(shape[i] != 1 for i in range(len(shape)) if i not in dims):
        return None
    return _relayout(k, w)


def _same_layout(k: _Lazy, w, eqn):
    del eqn
    return k.replace(w=w)


def _sharding_constraint(k: _Lazy, w, eqn):
    sharding = eqn.params.get("sharding")
    if getattr(sharding, "spec", None) is None or not hasattr(sharding, "mesh"):
        return k.replace(w=w)
    return _constrain(k, w, sharding)


def _constrain(k: _Lazy, w, sharding):
    # Constrain the factors like the kernel they share an axis with, rank replicated.
    spec = tuple(sharding.spec) + (None,) * (k.ndim - len(tuple(sharding.spec)))
    st, inn, out = k.groups()
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding

    def con(x, axes, rank_pos):
        parts = [spec[i] for i in axes]
        if rank_pos is not None:
            parts.insert(rank_pos, None)
        return lax.with_sharding_constraint(x, NS(sharding.mesh, P(*parts)))

    a = con(k.a, st + inn, len(st) + len(inn))
    b = con(k.b, st + out, len(st))
    c = None if k.c is None else con(k.c, st + out, None)
    return k.replace(w=w, a=a, b=b, c=c)


def _inline(ctx, eqn, invals):
    closed = eqn.params["jaxpr"]
    return _eval(ctx, closed.jaxpr, closed.consts, invals)


def _closed_call(ctx, eqn, invals):
    closed = eqn.params["call_jaxpr"]
    return _eval(ctx, closed.jaxpr, closed.consts, invals)


def _remat(ctx, eqn, invals):
    jaxpr = eqn.params["jaxpr"]

    # A lazy kernel leaves the body as a lazy value (its W, A, B are outputs of the
    # checkpoint): nnx.remat returns the module's state, kernels included, unchanged, and
    # materialising W + ΔW there would cost a merge per call, or an AdaptError when strict.
    def body(*vals):
        return _eval(ctx, jaxpr, (), vals)

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return fn(*invals)


def _passed_through(jaxpr, i: int) -> int | None:
    """The input position that output ``i`` of ``jaxpr`` returns unchanged, or None."""
    v = jaxpr.outvars[i]
    if isinstance(v, jex.core.Literal):
        return None
    return next((j for j, u in enumerate(jaxpr.invars) if u is v), None)


def _cond(ctx, eqn, invals):
    index, *ops = invals
    if isinstance(index, _Lazy):
        return None
    branches = eqn.params["branches"]
    # An output every branch returns as the same lazy operand is that operand: it stays
    # lazy instead of being merged (and a merge it would be dropped by the caller anyway).
    n_out = len(branches[0].jaxpr.outvars)
    through: dict[int, int] = {}
    for i in range(n_out):
        src = {_passed_through(br.jaxpr, i) for br in branches}
        (j,) = src if len(src) == 1 else (None,)
        if j is not None and isinstance(ops[j], _Lazy):
            through[i] = j
    rest = [i for i in range(n_out) if i not in through]

    def branch(closed):
        def f(*vals):
            outs = _eval(ctx, closed.jaxpr, closed.consts, vals)
            return _plain(ctx, [outs[i] for i in rest], "cond output", eqn)

        return f

    computed = lax.switch(index, [branch(br) for br in branches], *ops)
    outs = dict(zip(rest, computed))
    outs.update({i: ops[j] for i, j in through.items()})
    return [outs[i] for i in range(n_out)]


def _scan(ctx, eqn, invals):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    closed = p["jaxpr"]
    jaxpr = closed.jaxpr
    # A carry the body returns unchanged is loop-invariant, and a ``ys`` output that is the
    # body's own slice of a stacked ``xs`` kernel re-stacks to that kernel: both leave the
    # scan as the lazy value they entered as, rather than merged.
    fixed = {
        c
        for c in range(ncarry)
        if isinstance(invals[nc + c], _Lazy) and _passed_through(jaxpr, c) == nc + c
    }
    consts = invals[:nc]
    init = [
        x if c in fixed else _plain(ctx, [x], "scan carry", eqn)[0]
        for c, x in enumerate(invals[nc : nc + ncarry])
    ]
    xs = [
        ctx.merged(x, "scan over a non-stacked kernel axis", eqn)
        if isinstance(x, _Lazy) and (x.roles[0] != STACK or not _sliceable(x.w))
        else x
        for x in invals[nc + ncarry :]
    ]
    n_ys = len(jaxpr.outvars) - ncarry
    ys_from: dict[int, int] = {}
    for y in range(n_ys):
        src = _passed_through(jaxpr, ncarry + y)
        if src is not None and src >= nc + ncarry and isinstance(xs[src - nc - ncarry], _Lazy):
            ys_from[y] = src - nc - ncarry
    loop_carry = [c for c in range(ncarry) if c not in fixed]
    loop_ys = [y for y in range(n_ys) if y not in ys_from]
    # a lazy kernel travels as its children, sliced along the leading stack axis together
    packed = [_as_bits(ctx, x, _packed(x)) for x in xs]
    outer_rng = ctx.rng
    if outer_rng is not None:  # each step draws its own dropout masks
        scan_key = ctx.dropout_key()
        packed.append(jnp.arange(p["length"]))

    def body(carry, sliced):
        if outer_rng is not None:
            *sliced, step = sliced
            ctx.rng = jax.random.fold_in(scan_key, step)
        vals = [_unpacked(x, s) for x, s in zip(xs, sliced)]
        vals = [_gather_layer(ctx, x, v) for x, v in zip(xs, vals)]
        full_carry = dict(zip(loop_carry, carry))
        full_carry.update({c: init[c] for c in fixed})
        args = [*consts, *(full_carry[c] for c in range(ncarry)), *vals]
        outs = _eval(ctx, jaxpr, closed.consts, args)
        outs = [outs[c] for c in loop_carry] + [outs[ncarry + y] for y in loop_ys]
        outs = _plain(ctx, outs, "scan output", eqn)
        ctx.rng = outer_rng
        return outs[: len(loop_carry)], outs[len(loop_carry) :]

    if any(_leaf_id(x) in ctx.layers for x in xs):
        # The backward pass must gather each layer again, not keep every layer's gathered
        # copy as a residual (the whole stack again). Only rematerialising the body does
        # that: a names policy would have to override a remat inside the layer, and XLA
        # then saves all of its activations. A layer already under remat costs no more.
        body = jax.checkpoint(body, prevent_cse=False)
    carry, ys = lax.scan(
        body,
        [init[c] for c in loop_carry],
        packed,
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    carry_out = dict(zip(loop_carry, carry))
    carry_out.update({c: init[c] for c in fixed})
    ys_out = dict(zip(loop_ys, ys))
    ys_out.update({y: xs[i] for y, i in ys_from.items()})
    return [*(carry_out[c] for c in range(ncarry)), *(ys_out[y] for y in range(n_ys))]


def _packed(x: Any) -> Any:
    # what a scan slices of one xs value: a lazy kernel made from a node whose factors
    # opt in (VeRA's d*B_s*b, A_s broadcast over layers) as its kernel and the node's own
    # arrays, so each layer's factors are formed in the loop body, never for the stack
    if not isinstance(x, _Lazy):
        return x
    if x.src is not None:
        node = x.src[0]
        return (x.w, [getattr(node, f) for f in node.ARRAYS])
    return _lazy_flatten(x)[0]


def _unpacked(x: Any, s: Any) -> Any:
    if not isinstance(x, _Lazy):
        return s
    if x.src is not None:
        (w, arrays), (node, shared) = s, x.src
        return _from_node(w, _layer_node(node, arrays), shared)
    return _Lazy(*s, roles=x.roles[1:], scale=x.scale, path=x.path, dropout=x.dropout)


def _leaf_id(x: Any) -> int:
    # the params leaf a scan input stands for: a lazy kernel's base, a quantized kernel's
    # codes and scales as they came in (see layer_shardings)
    w = x.w if isinstance(x, _Lazy) else x
    if isinstance(w, _Deferred) and not w.ops:
        w = w.q
    return id(w)


def _sliceable(w: Any) -> bool:
    # recorded layout ops other than casts describe the unsliced kernel
    return not isinstance(w, _Deferred) or _shape_preserving(w.ops)


_LAYER_SHARDINGS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "jaxlora_layer_shardings", default=None
)


@contextlib.contextmanager
def layer_shardings(shardings: Mapping[str, Any]):
    """Within this context, ``adapt`` constrains each scanned layer's slice of a parameter.

    ``shardings`` maps a ``params`` key path to the sharding of *one layer* of that stacked
    leaf (its leading axis dropped). Where the leaf is sliced by a ``scan`` as it came in,
    the slice (and a lazy kernel's factors with it) is constrained inside the loop body, so
    FSDP all-gathers one layer per iteration instead of the whole stack up front. Such a
    scan body is rematerialised, so the backward pass gathers each layer again rather than
    keeping every gathered layer as a residual.
    :func:`jaxlora.sharding.sharded_train_step` sets it; it is read when the adapted
    function is called (traced), not when it is built.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jl.sharding.make_mesh({"fsdp": -1})
      >>> def f(p, x):
      ...     return jax.lax.scan(lambda h, w: (h @ w, None), x, p["stack"])[0].sum()
      >>> p = {"stack": jnp.ones((3, 2, 2))}
      >>> ad = jl.lora(rank=1, targets=jl.Target("stack", stack_axes=(0,))).init(
      ...     jax.random.key(0), p)
      >>> with layer_shardings({"stack": NamedSharding(mesh, P(None, None))}):
      ...     float(jax.jit(jl.adapt(f))(p, ad, jnp.ones((1, 2))))
      16.0
    """
    token = _LAYER_SHARDINGS.set(dict(shardings))
    try:
        yield
    finally:
        _LAYER_SHARDINGS.reset(token)


def _gather_layer(ctx: _Ctx, stacked: Any, sliced: Any) -> Any:
    sharding = ctx.layers.get(_leaf_id(stacked))
    if sharding is None:
        return sliced
    if isinstance(sliced, _Lazy):
        w = sliced.w
        if isinstance(w, _Deferred):  # the layer's packed codes and scales, not a float copy
            w = _Deferred(constrain(_layout_barrier(w.q, sharding), sharding), w.ops)
        else:
            w = lax.with_sharding_constraint(_layout_barrier(w, sharding), sharding)
            w = _from_bits(w, stacked.w.dtype)
        return _constrain(sliced, w, sharding)
    gathered = lax.with_sharding_constraint(_layout_barrier(sliced, sharding), sharding)
    return _from_bits(gathered, stacked.dtype)


def _as_bits(ctx: _Ctx, x: Any, packed: Any) -> Any:
    # XLA:CPU has no 16-bit float arithmetic: it rewrites every bf16 op (the scan's slice and
    # the all-gather included) to f32 and hoists the loop-invariant conversion of the whole
    # stacked kernel out of the loop, an f32 copy of weights/N. Sliced and gathered as its
    # 16-bit payload, a layer is converted only where it is used, and the gather moves the
    # bytes a TPU or GPU moves. _gather_layer casts it back.
    w = x.w if isinstance(x, _Lazy) else x
    sharding = ctx.layers.get(_leaf_id(x))
    if (
        sharding is None
        or _leaf_id(x) not in ctx.frozen  # a bit-cast has no gradient
        or not _on_cpu(sharding)
        or isinstance(w, _Deferred)
        or not jnp.issubdtype(w.dtype, jnp.floating)
        or jnp.dtype(w.dtype).itemsize != 2
    ):
        return packed
    bits = lax.bitcast_convert_type(w, jnp.uint16)
    return (bits, *packed[1:]) if isinstance(x, _Lazy) else bits


def _from_bits(x: Any, dtype: Any) -> Any:
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _on_cpu(sharding: Any) -> bool:
    devices = getattr(getattr(sharding, "mesh", None), "devices", None)
    return devices is not None and devices.flat[0].platform == "cpu"


def _layout_barrier(x: Any, sharding: Any) -> Any:
    # XLA:CPU lays out an all-gather's operand with the gathered axis outermost and carries
    # that layout back through the scan's slice to the whole stacked input, which it then
    # copies (transposed) before the loop: weights/N more temporaries. A barrier between the
    # slice and the gather keeps the layout change to the one layer. CPU only: other
    # backends gather along any axis and the barrier would only constrain their scheduling.
    return lax.optimization_barrier(x) if _on_cpu(sharding) else x


def _prim(*names: str):
    prims = jex.core.primitives
    for n in names:
        if hasattr(prims, n):
            return getattr(prims, n)
    return None


_DOT_GENERAL = _prim("dot_general_p")
_CONVERT, _COPY = _prim("convert_element_type_p"), _prim("copy_p")
_SHARDING = _prim("sharding_constraint_p")


# The one table of primitive-specific behaviour (see the module docstring).
def _gather(ctx: _Ctx, eqn, invals):
    """A lookup in a non-targeted quantized table gathers rows of codes, then dequantizes."""
    k, indices = invals
    if not isinstance(k, _Lazy) or k.path is not None or isinstance(indices, _Lazy):
        return None
    if not isinstance(k.w, _Deferred) or not _shape_preserving(k.w.ops):
        return None
    rows = gather_rows(k.w.q, indices, **eqn.params)
    if rows is None:
        return None
    for op in k.w.ops:  # dtype casts commute with the gather
        rows = _bind(op, [rows])[0]
    return [rows]


_RULES: dict[Any, Callable] = {
    prim: rule
    for prim, rule in [
        (_DOT_GENERAL, _dot_general),
        (_prim("transpose_p"), _view_op(_transpose)),
        (_prim("reshape_p"), _view_op(_reshape)),
        (_prim("squeeze_p"), _view_op(lambda k, w, e: _relayout(k, w))),
        (_prim("broadcast_in_dim_p"), _view_op(_broadcast_in_dim)),
        (_prim("convert_element_type_p"), _view_op(_same_layout)),
        (_prim("copy_p"), _view_op(_same_layout)),
        (_prim("sharding_constraint_p"), _view_op(_sharding_constraint)),
        (_prim("jit_p", "pjit_p"), _inline),
        (_prim("closed_call_p"), _closed_call),
        (_prim("remat_p", "checkpoint_p"), _remat),
        (_prim("cond_p"), _cond),
        (_prim("scan_p"), _scan),
        (_prim("gather_p"), _gather),
    ]
    if prim is not None
}


# ----------------------------------------------------------------------------- public API


def _is_dynamic(x: Any) -> bool:
    return is_kernel_leaf(x) or isinstance(
        x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct
    )


_CACHE_SIZE = 64


def adapt(fn: Callable, *, strict: bool = False, fuse: bool = True) -> Callable:
    """Transforms ``fn(params, *args)`` into ``fn_adapted(params, adapters, *args)``.

    ``adapt(fn)(params, adapters, *args, **kwargs)`` equals
    ``fn(jaxlora.merge(params, adapters), *args, **kwargs)`` in value and in gradient with
    respect to ``adapters``, but computes each targeted kernel's ``dot_general`` as the base
    product plus the low-rank product, so training costs forward + activation backward plus
    the small adapter products, and no weight gradient of the frozen kernels. Take gradients
    with respect to ``adapters``; ``params`` is a separate, frozen argument.

    ``fn`` may be any JAX-traceable function of a parameter pytree: plain JAX, a Flax linen
    ``apply``, an NNX ``merge``-and-call, with nested ``jit``, ``scan`` over stacked layers,
    remat and ``cond``. Non-array arguments (Python bools, strings...) are treated as static.
    The traced program is cached by input shapes/dtypes (and static arguments), so eager
    calls do not re-trace.

    Args:
      fn: The function to adapt; its first argument is the parameter pytree.
      strict: Raise :class:`AdaptError` instead of materialising ``W + ΔW`` where a
        targeted kernel meets an operation with no unmerged rule.
      fuse: Where several targeted kernels multiply the same input (q/k/v, gate/up),
        compute ``x·[A_1|A_2|...]`` in one matmul. Same values; fewer, wider products.

    Returns:
      The adapted function. Its ``last_report`` attribute holds the :class:`AdaptReport` of
      the most recent call (see also :func:`adapt_report`). It also takes a keyword-only
      ``dropout_rng``: a PRNG key for the low-rank dropout of adapters made with
      ``dropout > 0`` (PEFT's ``lora_dropout``: ``x@W + s·(dropout(x)@A)@B``, one mask per
      kernel use and scan step). Without it (evaluation) nothing is dropped, bit for bit.

    Raises:
      AdaptError: With ``strict=True``, naming the kernel and the primitive.
      ValueError: If ``adapters`` targets a kernel that ``params`` lacks or has another shape.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
      >>> def f(p, x):
      ...     return jnp.tanh(x @ p["w"]["kernel"]).sum()
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> x = jnp.ones((5, 4))
      >>> bool(jnp.allclose(jl.adapt(f)(params, adapters, x), f(jl.merge(params, adapters), x)))
      True
      >>> grads = jax.grad(jl.adapt(f), argnums=1)(params, adapters, x)

      With low-rank dropout, training passes a fresh key per step:

      >>> dropped = jl.lora(rank=2, targets=".*kernel", dropout=0.1).init(jax.random.key(0), params)
      >>> train_loss = jl.adapt(f)(params, dropped, x, dropout_rng=jax.random.key(1))
    """
    cache: collections.OrderedDict = collections.OrderedDict()

    def trace(treedef, static, avals):
        key = (treedef, static, avals)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit

        def flat_fn(*dyn):
            it = iter(dyn)
            leaves = [next(it) if s is _DYN else s for s in static]
            p, args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(p, *args, **kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        entry = (closed, jax.tree_util.tree_structure(out_shape))
        # a program closing over tracers of an enclosing trace must not outlive it
        if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            cache[key] = entry
            if len(cache) > _CACHE_SIZE:
                cache.popitem(last=False)
        return entry

    @functools.wraps(fn)
    def adapted(params, adapters, *args, dropout_rng=None, **kwargs):
        nodes = adapter_nodes(adapters)
        shared = shared_state(adapters)
        ctx = _Ctx(strict, tuple(nodes), fuse, dropout_rng)
        # Check targeted params leaves first, substituting fully trained copies for their
        # base leaves: a mismatch must be reported as such, not as whatever shape error
        # tracing fn on the wrong params would raise.
        base = {id(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_kernel_leaf)}
        params = map_targeted(params, adapters, lambda node, w, sh: w, lambda p, copy, w: copy)
        # a quantized kernel is one leaf: fn is traced with a float kernel of its shape
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel_leaf)[0]
        paths = [path_str(kp) for kp, _ in flat]
        leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_kernel_leaf)

        per_layer = _LAYER_SHARDINGS.get() or {}
        ctx.layers = {id(leaves[i]): per_layer[p] for i, p in enumerate(paths) if p in per_layer}
        # frozen base leaves (not fully trained copies, which are differentiated)
        ctx.frozen = {id(x) for x in leaves[: len(paths)] if id(x) in base}
        static = tuple(_DYN if _is_dynamic(x) else x for x in leaves)
        avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves if _is_dynamic(x))
        try:
            closed, out_tree = trace(treedef, static, avals)
        except TypeError as e:
            if "unhashable" not in str(e):
                raise
            raise TypeError(
                "adapt: non-array arguments are treated as static and must be hashable"
            ) from e
        # params leaves come first in `leaves`; targeted kernels become lazy (W, A, B) values
        inputs = [
            _kernel_input(x, nodes.get(paths[i]) if i < len(paths) else None, shared)
            for i, x in enumerate(leaves)
            if _is_dynamic(x)
        ]

        outs = _eval(ctx, closed.jaxpr, closed.consts, inputs)
        outs = _plain(ctx, outs, "function output", closed)
        adapted.last_report = ctx.report
        return jax.tree_util.tree_unflatten(out_tree, outs)

    adapted.last_report = None
    return adapted


class _DynType:
    def __repr__(self):
        return "<dynamic>"


_DYN = _DynType()


def adapt_report(fn: Callable, params: Any, adapters: Any, *args, **kwargs) -> AdaptReport:
    """Traces ``adapt(fn)`` abstractly and reports which kernels took the unmerged path.

    Nothing is computed (``jax.eval_shape``), so this is cheap enough to assert in tests or
    to check a new model before training it.

    Args:
      fn: The function that would be adapted.
      params: The base parameters (arrays or ``jax.ShapeDtypeStruct``).
      adapters: The adapters tree.
      *args: Further arguments of ``fn``.
      **kwargs: Keyword arguments of ``fn``.

    Returns:
      An :class:`AdaptReport`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> report = jl.adapt_report(lambda p, x: x @ p["w"]["kernel"], params, adapters,
      ...                          jnp.ones((2, 4)))
      >>> report.fast, report.all_fast
      ({'w/kernel': 1}, True)
      >>> report = jl.adapt_report(lambda p: jnp.sin(p["w"]["kernel"]), params, adapters)
      >>> report.merged
      {'w/kernel': ['sin']}
    """
    f = adapt(fn)
    jax.eval_shape(lambda p, a, ar, kw: f(p, a, *ar, **kw), params, adapters, args, kwargs)
    return f.last_report
