"""LoRA (and rsLoRA): a trainable low-rank update ``W + s·A@B`` for each targeted kernel.

``A: (stack..., in..., r)`` starts as kaiming-uniform with ``a=√5`` (the reference code's
``nn.init.kaiming_uniform_``, i.e. ``U(-1/√d_in, 1/√d_in)``) and ``B: (stack..., r, out...)``
at zero, so training starts exactly at the base model. The scale is ``alpha/r``
(``alpha/√r`` for rsLoRA, whose updates keep their size as the rank grows).

PiSSA (``init="pissa"``) starts A, B from the top-``r`` singular triplets of W instead, so
the adapter holds W's principal part and training moves it; the base must then hold the
residual ``W - s·A@B``, which is why that init reads W's values and returns a method named
``"pissa"`` whose :meth:`~jaxlora.Method.prepare` returns that residual with the adapters
(the one entry point: ``base, adapters = jl.lora(..., init="pissa").prepare(key, params)``).

References:
  Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models,
  https://arxiv.org/abs/2106.09685. Kalajdzievski, 2023, A Rank Stabilization Scaling
  Factor for Fine-Tuning with LoRA, https://arxiv.org/abs/2312.03732. Meng et al., 2024,
  PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
  Models, https://arxiv.org/abs/2404.02948.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora import recipes
from jaxlora.adapters import Adapter, Factors, Method, register_adapter
from jaxlora.interop import peft
from jaxlora.keypaths import flatten, nest
from jaxlora.targets import KernelLayout, TargetError, TargetsLike, select

__all__ = [
    "PEFT_FORMAT",
    "LoraAdapter",
    "LoraPeftFormat",
    "canonical_kernel",
    "check_rank",
    "init_lora",
    "kaiming_a",
    "lora",
    "lora_scale",
]


@register_adapter
class LoraAdapter(Adapter):
    """LoRA factors of one kernel (stacked along the kernel's stack axes)."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b")
    LABELS: ClassVar[dict[str, str]] = {"a": "lora_a", "b": "lora_b"}
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "a": ("stack", "in", "rank"),
        "b": ("stack", "rank", "out"),
    }

    layout: KernelLayout
    rank: int
    scale: float
    a: Any
    b: Any

    def factors(self, w: jax.Array, shared: dict[str, Any]) -> Factors:
        del w, shared
        return Factors(self.a, self.b, self.scale)


def lora_scale(*, rank: int, alpha: float, rslora: bool) -> float:
    """The prelude of every LoRA-family factory: checks ``rank``, returns the scale
    ``alpha/r`` (``alpha/√r`` for rsLoRA)."""
    if not isinstance(rank, int) or rank < 1:
        raise TargetError(f"rank must be a positive integer, got {rank!r}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(layout: KernelLayout, rank: int) -> None:
    """Raises a :class:`TargetError` if ``rank`` does not fit the kernel."""
    if not isinstance(rank, int) or rank < 1:
        raise TargetError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(layout.d_in, layout.d_out):
        raise TargetError(
            f"rank {rank} is larger than min(d_in, d_out) = min({layout.d_in}, "
            f"{layout.d_out}) of {layout.path!r} (shape {layout.shape})"
        )


def kaiming_a(key: jax.Array, layout: KernelLayout, rank: int, dtype: Any) -> jax.Array:
    """The reference LoRA init of A: kaiming-uniform with ``a=√5`` over fan-in ``d_in``."""
    bound = 1.0 / math.sqrt(layout.d_in)
    shape = (*layout.stack_shape, *layout.in_shape, rank)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def canonical_kernel(w: jax.Array, layout: KernelLayout) -> jax.Array:
    """``w`` as ``(stack..., d_in, d_out)``: axes in (stack, in, out) order, in/out flattened."""
    w = jnp.transpose(w, layout.canonical_order)
    return w.reshape(*layout.stack_shape, layout.d_in, layout.d_out)


def _pissa_factors(
    w: jax.Array, layout: KernelLayout, rank: int, scale: float, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    # W = U S Vh; s·A@B must equal the top-r part U_r S_r Vh_r, so the singular values are
    # divided by s before being split evenly (√) between A and B, as PEFT's pissa init does.
    u, sv, vh = jnp.linalg.svd(canonical_kernel(w, layout).astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(sv[..., :rank] / scale)
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
    a = a.reshape(*layout.stack_shape, *layout.in_shape, rank)
    b = b.reshape(*layout.stack_shape, rank, *layout.out_shape)
    return a.astype(dtype), b.astype(dtype)


def lora(
    *,
    rank: int = 8,
    alpha: float = 8.0,
    targets: TargetsLike = "all-linear",
    rslora: bool = False,
    init: str = "kaiming",
    dtype: Any = jnp.float32,
) -> Method:
    """LoRA: ``W + (alpha/r)·A@B`` with trainable ``A``, ``B`` and a frozen ``W``.

    Args:
      rank: The rank ``r`` of the update.
      alpha: The scale numerator; the update is multiplied by ``alpha/r``.
      targets: Which kernels to adapt: a regex over ``"/"``-joined key paths, a
        :class:`jaxlora.Target`, a list of them, or ``"all-linear"``.
      rslora: Scale by ``alpha/√r`` instead (rank-stabilised LoRA).
      init: ``"kaiming"`` (the reference init: A kaiming-uniform, B = 0; ``init`` reads only
        shapes) or ``"pissa"`` (A, B from the top-``rank`` SVD of each kernel; ``init`` reads
        the kernels' values, and the base must be replaced by the residual: use
        ``method.prepare(key, params)``, which returns it). The PiSSA method is named
        ``"pissa"``.
      dtype: dtype of the adapter arrays (float32 by default, whatever the base dtype: the
        adapted product casts them to the compute dtype where they are used).

    Returns:
      A :class:`jaxlora.Method` whose ``init(key, params)`` returns the adapters tree.

    Raises:
      TargetError: From ``init``, if a target matches nothing or ``rank`` exceeds a kernel's
        ``min(d_in, d_out)``.
      ValueError: If ``init`` is unknown, or ``init="pissa"`` with ``alpha <= 0`` (the
        singular values are divided by the scale).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}
      >>> adapters = jl.lora(rank=4, alpha=8, targets=r".*q_proj/kernel").init(
      ...     jax.random.key(0), params)
      >>> node = adapters["attn"]["q_proj"]["kernel"]
      >>> node.a.shape, node.b.shape, node.scale
      ((16, 4), (4, 32), 2.0)

    References:
      Hu et al., 2021, https://arxiv.org/abs/2106.09685 (LoRA);
      Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732 (rsLoRA);
      Meng et al., 2024, https://arxiv.org/abs/2404.02948 (PiSSA).
    """
    scale = lora_scale(rank=rank, alpha=alpha, rslora=rslora)
    if init not in ("kaiming", "pissa"):
        raise ValueError(f"lora: init must be 'kaiming' or 'pissa', got {init!r}")
    if init == "pissa" and not alpha > 0:
        raise ValueError(f"lora(init='pissa') needs alpha > 0, got alpha={alpha!r}")

    if init == "kaiming":
        return Method(
            "lora",
            functools.partial(init_lora, targets=targets, rank=rank, scale=scale, dtype=dtype),
        )

    def init_pissa(key: jax.Array, params: Any) -> dict[str, Any]:
        del key  # the SVD is exact and deterministic
        layouts = select(params, targets)
        kernels = flatten(params)
        nodes = {}
        for path, layout in layouts.items():
            check_rank(layout, rank)
            a, b = _pissa_factors(kernels[path], layout, rank, scale, dtype)
            nodes[path] = LoraAdapter(layout=layout, rank=rank, scale=float(scale), a=a, b=b)
        return nest(nodes)

    return Method("pissa", init_pissa, replaces_base=True)


def init_lora(
    key: jax.Array,
    params: Any,
    *,
    targets: TargetsLike,
    rank: int,
    scale: float,
    dtype: Any,
    cls: type = LoraAdapter,
    **extra: Callable[[KernelLayout, Any], Any],
) -> dict[str, Any]:
    """The reference LoRA init (A kaiming-uniform, B = 0) as ``cls`` nodes.

    Methods built on LoRA's factors (LoRA-FA, DoRA) reuse it; ``extra`` maps further
    array fields of ``cls`` to ``fn(layout, kernel) -> array``. Without ``extra`` only the
    shapes of ``params`` are read.
    """
    layouts = select(params, targets)
    for layout in layouts.values():
        check_rank(layout, rank)
    keys = jax.random.split(key, len(layouts))
    kernels = flatten(params) if extra else {}
    nodes = {}
    for k, (path, layout) in zip(keys, layouts.items()):
        nodes[path] = cls(
            layout=layout,
            rank=rank,
            scale=float(scale),
            a=kaiming_a(k, layout, rank, dtype),
            b=jnp.zeros((*layout.stack_shape, rank, *layout.out_shape), dtype),
            **{name: fn(layout, kernels[path]) for name, fn in extra.items()},
        )
    return nest(nodes)


# ----------------------------------------------------------------------------- PEFT format


class LoraPeftFormat:
    """PEFT's ``LORA`` type for the LoRA family: LoRA, rsLoRA, LoRA-FA and (``use_dora``) DoRA.

    ``A`` is written as ``lora_A.weight`` ``(r, in)`` = ``Aᵀ``, ``B`` as ``lora_B.weight``
    ``(out, r)`` = ``Bᵀ``, a DoRA magnitude ``m`` as ``lora_magnitude_vector`` ``(out,)``.
    PEFT's scaling is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``); nodes store the
    scale itself, so export writes ``lora_alpha = scale·r`` (or ``scale·√r``), with
    ``rank_pattern``/``alpha_pattern`` entries for kernels whose rank or scale differs from
    the most common one. DoRA registers its node class as the ``use_dora`` variant
    (:meth:`add_variant`).
    """

    peft_type = "LORA"
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    global_keys = ()

    def __init__(self):
        self.classes: dict[bool, type] = {False: LoraAdapter}
        """``use_dora`` -> the node class imported for it."""

    def add_variant(self, cls: type, *, use_dora: bool) -> type:
        """Registers ``cls`` (with LoRA's fields, plus ``m`` for DoRA) for ``use_dora``."""
        self.classes[use_dora] = cls
        return cls

    def _dora(self, node: Adapter) -> bool:
        return True in self.classes and isinstance(node, self.classes[True])

    def claims(self, node: Adapter) -> bool:
        return isinstance(node, tuple(self.classes.values()))

    def export(self, adapters, nodes, module_names, *, use_rslora: bool = False, **_):
        dora = {self._dora(n) for n in nodes.values()}
        if len(dora) != 1:
            raise ValueError("export_peft: PEFT cannot mix DoRA and plain LoRA in one adapter")
        dora = dora.pop()
        tensors: dict[str, Any] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for path, node in sorted(nodes.items()):
            lay = node.layout
            ns = len(lay.stack_axes)
            names = peft.module_names_of(module_names, path, lay.num_stacked)
            a = peft.per_layer(node.a, ns, (lay.d_in, node.rank))
            b = peft.per_layer(node.b, ns, (node.rank, lay.d_out))
            m = peft.per_layer(node.m, ns, (lay.d_out,)) if dora else [None] * len(names)
            alpha = float(node.scale) * (math.sqrt(node.rank) if use_rslora else node.rank)
            for name, ai, bi, mi in zip(names, a, b, m, strict=True):
                tensors[f"{peft.PREFIX}{name}.lora_A.weight"] = ai.T
                tensors[f"{peft.PREFIX}{name}.lora_B.weight"] = bi.T
                if mi is not None:
                    tensors[f"{peft.PREFIX}{name}.lora_magnitude_vector"] = mi
                ranks[name], alphas[name] = node.rank, alpha
        r, alpha = peft.majority(list(ranks.values())), peft.majority(list(alphas.values()))
        config = {
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": use_rslora,
            "use_dora": dora,
            "target_modules": sorted(ranks),
            # exact module names, escaped: PEFT matches these keys as regexes on name suffixes
            "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha},
            "lora_dropout": 0.0,
            "lora_bias": False,
            "init_lora_weights": True,
        }
        return tensors, config

    def build(self, config, kernels, dtype):
        dora = bool(config.get("use_dora", False))
        if dora not in self.classes:
            raise ValueError("import_peft: use_dora needs jaxlora's DoRA (jaxlora.dora)")
        cls = self.classes[dora]
        rslora = bool(config.get("use_rslora", False))
        nodes = {}
        for path in kernels.paths:
            lay = kernels.layouts[path]
            module = kernels.first_module(path)
            r = int(peft.pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
            alpha = float(
                peft.pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            )
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            a = kernels.stacked(path, "lora_A.weight", (lay.d_in, r), True, dtype)
            b = kernels.stacked(path, "lora_B.weight", (r, lay.d_out), True, dtype)
            extra = {}
            if dora:
                m = kernels.stacked(path, "lora_magnitude_vector", (lay.d_out,), False, dtype)
                extra["m"] = m.reshape(*lay.stack_shape, *lay.out_shape)
            nodes[path] = cls(
                layout=lay,
                rank=r,
                scale=scale,
                a=a.reshape(*lay.stack_shape, *lay.in_shape, r),
                b=b.reshape(*lay.stack_shape, r, *lay.out_shape),
                **extra,
            )
        return nest(nodes)


PEFT_FORMAT = peft.register_format(LoraPeftFormat())
"""The registered ``LORA`` format (DoRA adds its variant to it)."""


# ----------------------------------------------------------------------------- recipes


@recipes.register("lora")
def _lora_recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("lora", lora(**kw))


@recipes.register("rslora")
def _rslora_recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("rslora", lora(rslora=True, **kw))


@recipes.register("pissa")
def _pissa_recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("pissa", lora(init="pissa", **kw))
