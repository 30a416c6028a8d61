"""Target specs: which leaves of a parameter pytree get an adapter, and how they split.

A target is selected by a regular expression over the leaf's key path joined with
``"/"`` (``"layers/0/attn/q_proj/kernel"``), so it works for any pytree: a Flax linen
``variables["params"]`` dict, an NNX ``State``, an equinox module, a plain dict. For each
selected leaf the spec also says which axes are contracted with the input (``in_axes``),
which are produced (``out_axes``) and which are stacked layer axes (everything else, e.g.
the leading ``L`` of a scanned ``(L, d_in, d_out)`` kernel). The defaults fit Flax
``Dense`` kernels and their stacked form: the last axis is the output, the one before it the
input, leading axes are stacked layers. A ``DenseGeneral`` kernel such as an output
projection ``(heads, head_dim, d)`` needs ``in_axes=(0, 1), out_axes=(2,)``.

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

__all__ = ["ALL_LINEAR", "KernelLayout", "Target", "TargetError", "path_str", "select"]


class TargetError(ValueError):
    """A target spec that matches nothing or a leaf it cannot split."""


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

    Attributes:
      pattern: A regular expression matched with ``re.fullmatch`` against the leaf's
        ``"/"``-joined key path.
      in_axes: Input (contracted) axes of the kernel; negative values count from the end.
      out_axes: Output axes of the kernel.
      stack_axes: Stacked layer axes. ``None`` means every axis that is neither input nor
        output.
      min_ndim: Leaves with fewer dimensions are skipped rather than matched (so a pattern
        such as ``".*"`` does not catch biases).
    """

    pattern: str
    in_axes: tuple[int, ...] = (-2,)
    out_axes: tuple[int, ...] = (-1,)
    stack_axes: tuple[int, ...] | None = None
    min_ndim: int = 2
    exclude: str | None = None
    """Optional regex; matching paths are skipped even if ``pattern`` matches."""

    def matches(self, path: str, ndim: int) -> bool:
        if ndim < self.min_ndim or re.fullmatch(self.pattern, path) is None:
            return False
        return self.exclude is None or re.search(self.exclude, path) is None

    def layout(self, path: str, shape: tuple[int, ...], dtype: Any) -> KernelLayout:
        ndim = len(shape)

        def norm(axes: Sequence[int], what: str) -> tuple[int, ...]:
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
        if self.stack_axes is None:
            stack_axes = tuple(a for a in range(ndim) if a not in in_axes + out_axes)
        else:
            stack_axes = norm(self.stack_axes, "stack")
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
``classifier``, ``score``) is left out. Leading axes beyond the last two are stacked layers.
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
    paths = [(path_str(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
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


def select(params: Any, targets: TargetsLike) -> dict[str, KernelLayout]:
    """Finds the kernels of ``params`` selected by ``targets`` and how each one splits.

    Args:
      params: Any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: A regex string, the string ``"all-linear"`` (the :data:`ALL_LINEAR` preset),
        a :class:`Target`, or a sequence of those. When several match one leaf, the first
        wins.

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
    return {
        path: spec.layout(path, tuple(leaf.shape), leaf.dtype)
        for path, (spec, leaf) in match(params, targets).items()
    }
