"""Multi-process runs: one script, launched once per host (or per GPU), one global mesh.

JAX is multi-controller: every process runs the same program, owns its local devices and
sees all devices of all processes through ``jax.devices()``. :func:`initialize` connects
the processes before anything else touches JAX. It is driven by the environment, so an
experiment script needs no flags to run on a laptop, a TPU pod slice or a GPU cluster:

* ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_COORDINATOR_ADDRESS`` (``host:port``),
  as set by ``scripts/launch_processes.py local|ssh``: explicit initialisation;
* ``JAXLORA_DISTRIBUTED=auto``, or a SLURM / Open MPI job of several tasks, or a
  multi-host TPU slice that names its workers (``TPU_WORKER_HOSTNAMES``): JAX's own cluster
  detection fills in everything;
* anything else, or one process: nothing happens (``JAXLORA_DISTRIBUTED=0`` forces that).

Arrays that every process can compute alike (a batch from a seeded loader, weights read
from the same file) become global arrays with :func:`put`; :func:`to_host` brings a
global array back to every process as numpy, for saving or comparing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["initialize", "put", "to_host"]

_OFF = ("0", "off", "false", "no")


def _cluster_size(env: Mapping[str, str]) -> int:
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "").isdigit():
            return int(env[var])
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) if hosts else 1


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    Call it first thing in a script, before any other JAX call (initialising later is an
    error in JAX). Calling it again is a no-op.

    Args:
      env: The environment to read (``os.environ`` by default).

    Returns:
      Whether JAX runs distributed (``True`` also if it was already initialised).

    Raises:
      ValueError: If ``JAX_NUM_PROCESSES`` > 1 but the coordinator address or process id is
        missing.

    Examples:
      >>> initialize({})  # a single process: nothing to do
      False
      >>> initialize({"JAX_NUM_PROCESSES": "1"})
      False
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    mode = env.get("JAXLORA_DISTRIBUTED", "").strip().lower()
    if mode in _OFF:
        return False
    if "JAX_NUM_PROCESSES" in env:
        n = int(env["JAX_NUM_PROCESSES"])
        if n <= 1:
            return False
        address, pid = env.get("JAX_COORDINATOR_ADDRESS"), env.get("JAX_PROCESS_ID")
        if not address or pid is None:
            raise ValueError(
                f"JAX_NUM_PROCESSES={n} also needs JAX_COORDINATOR_ADDRESS (host:port of "
                f"process 0) and JAX_PROCESS_ID; got {address!r} and {pid!r}"
            )
        jax.distributed.initialize(
            coordinator_address=address, num_processes=n, process_id=int(pid)
        )
        return True
    if mode == "auto" or _cluster_size(env) > 1:
        jax.distributed.initialize()
        return True
    return False


def put(tree: Any, shardings: Any) -> Any:
    """Turns host values that every process holds alike into global sharded arrays.

    Each process copies only the shards its own devices hold (the result never shares
    memory with ``tree``, so it may be donated), so this also works when the
    sharding spans devices of several processes (where ``jax.device_put`` of one process's
    array cannot). For large weights, prefer initialising or loading straight into shards.

    Args:
      tree: A pytree of numpy or JAX arrays, equal on every process.
      shardings: A sharding, or a tree of them matching ``tree`` (a prefix is fine).

    Returns:
      The tree of global ``jax.Array``.

    Examples:
      >>> import numpy as np, jax
      >>> from jaxlora.sharding import make_mesh, batch_sharding
      >>> x = put(np.arange(8.0).reshape(4, 2), batch_sharding(make_mesh()))
      >>> x.sharding.spec, float(x.sum())
      (P(('data', 'fsdp'),), 28.0)
    """

    def one(sharding, x):
        host = np.asarray(x)
        # a copy per shard: the global array must not share memory with ``x`` (on CPU a
        # device buffer can alias host memory), since train steps donate their inputs
        return jax.make_array_from_callback(
            host.shape, sharding, lambda index: np.array(host[index], copy=True)
        )

    return jax.tree_util.tree_map(
        one, shardings, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )


def to_host(tree: Any) -> Any:
    """The full value of every array of ``tree`` as numpy, on every process.

    Examples:
      >>> import jax.numpy as jnp
      >>> to_host({"w": jnp.ones(2)})
      {'w': array([1., 1.], dtype=float32)}
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)
