"""Helper of tests/test_checkpoint.py: restores a checkpoint onto another mesh.

``write`` and ``check`` run in the 1-device test process; ``python tests/_ckpt_mesh.py DIR``
runs with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: it restores ``DIR/one``
(written on one device) into FSDP shardings over 8 devices, checks values and shardings,
then writes ``DIR/eight`` from the sharded arrays for the parent to restore on one device.
Values are recomputed from seeds on the default device in both processes (unsharded
computations give the same bits whatever the device count), so nothing is passed between
them but the checkpoints.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora as jl
from jaxlora import sharding as sh
from jaxlora.checkpoint import CheckpointManager
from jaxlora.models import llama

CONFIG = llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
)
METHODS = {
    # q (column-parallel: d_in split) and down (row-parallel: d_out split) cover both cases
    "lora": jl.lora(rank=4, targets=r".*(q|down)_proj/kernel"),
    "vera": jl.vera(rank=8, targets=r".*(q|v)_proj/kernel"),
}
TX = jl.optimizer(optax.adam(1e-2))


@functools.cache
def abstract_params():
    return jax.eval_shape(functools.partial(llama.init_params, config=CONFIG), jax.random.key(0))


def expected(name: str, step: int):
    """Adapters and an Adam state with random values (all but the frozen arrays)."""
    return _expected(name, step)


@functools.partial(jax.jit, static_argnums=0)  # one compilation, not one per array
def _expected(name, step):
    method = METHODS[name]
    adapters = method.init(jax.random.key(0), abstract_params())
    state = TX.init(adapters)
    key = jax.random.fold_in(jax.random.key(1), step)

    def fill(tree, key):
        labels = jax.tree_util.tree_leaves(jl.labels(adapters)) if tree is adapters else None
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        out = [
            x
            if (labels and labels[i] == "frozen") or not jnp.issubdtype(x.dtype, jnp.floating)
            else jax.random.normal(keys[i], x.shape, x.dtype)
            for i, x in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    ka, ks = jax.random.split(key)
    return fill(adapters, ka), fill(state, ks)


def targets(name: str, mesh=None):
    method = METHODS[name]
    target = jax.eval_shape(method.init, jax.random.key(0), abstract_params())
    opt_target = jax.eval_shape(TX.init, target)
    if mesh is None:
        return target, opt_target, None, None
    psh = sh.param_shardings(abstract_params(), llama.partition_rules("fsdp"), mesh)
    ash = sh.adapter_shardings(target, psh)
    return target, opt_target, ash, sh.opt_state_shardings(TX, target, ash)


def write(directory: Path, step: int, mesh=None) -> None:
    for name in METHODS:
        adapters, state = expected(name, step)
        if mesh is not None:
            _, _, ash, osh = targets(name, mesh)
            adapters, state = jax.device_put(adapters, ash), jax.device_put(state, osh)
        with CheckpointManager(directory / name) as mgr:
            mgr.save(step, adapters=adapters, opt_state=state, data_position=step)


def _equal(got, want) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def check(directory: Path, step: int, mesh=None) -> None:
    for name in METHODS:
        target, opt_target, ash, osh = targets(name, mesh)
        with CheckpointManager(directory / name) as mgr:
            st = mgr.restore(
                step,
                adapters=target,
                opt_state=opt_target,
                adapter_shardings=ash,
                opt_state_shardings=osh,
            )
        adapters, state = expected(name, step)
        _equal(st.adapters, adapters)
        _equal(st.opt_state, state)
        if mesh is not None:
            for got, want in [(st.adapters, ash), (st.opt_state, osh)]:
                for x, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
            if name == "lora":  # FSDP splits the d side of every LoRA factor
                assert any(
                    len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                    for x in jax.tree_util.tree_leaves(st.adapters)
                )


def main(root: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = sh.make_mesh({"fsdp": -1})
    root = Path(root)
    check(root / "one", step=1, mesh=mesh)
    write(root / "eight", step=2, mesh=mesh)
    print("OK", jax.device_count())


if __name__ == "__main__":
    main(sys.argv[1])
