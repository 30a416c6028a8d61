"""One call from base params, partition rules and a mesh to a sharded training run.

:func:`setup` runs the sequence every sharded run starts with (base params put into their
shards by the rules, adapters born in shards that follow their kernels, optimizer state
following its adapters, the batch sharding, and the jitted step with all of them) and
returns the pieces, so a script does not repeat it. Each piece is also available alone
(:func:`~jaxlora.sharding.param_shardings`, :func:`~jaxlora.sharding.init_adapters`,
:func:`~jaxlora.sharding.init_opt_state`, :func:`~jaxlora.sharding.sharded_train_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import Mesh

from jaxlora import distributed
from jaxlora.sharding.adapters import adapter_shardings as _adapter_shardings
from jaxlora.sharding.adapters import opt_state_shardings as _opt_state_shardings
from jaxlora.sharding.init import init_adapters, init_opt_state
from jaxlora.sharding.mesh import BATCH_AXES, batch_sharding
from jaxlora.sharding.rules import Rules, param_shardings
from jaxlora.sharding.step import sharded_train_step

__all__ = ["ShardedRun", "setup"]


class ShardedRun(NamedTuple):
    """What :func:`setup` returns: the state in its shards, the step, and the shardings
    (named as :func:`~jaxlora.sharding.sharded_train_step` takes them)."""

    params: Any
    adapters: Any
    opt_state: Any
    step: Callable[..., Any]
    param_shardings: Any
    adapter_shardings: Any
    opt_state_shardings: Any
    batch_sharding: Any

    def put_batch(self, batch: Any) -> Any:
        """``batch`` (host arrays, alike on every process) in :attr:`batch_sharding`."""
        return distributed.put(batch, self.batch_sharding)


def setup(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    params: Any,
    rules: Rules,
    mesh: Mesh,
    *,
    method: Any = None,
    key: jax.Array | None = None,
    adapters: Any = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    abstract: bool = False,
    **step_kwargs: Any,
) -> ShardedRun:
    """Base params, adapters, optimizer state and the step of a sharded run, each in its
    shards.

    Args:
      loss_fn: ``loss_fn(params, batch)`` (see :func:`~jaxlora.sharding.sharded_train_step`
        for ``has_aux`` and ``with_rng``).
      tx: The optimizer (``jl.optimizer(...)`` or a recipe's).
      params: The base params: arrays (host or device, alike on every process), copied into
        their shards (so the step may donate them), or a function of no arguments that
        returns them, run jitted straight into the shards (the whole model is never on one
        device).
      rules: ``(regex, PartitionSpec)`` rules over the params' key paths (e.g.
        :func:`jaxlora.models.llama.partition_rules`).
      mesh: The mesh (:func:`~jaxlora.sharding.make_mesh`).
      method: With ``key``: the adapters are ``method.init(key, params)``, computed in their
        shards.
      key: The PRNG key of ``method.init`` (the same on every process).
      adapters: Adapters made already (e.g. by ``recipe.prepare``, or restored), instead of
        ``method`` and ``key``: copied into their shards.
      batch_axes: Mesh axes the batch's leading axis is split over.
      abstract: Plan only: ``params`` may be shapes (``jax.ShapeDtypeStruct``), and the
        returned params, adapters and optimizer state are shapes, nothing is allocated
        (``run.step.lower(run.params, ...)`` then compiles the step of a model too large
        for this host, for its ``memory_analysis()``).
      **step_kwargs: Passed to :func:`~jaxlora.sharding.sharded_train_step` (``donate``,
        ``with_rng``, ``has_aux``, ``skip_nonfinite``, ``gather``, ``per_layer``,
        ``strict``).

    Returns:
      A :class:`ShardedRun`.

    Raises:
      ValueError: Unless exactly one of ``adapters`` or ``method`` with ``key`` is given.
      jaxlora.ShardingError: If a rule does not fit its parameter (from
        :func:`~jaxlora.sharding.param_shardings`).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> from jax.sharding import PartitionSpec as P
      >>> from jaxlora.sharding import make_mesh, setup
      >>> run = setup(
      ...     lambda p, b: jnp.mean((b @ p["w"]["kernel"]) ** 2),
      ...     jl.optimizer(optax.sgd(0.1)),
      ...     {"w": {"kernel": jnp.eye(4)}}, [(".*", P())], make_mesh(),
      ...     method=jl.lora(rank=2, targets=".*kernel"), key=jax.random.key(0))
      >>> _, adapters, state, metrics = run.step(
      ...     run.params, run.adapters, run.opt_state, run.put_batch(jnp.ones((8, 4))))
      >>> float(metrics["loss"])
      1.0
    """
    given = [
        n for n, v in (("adapters", adapters), ("method", method), ("key", key)) if v is not None
    ]
    if given not in (["adapters"], ["method", "key"]):
        raise ValueError(
            "setup() needs either adapters= (made already) or method= and key= (to "
            f"initialise them in their shards), not {' and '.join(given) or 'none of them'}"
        )
    shapes = jax.eval_shape(params) if callable(params) else params
    psh = param_shardings(shapes, rules, mesh)
    if abstract:
        params = jax.eval_shape(lambda: shapes)
        if adapters is None:
            adapters = jax.eval_shape(method.init, key, params)
        ash = _adapter_shardings(adapters, psh)
        opt_state = jax.eval_shape(tx.init, adapters)
    else:
        if callable(params):
            params = jax.jit(params, out_shardings=psh)()
        else:
            params = distributed.put(params, psh)
        if adapters is None:
            adapters = init_adapters(method, key, params, psh)
            ash = _adapter_shardings(adapters, psh)
        else:
            ash = _adapter_shardings(adapters, psh)
            adapters = distributed.put(adapters, ash)
        opt_state = init_opt_state(tx, adapters, ash)
    osh = _opt_state_shardings(tx, adapters, ash)
    bsh = batch_sharding(mesh, batch_axes)
    step = sharded_train_step(
        loss_fn,
        tx,
        param_shardings=psh,
        adapter_shardings=ash,
        opt_state_shardings=osh,
        batch_sharding=bsh,
        **step_kwargs,
    )
    return ShardedRun(params, adapters, opt_state, step, psh, ash, osh, bsh)
