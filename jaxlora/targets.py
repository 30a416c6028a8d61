"""Target specs: which leaves of a parameter pytree get an adapter, and how they split.

A target is selected by a regular expression over the leaf's key path joined with
``"/"`` (``"layers/0/attn/q_proj/kernel"``), so it works for any pytree: a Flax linen
``variables["params"]`` dict, an NNX ``State``, an equinox module, a plain dict. For each
selected leaf the spec also says which axes are contracted with the input (``in_axes``),
which are produced (``out_axes``) and which are stacked layer axes (everything else, e.g.
the leading ``L`` of a scanned ``(L, d_in, d_out)`` kernel). A 2-D kernel defaults to Flax's
``(d_in, d_out)``; for any other the shape alone is ambiguous, so the axes are either
written (``Target(pattern, in_axes=(0, 1), out_axes=(2,))`` for a ``DenseGeneral`` output
projection ``(heads, head_dim, d)``) or read off the model's use of the kernel
(``select(..., like=(fn, *args))``, :mod:`jaxlora.infer`); a guess is refused.

Selection is strict on purpose: a pattern that matches nothing, or a matched leaf that cannot
be split, is an error that names the pattern and the paths that were seen, because a typo
in a target silently training nothing is the most expensive bug in fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax

from jaxlora.keypaths import path_str

__all__ = [
    "ALL_LINEAR",
    "KernelLayout",
    "Target",
    "TargetError",
    "is_kernel_leaf",
    "module_targets",
    "path_str",
    "select",
    "stacked",
]


class TargetError(ValueError):
    """A target spec that matches nothing or a leaf it cannot split."""


def is_kernel_leaf(x: Any) -> bool:
    """Whether ``x`` is a pytree node that stands for one kernel leaf.

    A quantized kernel (:class:`jaxlora.quant.QuantizedKernel`) is a node whose children
    are its packed codes and scales; target selection, ``adapt`` and ``merge`` treat it as
    one kernel of its logical ``shape`` and ``dtype``. Such nodes set the class attribute
    ``jaxlora_kernel = True``.
    """
    return getattr(type(x), "jaxlora_kernel", False) is True


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How one targeted kernel splits into stacked, input and output axes.

    All axis tuples are normalised (non-negative, sorted) and together cover every axis of
    the kernel exactly once.
    """

    path: str
    """The kernel's key path, ``"/"``-joined."""
    shape: tuple[int, ...]
    """The kernel's shape."""
    dtype: str
    """The kernel's dtype name."""
    stack_axes: tuple[int, ...]
    """Stacked layer axes (scanned layers); adapters are stacked along them too."""
    in_axes: tuple[int, ...]
    """Axes contracted with the layer input."""
    out_axes: tuple[int, ...]
    """Axes the layer produces."""

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.stack_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def num_stacked(self) -> int:
        return math.prod(self.stack_shape)

    @property
    def canonical_order(self) -> tuple[int, ...]:
        """The kernel's axes reordered as (stack..., in..., out...)."""
        return self.stack_axes + self.in_axes + self.out_axes


@dataclasses.dataclass(frozen=True)
class Target:
    """Selects kernels by a regex over their key path and says how each one splits.

    The axes may be given in full, in part, or not at all:

    * ``in_axes`` and ``out_axes`` given: ``stack_axes`` defaults to every other axis.
    * one of them given: the other is every axis that is neither it nor stacked.
    * neither given: a 2-D kernel is ``(d_in, d_out)`` (Flax's layout); with ``stack_axes``
      given, the two remaining axes are ``(in, out)`` in order (a scanned ``(L, d_in,
      d_out)`` stack is ``Target(pattern, stack_axes=(0,))``). Any other kernel is
      ambiguous and jaxlora does not guess: it raises a :class:`TargetError` saying how to
      fix it, unless ``method.init(key, params, like=(fn, *args))`` infers the axes from
      how ``fn`` uses the kernel (see :func:`jaxlora.infer_targets`).

    Attributes:
      pattern: A regular expression matched with ``re.fullmatch`` against the leaf's
        ``"/"``-joined key path.
      in_axes: Input (contracted) axes of the kernel; negative values count from the end.
      out_axes: Output axes of the kernel.
      stack_axes: Stacked layer axes.
      min_ndim: Leaves with fewer dimensions are skipped rather than matched (so a pattern
        such as ``".*"`` does not catch biases).
    """

    pattern: str
    in_axes: tuple[int, ...] | None = None
    out_axes: tuple[int, ...] | None = None
    stack_axes: tuple[int, ...] | None = None
    min_ndim: int = 2
    exclude: str | None = None
    """Optional regex; matching paths are skipped even if ``pattern`` matches."""

    @property
    def infers(self) -> bool:
        """Whether no axis is given, so ``like=`` may infer them all from use."""
        return self.in_axes is None and self.out_axes is None and self.stack_axes is None

    def matches(self, path: str, ndim: int) -> bool:
        if ndim < self.min_ndim or re.fullmatch(self.pattern, path) is None:
            return False
        return self.exclude is None or re.search(self.exclude, path) is None

    def layout(self, path: str, shape: tuple[int, ...], dtype: Any) -> KernelLayout:
        ndim = len(shape)

        def norm(axes: Sequence[int] | None, what: str) -> tuple[int, ...] | None:
            if axes is None:
                return None
            out = []
            for a in axes:
                if not -ndim <= a < ndim:
                    raise TargetError(
                        f"target {self.pattern!r}: {what} axis {a} is out of range for "
                        f"{path!r} with shape {shape}"
                    )
                out.append(a % ndim)
            return tuple(sorted(out))

        in_axes = norm(self.in_axes, "input")
        out_axes = norm(self.out_axes, "output")
        stack_axes = norm(self.stack_axes, "stack")
        if in_axes is not None and out_axes is not None:
            if stack_axes is None:
                stack_axes = tuple(a for a in range(ndim) if a not in in_axes + out_axes)
        else:
            stack_axes = stack_axes or ()
            rest = tuple(
                a for a in range(ndim) if a not in stack_axes + (in_axes or out_axes or ())
            )
            if in_axes is not None:
                out_axes = rest
            elif out_axes is not None:
                in_axes = rest
            elif len(rest) == 2:
                in_axes, out_axes = rest[:1], rest[1:]
            else:
                raise TargetError(
                    f"target {self.pattern!r} matches {path!r} with shape {shape}: which of "
                    "its axes are input, output and stacked layers is ambiguous, and jaxlora "
                    f"does not guess. Say it: jl.Target({re.escape(path)!r}, in_axes=..., "
                    "out_axes=..., stack_axes=...) (a scanned (L, d_in, d_out) stack is "
                    "stack_axes=(0,)), or let the model's use decide: method.init(key, "
                    "params, like=(fn, *args)), or jl.infer_targets(fn, params, *args, "
                    "pattern=...)"
                )
        used = stack_axes + in_axes + out_axes
        if not in_axes or not out_axes or sorted(used) != list(range(ndim)):
            raise TargetError(
                f"target {self.pattern!r} cannot split {path!r} with shape {shape}: "
                f"stack axes {stack_axes}, input axes {in_axes} and output axes {out_axes} "
                "must be non-empty (input/output), disjoint and cover every axis"
            )
        return KernelLayout(
            path=path,
            shape=tuple(shape),
            dtype=jax.numpy.dtype(dtype).name,
            stack_axes=stack_axes,
            in_axes=in_axes,
            out_axes=out_axes,
        )


ALL_LINEAR = Target(
    pattern=r".*kernel",
    exclude=r"(^|/)(lm_head|head|classifier|score)(/|$)",
)
"""Preset: every kernel with two or more dimensions, except output heads.

Like PEFT's ``"all-linear"``, the model's output layer (``lm_head``, ``head``,
``classifier``, ``score``) is left out. It gives no axes: 2-D kernels are ``(d_in, d_out)``,
others need ``like=`` (axes from use) or explicit :class:`Target` s (see :class:`Target`).
"""

TargetsLike = str | Target | Sequence[str | Target]


def as_targets(targets: TargetsLike) -> tuple[Target, ...]:
    """Normalises a targets argument (regex, ``"all-linear"``, Target, or a list) to Targets."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return (ALL_LINEAR,)
        return (Target(targets),)
    if isinstance(targets, Target):
        return (targets,)
    out = tuple(t for x in targets for t in as_targets(x))
    if not out:
        raise TargetError("empty target list: pass at least one pattern or Target")
    return out


def module_targets(target_modules: str | Sequence[str]) -> Target:
    """PEFT's ``target_modules`` as a :class:`Target`: the kernels of modules with those names.

    As in PEFT, a name selects every module whose own name (the last component of its path)
    equals it, wherever it sits: ``["q_proj", "v_proj"]`` selects
    ``layers/3/attn/q_proj/kernel`` (any leaf of two or more axes directly under such a
    module: Flax's ``kernel``, an einsum's ``w``). ``"all-linear"`` is the :data:`ALL_LINEAR`
    preset. Module paths here are ``"/"``-joined key paths; for other patterns pass a regex
    as ``targets``.

    Args:
      target_modules: A list of module names, one name, or ``"all-linear"``.

    Returns:
      The :class:`Target`.

    Raises:
      TargetError: For an empty list or a name that is not a plain module name.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"layers": {"0": {"q_proj": {"kernel": jnp.zeros((4, 4))},
      ...                            "k_proj": {"kernel": jnp.zeros((4, 4))}}}}
      >>> list(select(params, module_targets(["q_proj"])))
      ['layers/0/q_proj/kernel']
    """
    if target_modules == "all-linear":
        return ALL_LINEAR
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"[\w.-]+", n)]
    if not names or bad:
        raise TargetError(
            f"target_modules must be module names such as ['q_proj', 'v_proj'] or "
            f"'all-linear', got {target_modules!r}; pass a regex over key paths as targets="
        )
    alternatives = "|".join(re.escape(n) for n in names)
    return Target(rf"(.*/)?({alternatives})/[^/]+")


def resolve_targets(targets: TargetsLike, target_modules: Any) -> TargetsLike:
    """``targets``, or PEFT's ``target_modules`` alias where given (it then wins)."""
    return targets if target_modules is None else module_targets(target_modules)


def stacked(targets: TargetsLike, axes: tuple[int, ...] = (0,)) -> tuple[Target, ...]:
    """``targets`` for kernels stacked on ``axes``, e.g. a scanned model's ``(L, d_in, d_out)``.

    Every target that gives no axes gets ``stack_axes=axes`` (its two other axes are then
    ``(in, out)``); targets that give axes are kept as they are.

    Args:
      targets: As for :func:`select`.
      axes: The stacked layer axes.

    Returns:
      The targets, as a tuple of :class:`Target`.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"layers": {"q": {"kernel": jnp.zeros((4, 8, 16))}}}
      >>> lay = select(params, stacked("all-linear"))["layers/q/kernel"]
      >>> lay.stack_axes, lay.in_axes, lay.out_axes
      ((0,), (1,), (2,))
    """
    return tuple(
        dataclasses.replace(t, stack_axes=tuple(axes)) if t.infers else t
        for t in as_targets(targets)
    )


def _check_floating(spec: Target, path: str, leaf: Any) -> None:
    # An adapter's update is floating point: merged into an integer kernel it would be cast
    # away, so the trained update would vanish from the merged/exported model. Quantized
    # kernels come as their own node types, never as raw integer leaves.
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise TargetError(
            f"target {spec.pattern!r} matched {path!r} with dtype {jax.numpy.dtype(dtype).name}"
            f" and shape {tuple(leaf.shape)}, which is not floating point; adapters need a "
            "floating-point kernel (exclude this path, or load the kernel as float)"
        )


def match(params: Any, targets: TargetsLike) -> dict[str, tuple[Target, Any]]:
    """Finds the leaves of ``params`` selected by ``targets``, with the target that won.

    Args:
      params: Any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: As for :func:`select`.

    Returns:
      A dict from key path to ``(target, leaf)``, in the order of ``params``' leaves.

    Raises:
      TargetError: If a target matches no leaf (the message lists the paths seen), or a
        matched leaf is not floating point (the message names its path and dtype).
    """
    specs = as_targets(targets)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel_leaf)[0]
    paths = [(path_str(kp), leaf) for kp, leaf in flat]
    hits = [0] * len(specs)
    matched: dict[str, tuple[Target, Any]] = {}
    for path, leaf in paths:
        ndim = len(getattr(leaf, "shape", ()))
        for i, spec in enumerate(specs):
            if spec.matches(path, ndim):
                _check_floating(spec, path, leaf)
                hits[i] += 1
                matched[path] = (spec, leaf)
                break
    missing = [(s.pattern, s.min_ndim) for s, n in zip(specs, hits) if n == 0]
    if missing:
        seen = [f"{p} {tuple(getattr(x, 'shape', ()))}" for p, x in paths]
        shown = ", ".join(seen[:40]) + (f", ... ({len(seen) - 40} more)" if len(seen) > 40 else "")
        raise TargetError(
            f"target pattern(s) {[p for p, _ in missing]} matched no leaf (with at least "
            f"{missing[0][1]} dimensions); paths seen: {shown}"
        )
    return matched


def select(
    params: Any, targets: TargetsLike, like: Sequence[Any] | None = None
) -> dict[str, KernelLayout]:
    """Finds the kernels of ``params`` selected by ``targets`` and how each one splits.

    Args:
      params: Any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: A regex string, the string ``"all-linear"`` (the :data:`ALL_LINEAR` preset),
        a :class:`Target`, or a sequence of those. When several match one leaf, the first
        wins.
      like: Optional ``(fn, *example_args)``: the axes of every selected kernel whose target
        gives none are read off how ``fn(params, *example_args)`` uses it (see
        :func:`jaxlora.infer_targets`); explicit axes are kept as written.

    Returns:
      A dict from key path to :class:`KernelLayout`, in the order of ``params``' leaves.

    Raises:
      TargetError: If a target matches no leaf (the message lists the paths seen), or a
        matched leaf is not floating point or cannot be split as the target says.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"q": {"kernel": jnp.zeros((4, 6))}, "q_bias": jnp.zeros((6,))}
      >>> layout = select(params, r".*/kernel")["q/kernel"]
      >>> layout.in_axes, layout.out_axes, layout.d_in, layout.d_out
      ((0,), (1,), 4, 6)
    """
    matched = match(params, targets)
    inferred = {}
    if like is not None:
        from jaxlora.infer import infer_layouts  # infer builds on this module

        fn, *args = like
        todo = [path for path, (spec, _) in matched.items() if spec.infers]
        inferred = infer_layouts(fn, params, args, todo)
    out = {}
    for path, (spec, leaf) in matched.items():
        if path in inferred:
            stack, inn, o = inferred[path]
            spec = dataclasses.replace(spec, in_axes=inn, out_axes=o, stack_axes=stack)
        out[path] = spec.layout(path, tuple(leaf.shape), leaf.dtype)
    return out
