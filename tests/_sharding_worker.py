"""A few LoRA steps of a tiny Llama on a global mesh; saves losses and adapters as .npz.

The same command runs alone (one process) or once per process under
``scripts/launch_processes.py local -n 2 --cpu-devices 2 -- python tests/_sharding_worker.py OUT``;
``tests/test_multihost.py`` checks that both save the same arrays. Process 0 writes the
file. Keys are the adapters' ``"/"``-joined key paths (``np.savez``, no pickle).
"""

from __future__ import annotations

import argparse
import functools


def _mesh_shape(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mesh", default="fsdp=-1", help="e.g. data=1,fsdp=2,tensor=2")
    parser.add_argument("--preset", default="fsdp_tp")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    # first, before anything touches a JAX backend
    from jaxlora import distributed

    distributed.initialize()

    import jax
    import numpy as np
    import optax

    import jaxlora as jl
    from jaxlora import sharding as sh
    from jaxlora.models import llama
    from jaxlora.targets import path_str, stacked

    config = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=args.scan,
    )
    init_params = functools.partial(llama.init_params, config=config)

    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    mesh = sh.make_mesh(_mesh_shape(args.mesh))
    method = jl.lora(
        rank=4, alpha=8.0, targets=stacked("all-linear") if args.scan else "all-linear"
    )
    run = sh.setup(
        loss_fn,
        jl.optimizer(optax.sgd(0.1, momentum=0.9)),
        # no arguments: a process-local key cannot feed a computation spanning all processes
        lambda: init_params(jax.random.key(0)),
        llama.partition_rules(args.preset),
        mesh,
        method=method,
        key=jax.random.key(1),
    )
    params, adapters, state, step = run.params, run.adapters, run.opt_state, run.step
    # every process draws the same global batch; put() keeps only its own shards
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)).astype(np.int32)
    batch = run.put_batch(ids)
    losses = []
    for _ in range(args.steps):
        params, adapters, state, metrics = step(params, adapters, state, batch)
        losses.append(float(metrics["loss"]))

    host = distributed.to_host(adapters)
    arrays = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(host)[0]}
    if jax.process_index() == 0:
        np.savez(args.out, losses=np.array(losses), **arrays)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, losses {losses}",
        flush=True,
    )


if __name__ == "__main__":
    main()
