"""VeRA: one pair of frozen random matrices shared by every layer, scaled by trained vectors.

``ΔW = A_s[:d_in] · diag(d) · B_s[:, :d_out] · diag(b)`` for each targeted kernel, where
``A_s: (max_in, r)`` and ``B_s: (r, max_out)`` are kaiming-uniform, frozen, and stored once
for the whole model under ``adapters["__shared__"]["vera"]`` (a :class:`VeraShared`);
each layer trains only ``d: (r,)`` and ``b: (d_out,)`` (stacked for scanned kernels). In
canonical form that is ``A = A_s[:d_in]``, ``B = diag(d)·B_s[:, :d_out]·diag(b)``, so
:func:`jaxlora.adapt`, ``merge`` and ``unmerge`` need nothing VeRA-specific, and, A being
frozen, the train step never computes the ``d_in``-wide gradient LoRA's A needs.

The shared matrices are a pure function of the PRNG key stored beside them, so a
checkpoint may keep only the key: :func:`strip_shared` drops the matrices and
:func:`restore_shared` regenerates them bit-identically. The key is stored as raw
``uint32`` key data (an array leaf, labelled ``"frozen"``: it must stay an array for
``init`` to be jittable and for checkpoints to store it), so ``jax.grad`` over a whole VeRA
adapters tree fails; differentiate :func:`jaxlora.trainable`'s view instead (or pass
``allow_int=True``). :func:`jaxlora.train_step` differentiates the trainable arrays only
and is unaffected.

References:
  Kopiczko et al., 2024, VeRA: Vector-based Random Matrix Adaptation,
  https://arxiv.org/abs/2310.11454.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import recipes
from jaxlora.adapters import (
    SHARED_KEY,
    Adapter,
    Factors,
    Method,
    SharedState,
    register_adapter,
    register_shared,
    replace_shared,
    shared_state,
)
from jaxlora.interop import peft
from jaxlora.keypaths import nest
from jaxlora.targets import KernelLayout, TargetError, TargetsLike, resolve_targets, select

__all__ = ["NAME", "VeraAdapter", "VeraShared", "restore_shared", "strip_shared", "vera"]

NAME = "vera"
"""Key of VeRA's entry under ``adapters["__shared__"]``."""


@register_shared
class VeraShared(SharedState):
    """VeRA's cross-layer state: the shared matrices and the key that regenerates them.

    A checkpoint stores it :meth:`compact` (the key only) whenever the key regenerates the
    matrices bit for bit (:meth:`reproducible`).
    """

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b", "key")

    a: Any
    """``A_s: (max_in, rank)``, or ``None`` once stripped."""
    b: Any
    """``B_s: (rank, max_out)``, or ``None`` once stripped."""
    key: Any
    """Raw ``uint32`` data of the PRNG key the matrices are drawn from."""
    impl: str
    """Name of the PRNG implementation of ``key`` (e.g. ``"threefry2x32"``)."""
    rank: int
    """Columns of ``A_s`` (rows of ``B_s``)."""
    max_in: int
    """Rows of ``A_s``: the largest ``d_in`` among the targeted kernels."""
    max_out: int
    """Columns of ``B_s``: the largest ``d_out`` among the targeted kernels."""
    dtype: str
    """dtype name of the matrices."""

    @property
    def stripped(self) -> bool:
        return self.a is None

    def compact(self) -> VeraShared:
        return dataclasses.replace(self, a=None, b=None)

    def expand(self) -> VeraShared:
        if not self.stripped:
            return self
        a, b = _matrices(self)
        return dataclasses.replace(self, a=a, b=b)

    def reproducible(self) -> bool:
        if self.stripped:
            return True
        again = self.compact().expand()
        return bool(jnp.array_equal(again.a, self.a)) and bool(jnp.array_equal(again.b, self.b))


def _kaiming_uniform(key: jax.Array, shape: tuple[int, int], fan_in: int, dtype: Any):
    # PEFT's VeRA init: kaiming-uniform with gain √2, i.e. U(-√(6/fan_in), √(6/fan_in)).
    # Drawn as bound·U(-1, 1): inside uniform(), 2u - 1 is exact for u on the mantissa
    # grid, so the only rounding is the final multiply and the values are the same bits
    # whether XLA fuses the expression or not (eager init vs. jitted regeneration).
    bound = math.sqrt(6.0 / fan_in)
    return bound * jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def _matrices(shared: VeraShared) -> tuple[jax.Array, jax.Array]:
    key = jax.random.wrap_key_data(shared.key, impl=shared.impl)
    ka, kb = jax.random.split(key)
    a = _kaiming_uniform(ka, (shared.max_in, shared.rank), shared.max_in, shared.dtype)
    b = _kaiming_uniform(kb, (shared.rank, shared.max_out), shared.rank, shared.dtype)
    return a, b


@register_adapter
class VeraAdapter(Adapter):
    """VeRA's trainable vectors of one kernel (stacked along the kernel's stack axes)."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("d", "b")
    LABELS: ClassVar[dict[str, str]] = {"d": "vera_vector", "b": "vera_vector"}
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {"d": ("stack", "rank"), "b": ("stack", "out")}
    # jaxlora.adapt forms a scanned layer's factors from its slice of d and b inside the
    # loop body: the stacked d*B_s*b and A_s broadcast over the layers are never formed
    PER_LAYER_FACTORS: ClassVar[bool] = True

    layout: KernelLayout
    rank: int
    d: Any
    """``(stack..., rank)``: scales the rank dimension (``diag(d)``)."""
    b: Any
    """``(stack..., out...)``: scales the output columns (``diag(b)``)."""

    def factors(self, w: jax.Array, shared: dict[str, Any]) -> Factors:
        del w  # VeRA's update does not depend on the base kernel's values
        lay = self.layout
        sh = shared.get(NAME)
        if sh is None:
            raise ValueError(
                f"VeRA adapter at {lay.path!r} needs the shared matrices under "
                f"adapters[{SHARED_KEY!r}][{NAME!r}]; pass the whole tree from vera().init"
            )
        if sh.stripped:
            raise ValueError(
                "VeRA's shared matrices were stripped (strip_shared); regenerate them with "
                "jaxlora.methods.vera.restore_shared(adapters) first"
            )
        if self.rank > sh.rank:
            raise ValueError(
                f"VeRA adapter at {lay.path!r} has rank {self.rank}, but the shared matrices "
                f"have rank {sh.rank}"
            )
        if lay.d_in > sh.max_in or lay.d_out > sh.max_out:
            raise ValueError(
                f"VeRA adapter at {lay.path!r} needs d_in={lay.d_in}, d_out={lay.d_out}, but "
                f"the shared matrices only cover max_in={sh.max_in}, max_out={sh.max_out}"
            )
        ns, no = len(lay.stack_shape), len(lay.out_shape)
        a_s = sh.a[: lay.d_in, : self.rank].reshape(*lay.in_shape, self.rank)
        b_s = sh.b[: self.rank, : lay.d_out].reshape(self.rank, *lay.out_shape)
        # Both vectors go into B and A stays the frozen A_s: then no gradient ever flows to
        # A, and the backward costs LoRA-FA's (dB = hᵀ·dy with h = x@A_s r-wide) instead of
        # LoRA's (dA = xᵀ·dh over the d_in-wide input), whatever the rank.
        d = self.d.reshape(*self.d.shape[:ns], self.rank, *(1,) * no)
        b = self.b.reshape(*self.b.shape[:ns], 1, *self.b.shape[ns : ns + no])
        a = jnp.broadcast_to(a_s, (*lay.stack_shape, *a_s.shape))
        return Factors(a, d * b_s * b, 1.0)


def _key_data(key: jax.Array) -> tuple[jax.Array, str]:
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy raw key uses the default impl
    # a copy: key_data aliases the caller's buffer, and a train step that donates the
    # adapters would otherwise delete the user's key
    return jnp.array(jax.random.key_data(key), copy=True), str(jax.random.key_impl(key))


def vera(
    *,
    rank: int = 256,
    targets: TargetsLike = "all-linear",
    d_init: float | None = None,
    dtype: Any = jnp.float32,
    d_initial: float | None = None,
    target_modules: Any = None,
) -> Method:
    """VeRA: ``W + A_s·diag(d)·B_s·diag(b)`` with shared frozen ``A_s``, ``B_s``.

    Args:
      rank: Rank ``r`` of the shared matrices. Unlike LoRA it may exceed a kernel's
        ``min(d_in, d_out)`` (the paper uses 256 and more), since only ``r + d_out``
        numbers per layer train.
      targets: Which kernels to adapt (as in :func:`jaxlora.lora`).
      d_init: Initial value of every ``d``, 0.1 by default (``b`` starts at 0, so training
        starts exactly at the base model).
      dtype: dtype of the shared matrices and the vectors.
      d_initial: PEFT's name for ``d_init`` (an alias; give one of them).
      target_modules: PEFT's module names, replacing ``targets`` (as in :func:`jaxlora.lora`).

    Returns:
      A :class:`jaxlora.Method` named ``"vera"``. Its ``init(key, params)`` reads only
      shapes; ``A_s`` is ``(max_in, rank)`` and ``B_s`` ``(rank, max_out)`` over the
      targeted kernels' ``d_in``/``d_out``, drawn from ``key`` (which is stored with them).

    Raises:
      TargetError: If ``rank`` is not a positive integer, or (from ``init``) a target
        matches nothing.
      ValueError: From ``adapt``/``merge``, if a layer's rank or size exceeds the shared
        matrices (e.g. adapters combined with another init's shared state).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"q": {"kernel": jnp.ones((8, 16))}, "o": {"kernel": jnp.ones((16, 8))}}
      >>> adapters = jl.vera(rank=4, targets=".*kernel").init(jax.random.key(0), params)
      >>> shared = adapters["__shared__"]["vera"]
      >>> shared.a.shape, shared.b.shape, adapters["q"]["kernel"].d
      ((16, 4), (4, 16), Array([0.1, 0.1, 0.1, 0.1], dtype=float32))
      >>> jl.num_trainable(adapters)  # r + d_out per layer: (4 + 16) + (4 + 8)
      32

    References:
      Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454.
    """
    if not isinstance(rank, int) or rank < 1:
        raise TargetError(f"vera: rank must be a positive integer, got {rank!r}")
    if d_initial is not None and d_init is not None:
        raise ValueError("vera: give d_init or its PEFT alias d_initial, not both")
    d_init = next((v for v in (d_init, d_initial) if v is not None), 0.1)
    targets = resolve_targets(targets, target_modules)
    dtype_name = jnp.dtype(dtype).name

    def init(key: jax.Array, params: Any, like: Any = None) -> dict[str, Any]:
        layouts = select(params, targets, like)
        data, impl = _key_data(key)
        shared = VeraShared(
            a=None,
            b=None,
            key=data,
            impl=impl,
            rank=rank,
            max_in=max(lay.d_in for lay in layouts.values()),
            max_out=max(lay.d_out for lay in layouts.values()),
            dtype=dtype_name,
        )
        a, b = _matrices(shared)
        nodes = {
            path: VeraAdapter(
                layout=lay,
                rank=rank,
                d=jnp.full((*lay.stack_shape, rank), d_init, dtype),
                b=jnp.zeros((*lay.stack_shape, *lay.out_shape), dtype),
            )
            for path, lay in layouts.items()
        }
        return replace_shared(nest(nodes), {NAME: dataclasses.replace(shared, a=a, b=b)})

    return Method(NAME, init)


def _replace_shared(adapters: dict[str, Any], fn) -> dict[str, Any]:
    shared = shared_state(adapters)
    if NAME not in shared:
        raise ValueError(
            f"adapters have no VeRA shared state under [{SHARED_KEY!r}][{NAME!r}]; "
            f"found {sorted(shared)}"
        )
    return replace_shared(adapters, {NAME: fn(shared[NAME])})


def strip_shared(adapters: dict[str, Any]) -> dict[str, Any]:
    """Drops VeRA's shared matrices, keeping the key that regenerates them.

    For checkpoints: the stripped tree holds only the per-layer vectors and the key.

    Args:
      adapters: A VeRA adapters tree.

    Returns:
      The same tree with ``A_s``, ``B_s`` set to ``None``.

    Raises:
      ValueError: If ``adapters`` has no VeRA shared state.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> from jaxlora.methods.vera import restore_shared, strip_shared
      >>> params = {"q": {"kernel": jnp.ones((8, 16))}}
      >>> adapters = jl.vera(rank=4, targets=".*kernel").init(jax.random.key(0), params)
      >>> small = strip_shared(adapters)
      >>> [x.shape for x in jax.tree_util.tree_leaves(small["__shared__"])]  # the key only
      [(2,)]
      >>> back = restore_shared(small)["__shared__"]["vera"]
      >>> bool((back.a == adapters["__shared__"]["vera"].a).all())
      True
    """
    return _replace_shared(adapters, VeraShared.compact)


def restore_shared(adapters: dict[str, Any]) -> dict[str, Any]:
    """Regenerates VeRA's shared matrices from their stored key (bit-identical).

    Args:
      adapters: A VeRA adapters tree, stripped or not.

    Returns:
      The tree with ``A_s``, ``B_s`` present (an unstripped tree is returned unchanged).

    Raises:
      ValueError: If ``adapters`` has no VeRA shared state.
    """

    return _replace_shared(adapters, VeraShared.expand)


# ----------------------------------------------------------------------------- PEFT format


class VeraPeftFormat:
    """PEFT's ``VERA`` type: ``vera_lambda_d`` ``(r,)`` and ``vera_lambda_b`` ``(out,)`` per
    module, the shared ``A_s``/``B_s`` as ``base_model.vera_A``/``_B`` ``(r, max_in)``,
    ``(max_out, r)``, written with ``save_projection`` so PEFT need not regenerate them from a
    torch seed (which JAX cannot reproduce)."""

    peft_type = "VERA"
    suffixes = ("vera_lambda_d", "vera_lambda_b")
    global_keys = ("base_model.vera_A", "base_model.vera_B")

    def claims(self, node: Adapter) -> bool:
        return isinstance(node, VeraAdapter)

    def export(self, adapters, nodes, module_names, **_):
        shared = shared_state(adapters).get(NAME)
        if shared is None or shared.stripped:
            raise ValueError(
                "export_peft: VeRA needs its shared matrices; pass the full tree (or "
                "jaxlora.methods.vera.restore_shared(adapters))"
            )
        tensors: dict[str, Any] = {
            "base_model.vera_A": np.asarray(shared.a).T,
            "base_model.vera_B": np.asarray(shared.b).T,
        }
        targets = []
        for path, node in sorted(nodes.items()):
            lay = node.layout
            if node.rank != shared.rank:
                raise ValueError(
                    f"export_peft: VeRA adapter at {path!r} has rank {node.rank} but the shared "
                    f"matrices {shared.rank}; PEFT has one rank for all layers"
                )
            ns = len(lay.stack_axes)
            names = peft.module_names_of(module_names, path, lay.num_stacked)
            d = peft.per_layer(node.d, ns, (node.rank,))
            b = peft.per_layer(node.b, ns, (lay.d_out,))
            for name, di, bi in zip(names, d, b, strict=True):
                tensors[f"{peft.PREFIX}{name}.vera_lambda_d"] = di
                tensors[f"{peft.PREFIX}{name}.vera_lambda_b"] = bi
                targets.append(name)
        config = {
            "r": shared.rank,
            "target_modules": sorted(targets),
            "projection_prng_key": 0,
            "save_projection": True,
            "vera_dropout": 0.0,
            "d_initial": 0.1,
            "init_weights": True,
        }
        return tensors, config

    def build(self, config, kernels, dtype):
        r = int(config["r"])
        if any(k not in kernels.tensors for k in self.global_keys):
            raise ValueError(
                "import_peft: the VeRA adapter was saved without its projections "
                "(save_projection=False); PEFT regenerates them with torch's generator, which "
                "JAX cannot reproduce"
            )
        a_s = jnp.asarray(kernels.tensors["base_model.vera_A"].T, dtype)
        b_s = jnp.asarray(kernels.tensors["base_model.vera_B"].T, dtype)
        nodes = {}
        for path in kernels.paths:
            lay = kernels.layouts[path]
            if lay.d_in > a_s.shape[0] or lay.d_out > b_s.shape[1]:
                raise ValueError(
                    f"import_peft: kernel {path!r} ({lay.d_in}->{lay.d_out}) is larger than the "
                    f"shared VeRA projections ({a_s.shape[0]}->{b_s.shape[1]})"
                )
            d = kernels.stacked(path, "vera_lambda_d", (r,), False, dtype)
            b = kernels.stacked(path, "vera_lambda_b", (lay.d_out,), False, dtype)
            nodes[path] = VeraAdapter(
                layout=lay, rank=r, d=d, b=b.reshape(*lay.stack_shape, *lay.out_shape)
            )
        # the key beside imported matrices does not regenerate them: checkpoints store them
        key = jax.random.key(int(config.get("projection_prng_key", 0)))
        shared = {
            NAME: VeraShared(
                a=a_s,
                b=b_s,
                key=jax.random.key_data(key),
                impl=str(jax.random.key_impl(key)),
                rank=r,
                max_in=int(a_s.shape[0]),
                max_out=int(b_s.shape[1]),
                dtype=jnp.dtype(dtype).name,
            )
        }
        return replace_shared(nest(nodes), shared)


PEFT_FORMAT = peft.register_format(VeraPeftFormat())


@recipes.register("vera")
def _recipe(**kw: Any) -> recipes.Recipe:
    return recipes.Recipe("vera", vera(**kw))
