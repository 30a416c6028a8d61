"""Sharding: one device mesh, base params sharded by path rules, adapters following them.

* :mod:`~jaxlora.sharding.mesh`: the mesh (``data``, ``fsdp``, ``tensor`` axes) and the
  batch's sharding over it.
* :mod:`~jaxlora.sharding.rules`: base parameters sharded by ``(regex, PartitionSpec)``
  rules over their key paths (model presets live with the model:
  :func:`jaxlora.models.llama.partition_rules`).
* :mod:`~jaxlora.sharding.adapters`: each adapter array follows the base kernel it adapts,
  axis by axis; optimizer state follows its adapter array.
* :mod:`~jaxlora.sharding.init`: adapters and optimizer state born in their shards.
* :mod:`~jaxlora.sharding.step`: :func:`jaxlora.train_step` jitted with explicit shardings
  and donation; FSDP kernels gathered once per step, scanned stacks one layer at a time.
* :mod:`~jaxlora.sharding.setup`: all of the above in one call, :func:`setup`: params,
  adapters and optimizer state in their shards, the batch sharding and the step.

Counting the collectives of a compiled step is :func:`jaxlora.profiling.collectives`.
"""

from jaxlora.sharding.adapters import (
    adapter_shardings,
    adapter_specs,
    opt_state_shardings,
    opt_state_specs,
)
from jaxlora.sharding.errors import ShardingError
from jaxlora.sharding.init import init_adapters, init_opt_state
from jaxlora.sharding.mesh import AXES, BATCH_AXES, batch_sharding, make_mesh, mesh_shape
from jaxlora.sharding.rules import Rules, param_shardings, param_specs
from jaxlora.sharding.setup import ShardedRun, setup
from jaxlora.sharding.step import gathered, scanned_paths, sharded_train_step

__all__ = [
    "AXES",
    "BATCH_AXES",
    "Rules",
    "ShardedRun",
    "ShardingError",
    "adapter_shardings",
    "adapter_specs",
    "batch_sharding",
    "gathered",
    "init_adapters",
    "init_opt_state",
    "make_mesh",
    "mesh_shape",
    "opt_state_shardings",
    "opt_state_specs",
    "param_shardings",
    "param_specs",
    "scanned_paths",
    "setup",
    "sharded_train_step",
]
