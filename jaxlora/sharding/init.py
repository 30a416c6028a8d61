"""Adapters and optimizer state initialised directly into their shards.

A method's ``init`` reads only shapes, so ``jax.jit(init, out_shardings=...)`` builds every
adapter array straight into the shards :mod:`jaxlora.sharding.adapters` derives for it, and
likewise ``tx.init``: nothing exists on one device first.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.sharding.adapters import adapter_shardings, opt_state_shardings

__all__ = ["init_adapters", "init_opt_state"]


def _shapes_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def init_adapters(method: Any, key: jax.Array, params: Any, param_shardings: Any) -> Any:
    """``method.init(key, params)`` computed directly into the adapters' shards.

    ``params`` may be ``jax.ShapeDtypeStruct`` for the (usual) shape-only methods. Given
    arrays, they enter the computation in their shardings, so methods whose ``init`` reads
    values (:func:`jaxlora.full`, PiSSA) work too. The random values equal the unsharded
    ``method.init`` (JAX's partitionable threefry).

    Args:
      method: A :class:`jaxlora.Method`.
      key: A PRNG key (the same on every process).
      params: The base parameters or their shapes.
      param_shardings: From :func:`param_shardings`.

    Returns:
      The adapters tree, each array a global ``jax.Array`` with its derived sharding.

    Examples:
      >>> from jaxlora.sharding import make_mesh, param_shardings, init_adapters
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, [(".*", P())], make_mesh())
      >>> ad = init_adapters(jl.lora(rank=2, targets=".*kernel"), jax.random.key(0),
      ...                    params, psh)
      >>> ad["up"]["kernel"].a.sharding.spec
      P(None, None)
    """
    shapes = _shapes_of(params)
    abstract = jax.eval_shape(method.init, key, shapes)
    out = adapter_shardings(abstract, param_shardings)
    mesh = jax.tree_util.tree_leaves(out)[0].mesh
    concrete = all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))
    # The key enters as raw bits replicated over the mesh: in a multi-process run a
    # process-local key array cannot be an argument of a computation spanning all hosts.
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    bits = np.asarray(jax.random.key_data(key) if typed else key)
    impl = jax.random.key_impl(key) if typed else None

    def init(raw, p):
        k = jax.random.wrap_key_data(raw, impl=impl) if typed else raw
        return method.init(k, shapes if p is None else p)

    in_shardings = (NamedSharding(mesh, P()), param_shardings if concrete else None)
    fn = jax.jit(init, in_shardings=in_shardings, out_shardings=out)
    return fn(bits, params if concrete else None)


def init_opt_state(tx: optax.GradientTransformation, adapters: Any, adapter_shardings: Any) -> Any:
    """``tx.init(adapters)`` computed directly into shards that follow the adapters.

    Examples:
      >>> from jaxlora.sharding import (
      ...     make_mesh, param_shardings, adapter_shardings, init_adapters, init_opt_state)
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"up": {"kernel": jnp.zeros((8, 16))}}
      >>> psh = param_shardings(params, [(".*", P())], make_mesh())
      >>> ad = init_adapters(jl.lora(rank=2, targets=".*kernel"), jax.random.key(0),
      ...                    params, psh)
      >>> state = init_opt_state(jl.optimizer(optax.sgd(0.1)), ad, adapter_shardings(ad, psh))
    """
    out = opt_state_shardings(tx, adapters, adapter_shardings)
    return jax.jit(tx.init, in_shardings=(adapter_shardings,), out_shardings=out)(adapters)
