"""The sharded train step: :func:`jaxlora.train_step` jitted with explicit shardings.

Under FSDP the step all-gathers each frozen kernel where it is used, never differentiates
it, and keeps adapters and optimizer state split. An unscanned kernel is gathered once at
the top of the loss (the gathered copy serves forward and backward). A stacked kernel that
the model slices in a ``scan`` over layers is gathered *per layer*, inside the loop body
(:func:`jaxlora.adapt.layer_shardings`): gathering it at the top would hold every layer's
weights on every device at once, which at billions of parameters is the whole model and
defeats FSDP. Which leaves are scanned is read off the traced loss
(:func:`scanned_paths`), so it works for any model, not only ``jaxlora.models``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.extend as jex
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.adapt import layer_shardings
from jaxlora.keypaths import path_str
from jaxlora.sharding.rules import entry_axes
from jaxlora.targets import is_kernel_leaf
from jaxlora.train import train_step

__all__ = ["gathered", "scanned_paths", "sharded_train_step"]


def _drop_axes(spec: P, axes: Sequence[str]) -> P:
    def keep(entry):
        kept = tuple(a for a in entry_axes(entry) if a not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(e) for e in spec))


def gathered(
    loss_fn: Callable[..., Any],
    param_shardings: Any,
    axes: Sequence[str],
    *,
    skip: Collection[str] = (),
):
    """Wraps ``loss_fn`` so its params are first resharded without the mesh ``axes``.

    ``jaxlora.adapt`` carries the constraint into the adapter factors, so under FSDP each
    frozen kernel is all-gathered once per step, used by the forward and the backward
    pass alike, and never differentiated.

    Args:
      loss_fn: ``loss_fn(params, *args)``.
      param_shardings: The params' shardings at rest.
      axes: The mesh axes to gather over (``("fsdp",)``).
      skip: Key paths left as they are (stacked leaves gathered per layer instead).

    Examples:
      >>> from jaxlora.sharding import make_mesh, param_shardings, gathered
      >>> import jax.numpy as jnp
      >>> psh = param_shardings({"w": jnp.zeros(4)}, [(".*", P("fsdp"))], make_mesh())
      >>> float(gathered(lambda p, b: p["w"].sum() + b, psh, ("fsdp",))({"w": jnp.ones(4)}, 1.0))
      5.0
    """
    axes = tuple(axes)
    if not axes:
        return loss_fn
    skip = frozenset(skip)

    # loss_fn sees a quantized kernel as one kernel: constrain it as its codes are sharded
    # (jaxlora.adapt then gathers the codes and scales, not a float copy)
    def drop(s):
        s = s.data if is_kernel_leaf(s) else s
        return NamedSharding(s.mesh, _drop_axes(s.spec, axes))

    whole = jax.tree_util.tree_map(drop, param_shardings, is_leaf=is_kernel_leaf)

    def constrain(kp, x, s):
        # a skipped leaf is passed on untouched: jaxlora.adapt recognises it where a scan
        # slices it, which a constraint (even a no-op one) would hide
        return x if path_str(kp) in skip else jax.lax.with_sharding_constraint(x, s)

    def fn(params, *args, **kwargs):
        return loss_fn(jax.tree_util.tree_map_with_path(constrain, params, whole), *args, **kwargs)

    return fn


# Calls that jaxlora.adapt inlines, so that a leaf passed through them is still the same
# value where a scan slices it (a remat is rebuilt with new values inside: not followed).
_INLINED = ("jit", "pjit", "closed_call")


def _sub_jaxpr(eqn) -> Any:
    if eqn.primitive.name not in _INLINED:
        return None
    for name in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(name)
        if sub is not None:
            return getattr(sub, "jaxpr", sub)
    return None


def _scanned_inputs(jaxpr, live: dict[Any, int]) -> set[int]:
    # positions of `live` inputs that reach a scan's xs unchanged, through nested calls
    found: set[int] = set()
    for eqn in jaxpr.eqns:
        ins = [live.get(v) if not isinstance(v, jex.core.Literal) else None for v in eqn.invars]
        if eqn.primitive.name == "scan":
            first = eqn.params["num_consts"] + eqn.params["num_carry"]
            found |= {i for i in ins[first:] if i is not None}
            continue
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub.invars) == len(ins):
            inner = {v: i for v, i in zip(sub.invars, ins) if i is not None}
            if inner:
                found |= _scanned_inputs(sub, inner)
    return found


def scanned_paths(fn: Callable[..., Any], params: Any, *args: Any) -> set[str]:
    """Key paths of the ``params`` leaves that ``fn(params, *args)`` slices in a ``scan``.

    The stacked layers of a scanned model: ``fn`` is traced abstractly (nothing runs) and
    a leaf counts when it reaches a scan's ``xs`` unchanged (through nested ``jit``), which
    is where :func:`jaxlora.adapt.layer_shardings` can gather it per layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def fn(p, x):
      ...     y, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, p["stack"])
      ...     return (y @ p["head"]).sum()
      >>> p = {"stack": jnp.ones((3, 4, 4)), "head": jnp.ones((4, 2))}
      >>> sorted(scanned_paths(fn, p, jnp.ones((1, 4))))
      ['stack']
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, args)
    )
    closed = jax.make_jaxpr(fn)(shapes[0], *shapes[1])
    invars = closed.jaxpr.invars[: len(flat)]
    found = _scanned_inputs(closed.jaxpr, {v: i for i, v in enumerate(invars)})
    return {path_str(flat[i][0]) for i in found}


def _layer_shardings(param_shardings: Any, paths: Collection[str], axes: Sequence[str]):
    # one layer's sharding of each scanned leaf that is split over a gathered axis. A
    # quantized kernel is left out: its codes and scales are gathered whole at the top
    # (per-layer gathering of packed codes is not implemented yet)
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=is_kernel_leaf)[0]
    for kp, s in flat:
        if is_kernel_leaf(s):
            continue
        spec = tuple(s.spec)
        used = {a for e in spec for a in entry_axes(e)}
        if path_str(kp) in paths and spec and spec[0] is None and used & set(axes):
            out[path_str(kp)] = NamedSharding(s.mesh, P(*_drop_axes(P(*spec[1:]), axes)))
    return out


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
    skip_nonfinite: bool = False,
    per_layer: bool = True,
    with_rng: bool = False,
) -> Callable[..., tuple[Any, Any, Any, dict[str, Any]]]:
    """:func:`jaxlora.train_step` jitted with explicit input/output shardings and donation.

    The step keeps params, adapters and optimizer state in the shardings they came in with
    (so they can be donated and the next step reuses the buffers; unmoved params go
    through without a copy) and returns replicated metrics. Like :func:`jaxlora.train_step`
    it is a ``jax.jit`` function: ``step.lower(...).compile()`` gives the executable, its
    ``cost_analysis()`` and its collectives (:mod:`jaxlora.profiling`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``);
        ``loss_fn(params, batch, key)`` with ``with_rng``.
      tx: The optimizer the state was initialised with.
      param_shardings: From :func:`param_shardings`.
      adapter_shardings: From :func:`adapter_shardings`.
      opt_state_shardings: From :func:`opt_state_shardings`.
      batch_sharding: A sharding (or a tree of them) for the batch, e.g.
        :func:`batch_sharding`.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux_dict)``.
      strict: Passed to :func:`jaxlora.adapt`.
      donate: Donate the params, adapters and optimizer state buffers.
      gather: Mesh axes over which the base params are all-gathered where used (FSDP:
        split at rest, whole where used): once at the top of the step, or per layer for
        scanned stacks (``per_layer``). Without it XLA may instead keep the
        kernels split, replicate the batch and all-reduce every activation, then gather
        each kernel again for the backward pass. ``()`` leaves the choice to XLA.
      skip_nonfinite: As for :func:`jaxlora.train_step`: a step whose ``finite`` metric is
        false leaves the state unchanged.
      per_layer: Gather the stacked kernels of a scanned model one layer per scan
        iteration, in the forward pass and again in the (rematerialised) backward pass
        (see the module docstring); ``False`` gathers them whole at the top, which holds
        every layer's gathered weights at once but does not recompute a layer that the
        model itself does not rematerialise.
      with_rng: As for :func:`jaxlora.train_step`: the step takes a PRNG key last,
        ``step(params, adapters, opt_state, batch, key)`` (replicated: every device draws
        the same masks as one device would), for the model's own dropout and the
        low-rank dropout.

    Returns:
      ``step(params, adapters, opt_state, batch) -> (params, adapters, opt_state, metrics)``
      (``step(params, adapters, opt_state, batch, key)`` with ``with_rng``).

    Examples:
      >>> from jaxlora.sharding import (adapter_shardings, batch_sharding, init_adapters,
      ...     init_opt_state, make_mesh, opt_state_shardings, param_shardings)
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> mesh = make_mesh()
      >>> params = {"w": {"kernel": jnp.eye(4)}}
      >>> psh = param_shardings(params, [(".*", P())], mesh)
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
      >>> params, ad, state, metrics = step(params, ad, state, jnp.ones((8, 4)))
      >>> float(metrics["loss"])
      1.0
    """
    mesh = next(s.mesh for s in jax.tree_util.tree_leaves(adapter_shardings) if hasattr(s, "mesh"))

    def step(params, adapters, opt_state, batch, *key):
        # traced once per compile: which leaves are scanned is known only from the loss
        # a quantized base is gathered whole at the top for now (see _layer_shardings)
        quantized = any(
            is_kernel_leaf(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_kernel_leaf)
        )
        per = per_layer and gather and not quantized
        scanned = scanned_paths(loss_fn, params, batch, *key) if per else set()
        layers = _layer_shardings(param_shardings, scanned, gather)
        inner = train_step(
            gathered(loss_fn, param_shardings, gather, skip=layers),
            tx,
            has_aux=has_aux,
            strict=strict,
            jit=False,
            skip_nonfinite=skip_nonfinite,
            with_rng=with_rng,
        )
        with layer_shardings(layers):
            return inner(params, adapters, opt_state, batch, *key)

    replicated = NamedSharding(mesh, P())
    key_sharding = (replicated,) if with_rng else ()
    return jax.jit(
        step,
        in_shardings=(
            param_shardings,
            adapter_shardings,
            opt_state_shardings,
            batch_sharding,
            *key_sharding,
        ),
        out_shardings=(param_shardings, adapter_shardings, opt_state_shardings, replicated),
        donate_argnums=(0, 1, 2) if donate else (),
    )
