"""The adapters pytree: per-kernel adapter nodes that mirror the parameter tree.

``method.init(key, params)`` returns a nested dict that follows the ``"/"``-joined key paths
of the targeted kernels, with one :class:`Adapter` node at each (and, for methods with
state shared across layers such as VeRA, one entry under :data:`SHARED_KEY`). A node is a
pytree whose children are its arrays and whose static aux data is its configuration (the
kernel layout, rank, scale), so the tree is self-describing: ``adapt``, ``merge`` and
``unmerge`` need nothing else, and ``jax.tree_util`` / optax / orbax see plain arrays.

Every method expresses its update in one canonical low-rank form, which is what lets one
``adapt`` rule serve all of them::

    W_eff = (W + scale * einsum(A, B)) * col_scale
    A: (stack..., in..., r)     B: (stack..., r, out...)     col_scale: (stack..., out...)

with axes in the kernel's (stack, in, out) groups (``col_scale`` is ``None`` except for
DoRA-style methods). :meth:`Adapter.factors` returns that form.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import string
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.keypaths import path_str
from jaxlora.quant import dense
from jaxlora.targets import KernelLayout, is_kernel_leaf

__all__ = [
    "SHARED_KEY",
    "Adapter",
    "Factors",
    "SharedState",
    "adapter_nodes",
    "labels",
    "map_parts",
    "map_targeted",
    "merge",
    "num_trainable",
    "register_adapter",
    "register_shared",
    "unmerge",
]

SHARED_KEY = "__shared__"
"""Top-level key of the adapters tree holding state shared by all layers (VeRA)."""

FROZEN = "frozen"
"""The label of adapter arrays that are never trained."""

FULL_KEY = "__full__"
"""Top-level key of the adapters tree holding fully trained copies of base leaves."""

FULL = "full"
"""The label of fully trained leaves (a classifier head, or everything in full fine-tuning)."""

_RESERVED = (SHARED_KEY, FULL_KEY)


class Factors(NamedTuple):
    """A method's update in canonical form (see the module docstring)."""

    a: jax.Array
    b: jax.Array
    scale: float | jax.Array
    col_scale: jax.Array | None = None
    dropout: float = 0.0
    """Dropout rate on the low-rank branch's input (PEFT's ``lora_dropout``), applied by
    :func:`jaxlora.adapt` when it is given a ``dropout_rng``; never by ``merge``."""


class Adapter(abc.ABC):
    """Base class of per-kernel adapter nodes.

    Subclasses are frozen dataclasses registered with :func:`register_adapter`: fields named
    in ``ARRAYS`` are pytree children, every other field (``layout`` first) is static.
    ``LABELS`` maps each array field to its optimizer label, ``AXES`` to the kernel-layout
    groups of its axes (``"stack"``, ``"in"``, ``"out"``, ``"rank"``; e.g.
    ``{"a": ("stack", "in", "rank")}``), by which :mod:`jaxlora.sharding` shards each axis
    like the kernel axis it stands for (``rank``: replicated).

    Every node answers one question, :meth:`factors`: its update in the canonical form,
    given the base kernel (most methods ignore its values; DoRA's column scale reads them).
    """

    ARRAYS: ClassVar[tuple[str, ...]] = ()
    LABELS: ClassVar[dict[str, str]] = {}
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {}
    layout: KernelLayout

    @abc.abstractmethod
    def factors(self, w: jax.Array, shared: dict[str, Any]) -> Factors:
        """The canonical ``(A, B, scale, col_scale)`` of this adapter on base kernel ``w``.

        Args:
          w: The base kernel (or, where a method ignores its values, anything of its
            shape and dtype).
          shared: The adapters tree's shared state (:func:`shared_state`).
        """

    def delta(self, w: jax.Array, shared: dict[str, Any]) -> jax.Array:
        """``scale * A@B`` laid out like the kernel (``col_scale`` not applied)."""
        f = self.factors(w, shared)
        lay = self.layout
        ns, ni, no = len(lay.stack_axes), len(lay.in_axes), len(lay.out_axes)
        letters = iter(string.ascii_letters)
        s, i, o = ([next(letters) for _ in range(n)] for n in (ns, ni, no))
        r = next(letters)
        canon = "".join(s + i + o)
        d = jnp.einsum(f"{''.join(s + i)}{r},{''.join(s)}{r}{''.join(o)}->{canon}", f.a, f.b)
        # canonical (stack, in, out) order back to the kernel's own axis order
        inverse = [0] * len(lay.shape)
        for pos, ax in enumerate(lay.canonical_order):
            inverse[ax] = pos
        return f.scale * jnp.transpose(d, inverse)

    def col_scale(self, w: jax.Array, shared: dict[str, Any]) -> jax.Array | None:
        """``col_scale`` broadcast to the kernel's axes, or ``None``."""
        c = self.factors(w, shared).col_scale
        if c is None:
            return None
        lay = self.layout
        shape = [1] * len(lay.shape)
        for ax in lay.stack_axes + lay.out_axes:
            shape[ax] = lay.shape[ax]
        order = sorted(lay.stack_axes + lay.out_axes)
        perm = [(lay.stack_axes + lay.out_axes).index(ax) for ax in order]
        return jnp.transpose(c, perm).reshape(shape)

    def merge_kernel(self, w: jax.Array, shared: dict[str, Any]) -> jax.Array:
        out = w + self.delta(w, shared).astype(w.dtype)
        c = self.col_scale(w, shared)
        return out if c is None else (out * c).astype(w.dtype)

    def unmerge_kernel(self, w: jax.Array, shared: dict[str, Any]) -> jax.Array:
        if self.factors(w, shared).col_scale is not None:
            raise ValueError(
                f"{type(self).__name__} at {self.layout.path!r} rescales columns with a "
                "magnitude that depends on the unmerged kernel; it cannot be unmerged from "
                "the merged weights alone"
            )
        return w - self.delta(w, shared).astype(w.dtype)


class SharedState:
    """Base class of state shared by every layer, stored under ``adapters["__shared__"][name]``.

    Subclasses are frozen dataclasses registered with :func:`register_shared`: fields named
    in ``ARRAYS`` are pytree children, the others static. The hooks let generic code
    (checkpoints) store the state compactly without knowing the method: :meth:`compact`
    drops what :meth:`expand` can regenerate, and :meth:`reproducible` says whether that
    round trip is exact for these values. By default nothing is dropped.
    """

    ARRAYS: ClassVar[tuple[str, ...]] = ()

    def compact(self) -> SharedState:
        """The state without what :meth:`expand` regenerates; works on any leaf type
        (arrays, shapes, shardings), since it only rearranges fields."""
        return self

    def expand(self) -> SharedState:
        """Regenerates what :meth:`compact` dropped (a compact state has concrete leaves)."""
        return self

    def reproducible(self) -> bool:
        """Whether ``self.compact().expand()`` equals ``self`` bit for bit."""
        return False


def register_shared(cls: type) -> type:
    """Makes a :class:`SharedState` subclass a frozen dataclass and a pytree node."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in cls.ARRAYS]
    return jax.tree_util.register_dataclass(cls, data_fields=list(cls.ARRAYS), meta_fields=meta)


def register_adapter(cls: type) -> type:
    """Makes an :class:`Adapter` subclass a frozen dataclass and a pytree node.

    Fields listed in ``cls.ARRAYS`` become children; the others are static aux data and must
    be hashable.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in cls.ARRAYS]
    return jax.tree_util.register_dataclass(cls, data_fields=list(cls.ARRAYS), meta_fields=meta)


def _is_node(x: Any) -> bool:
    return isinstance(x, Adapter)


def _body(adapters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in adapters.items() if k not in _RESERVED}


def map_parts(
    adapters: dict[str, Any],
    nodes: Callable[[dict[str, Any]], dict[str, Any]],
    shared: Callable[[dict[str, Any]], Any],
    full: Callable[[dict[str, Any]], Any],
) -> dict[str, Any]:
    """Maps each part of an adapters tree with its own function, keeping which parts exist.

    The parts: the per-kernel nodes (everything but the reserved keys), the shared state
    under :data:`SHARED_KEY` and the fully trained copies under :data:`FULL_KEY`. This is
    the one place that splits a tree by its reserved keys.
    """
    out = nodes(_body(adapters))
    if SHARED_KEY in adapters:
        out[SHARED_KEY] = shared(adapters[SHARED_KEY])
    if FULL_KEY in adapters:
        out[FULL_KEY] = full(adapters[FULL_KEY])
    return out


def adapter_nodes(adapters: Any) -> dict[str, Adapter]:
    """All adapter nodes of an adapters tree, keyed by the path of the kernel they adapt."""
    if not isinstance(adapters, dict):
        raise TypeError(
            f"adapters must be the dict returned by a method's init(), got {type(adapters)}"
        )
    leaves = jax.tree_util.tree_leaves(_body(adapters), is_leaf=_is_node)
    nodes = {}
    for leaf in leaves:
        if not isinstance(leaf, Adapter):
            raise TypeError(
                f"adapters tree holds a {type(leaf).__name__} outside any adapter node; "
                "pass the tree returned by a method's init()"
            )
        nodes[leaf.layout.path] = leaf
    return nodes


def full_leaves(adapters: dict[str, Any]) -> dict[str, Any]:
    """The fully trained leaves of an adapters tree, keyed by the base leaf's path."""
    flat = jax.tree_util.tree_flatten_with_path(adapters.get(FULL_KEY, {}))[0]
    return {path_str(kp): x for kp, x in flat}


def check_full_leaf(path: str, value: Any, w: Any) -> None:
    """Raises if a fully trained copy no longer fits the base leaf it replaces."""
    if tuple(value.shape) != tuple(w.shape) or value.dtype != w.dtype:
        raise ValueError(
            f"fully trained leaf {path!r} is {value.dtype}{list(value.shape)} but params hold "
            f"{w.dtype}{list(w.shape)} there"
        )


def shared_state(adapters: dict[str, Any]) -> dict[str, Any]:
    """The shared (cross-layer) entries of an adapters tree, keyed by method name."""
    return adapters.get(SHARED_KEY, {})


def replace_shared(adapters: dict[str, Any], entries: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``adapters`` with the shared entries in ``entries`` replaced."""
    if not entries:
        return adapters
    return {**adapters, SHARED_KEY: {**shared_state(adapters), **entries}}


def check_kernel(node: Adapter, w: Any) -> None:
    """Raises if ``w`` is not the shape the adapter was made for."""
    lay = node.layout
    if tuple(w.shape) != lay.shape:
        raise ValueError(
            f"adapter for {lay.path!r} was made for shape {lay.shape}, but params hold "
            f"shape {tuple(w.shape)} there"
        )


def map_targeted(params: Any, adapters: Any, fn, full_fn) -> Any:
    """``params`` with ``fn(node, w, shared)`` at every adapted kernel and
    ``full_fn(path, copy, w)`` at every fully trained leaf, each checked against the leaf it
    stands for; a target missing from ``params`` is an error. ``merge``, ``unmerge`` and
    ``adapt`` are this map."""
    nodes = adapter_nodes(adapters)
    full = full_leaves(adapters)
    shared = shared_state(adapters)
    seen = set()

    def visit(kp, w):
        path = path_str(kp)
        if path in full:
            seen.add(path)
            check_full_leaf(path, full[path], w)
            return full_fn(path, full[path], w)
        node = nodes.get(path)
        if node is None:
            return w
        seen.add(node.layout.path)
        check_kernel(node, w)
        return fn(node, w, shared)

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_kernel_leaf)
    missing = sorted((set(nodes) | set(full)) - seen)
    if missing:
        raise ValueError(f"adapters target kernels missing from params: {missing}")
    return out


def _float(params: Any) -> Any:
    return jax.tree_util.tree_map(dense, params, is_leaf=is_kernel_leaf)


def merge(params: Any, adapters: Any) -> Any:
    """Folds every adapter into its kernel: ``W -> W + ΔW``.

    Pure and exact; works for any pytree ``params``. Used for export and inference; training
    uses :func:`jaxlora.adapt`, which never forms the merged kernel.

    Args:
      params: The base parameter pytree.
      adapters: An adapters tree from a method's ``init``.

    Returns:
      A pytree like ``params`` with the targeted kernels replaced by merged ones (same dtype).
      Quantized kernels (:func:`jaxlora.quantize`) come back dequantized, targeted or not:
      merged weights are float.

    Raises:
      ValueError: If a targeted kernel is missing from ``params`` or has another shape.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> bool((jl.merge(params, adapters)["dense"]["kernel"] == 1).all())  # B starts at 0
      True
    """
    params = _float(params)  # merged weights are float, quantized kernels included
    return map_targeted(
        params,
        adapters,
        lambda node, w, sh: node.merge_kernel(w, sh),
        lambda path, value, w: value,
    )


def unmerge(params: Any, adapters: Any) -> Any:
    """Inverts :func:`merge`: ``W + ΔW -> W`` (up to floating-point rounding).

    Args:
      params: Merged parameters.
      adapters: The adapters that were merged into them.

    Returns:
      The base parameters.

    Raises:
      ValueError: As :func:`merge`, or for an adapter whose merge cannot be inverted.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> back = jl.unmerge(jl.merge(params, adapters), adapters)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0))
      True
    """

    def no_base(path, value, w):
        raise ValueError(
            f"{path!r} is fully trained (replaced, not adapted): merging discarded its base "
            "value, so it cannot be unmerged; keep the original params instead"
        )

    return map_targeted(
        _float(params), adapters, lambda node, w, sh: node.unmerge_kernel(w, sh), no_base
    )


def labels(adapters: Any) -> Any:
    """The optimizer label of every array in an adapters tree.

    Returns a tree of the same structure with a string at each leaf (``"lora_a"``,
    ``"lora_b"``, ``"frozen"``, ...), ready for ``optax.multi_transform``/``optax.partition``.

    Args:
      adapters: An adapters tree from a method's ``init`` (arrays or shape structs).

    Returns:
      The label tree.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> jax.tree_util.tree_leaves(jl.labels(adapters))
      ['lora_a', 'lora_b']
    """

    def label_node(x):
        if isinstance(x, Adapter):
            return dataclasses.replace(x, **{f: x.LABELS[f] for f in x.ARRAYS})
        return FROZEN

    # shared cross-layer state (VeRA's random matrices) is frozen unless a node says
    # otherwise
    by_node = functools.partial(jax.tree_util.tree_map, label_node, is_leaf=_is_node)
    return map_parts(
        adapters, by_node, by_node, functools.partial(jax.tree_util.tree_map, lambda x: FULL)
    )


def num_trainable(adapters: Any) -> int:
    """Number of trainable scalars in an adapters tree (frozen arrays excluded).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> jl.num_trainable(adapters)  # 2 * r * (d_in + d_out)
      14
    """
    lab = jax.tree_util.tree_leaves(labels(adapters))
    arrs = jax.tree_util.tree_leaves(adapters)
    return sum(int(a.size) for a, lb in zip(arrs, lab, strict=True) if lb != FROZEN)


class Method(NamedTuple):
    """A parameter-efficient fine-tuning method: a name and a pure ``init``.

    ``init(key, params)`` reads only shapes and dtypes of ``params`` (it works under
    ``jax.eval_shape`` and ``jax.jit(..., out_shardings=...)``) and returns the adapters
    tree. Use :meth:`prepare` to start training: it also returns the base to train with.
    The library's methods also take ``init(key, params, like=(fn, *args))``, which reads
    the axes of kernels whose target gives none off how ``fn`` uses them
    (:func:`jaxlora.infer_targets`).
    """

    name: str
    """The method's name (recorded in checkpoints)."""
    init: Any
    """``init(key, params) -> adapters``."""
    replaces_base: bool = False
    """Whether the adapters take over part of the base, so that training must start from
    the residual ``unmerge(params, adapters)`` (PiSSA)."""

    def prepare(self, key: jax.Array, params: Any, like: Any = None) -> tuple[Any, dict[str, Any]]:
        """``(base, adapters)`` to train with; ``merge(base, adapters)`` equals ``params``.

        For most methods ``base`` is ``params``; for one that moves part of each kernel into
        its adapter (PiSSA) it is the residual. ``init`` alone does not give it.
        ``like=(fn, *args)`` is passed to ``init`` (kernel axes from use).

        Examples:
          >>> import jax, jax.numpy as jnp, jaxlora as jl
          >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
          >>> method = jl.lora(rank=2, targets=".*kernel", init="pissa")
          >>> base, adapters = method.prepare(jax.random.key(1), params)
          >>> back = jl.merge(base, adapters)["dense"]["kernel"]
          >>> bool(jnp.allclose(back, params["dense"]["kernel"], atol=1e-5))
          True
        """
        adapters = self.init(key, params) if like is None else self.init(key, params, like=like)
        if not self.replaces_base:
            return params, adapters
        # fully trained leaves (a head beside PiSSA) replace their base: it stays as it is
        adapted = {k: v for k, v in adapters.items() if k != FULL_KEY}
        return unmerge(params, adapted), adapters


def compose(*methods: Method) -> Method:
    """Several methods at once, on disjoint targets: one ``init`` returning one tree.

    Args:
      *methods: The methods; each gets its own PRNG key (split from ``init``'s).

    Returns:
      A :class:`Method` named ``"a+b+..."``.

    Raises:
      ValueError: From ``init``, if two methods target the same leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"body": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
      >>> method = jl.compose(jl.lora(rank=2, targets="body/kernel"), jl.full(targets="head/.*"))
      >>> adapters = method.init(jax.random.key(0), params)
      >>> sorted(set(jax.tree_util.tree_leaves(jl.labels(adapters))))
      ['full', 'lora_a', 'lora_b']
    """
    if not methods:
        raise ValueError("compose needs at least one method")

    def init(key: jax.Array, params: Any, like: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for method, k in zip(methods, jax.random.split(key, len(methods))):
            tree = method.init(k, params) if like is None else method.init(k, params, like=like)
            paths = [*adapter_nodes(tree), *full_leaves(tree)]
            clash = sorted(p for p in paths if p in owner)
            if clash:
                raise ValueError(
                    f"compose: {method.name!r} and {owner[clash[0]]!r} both target {clash}"
                )
            owner.update(dict.fromkeys(paths, method.name))
            _deep_update(out, tree)
        return out

    replaces = any(m.replaces_base for m in methods)
    return Method("+".join(m.name for m in methods), init, replaces)


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
