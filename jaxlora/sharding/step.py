"""The sharded train step: :func:`jaxlora.train_step` jitted with explicit shardings.

Under FSDP the step all-gathers each frozen kernel once at the top of the loss (the gathered
copy serves forward and backward; a frozen kernel has no gradient to reduce-scatter). For
scanned layers that gathers the whole stack at once: per-layer gathering inside the scan
would need the constraint inside the layer body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.sharding.rules import entry_axes
from jaxlora.targets import is_kernel_leaf
from jaxlora.train import train_step

__all__ = ["gathered", "sharded_train_step"]


def _drop_axes(spec: P, axes: Sequence[str]) -> P:
    def keep(entry):
        kept = tuple(a for a in entry_axes(entry) if a not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(e) for e in spec))


def gathered(loss_fn: Callable[..., Any], param_shardings: Any, axes: Sequence[str]):
    """Wraps ``loss_fn`` so its params are first resharded without the mesh ``axes``.

    ``jaxlora.adapt`` carries the constraint into the adapter factors, so under FSDP each
    frozen kernel is all-gathered once per step, used by the forward and the backward
    pass alike, and never differentiated.

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

    # loss_fn sees a quantized kernel as one kernel: constrain it as its codes are sharded
    # (jaxlora.adapt then gathers the codes and scales, not a float copy)
    def drop(s):
        s = s.data if is_kernel_leaf(s) else s
        return NamedSharding(s.mesh, _drop_axes(s.spec, axes))

    whole = jax.tree_util.tree_map(drop, param_shardings, is_leaf=is_kernel_leaf)

    def fn(params, *args, **kwargs):
        return loss_fn(jax.lax.with_sharding_constraint(params, whole), *args, **kwargs)

    return fn


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
) -> Callable[..., tuple[Any, Any, Any, dict[str, Any]]]:
    """:func:`jaxlora.train_step` jitted with explicit input/output shardings and donation.

    The step keeps params, adapters and optimizer state in the shardings they came in with
    (so they can be donated and the next step reuses the buffers; unmoved params go
    through without a copy) and returns replicated metrics.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      tx: The optimizer the state was initialised with.
      param_shardings: From :func:`param_shardings`.
      adapter_shardings: From :func:`adapter_shardings`.
      opt_state_shardings: From :func:`opt_state_shardings`.
      batch_sharding: A sharding (or a tree of them) for the batch, e.g.
        :func:`batch_sharding`.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux_dict)``.
      strict: Passed to :func:`jaxlora.adapt`.
      donate: Donate the params, adapters and optimizer state buffers.
      gather: Mesh axes over which the base params are all-gathered once at the top of the
        step (FSDP: split at rest, whole where used). Without it XLA may instead keep the
        kernels split, replicate the batch and all-reduce every activation, then gather
        each kernel again for the backward pass. ``()`` leaves the choice to XLA.
      skip_nonfinite: As for :func:`jaxlora.train_step`: a step whose ``finite`` metric is
        false leaves the state unchanged.

    Returns:
      ``step(params, adapters, opt_state, batch) -> (params, adapters, opt_state, metrics)``.

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
    step = train_step(
        gathered(loss_fn, param_shardings, gather),
        tx,
        has_aux=has_aux,
        strict=strict,
        jit=False,
        skip_nonfinite=skip_nonfinite,
    )
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(param_shardings, adapter_shardings, opt_state_shardings, batch_sharding),
        out_shardings=(param_shardings, adapter_shardings, opt_state_shardings, replicated),
        donate_argnums=(0, 1, 2) if donate else (),
    )
