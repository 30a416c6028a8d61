#!/usr/bin/env python
"""Collective operations of a sharded LoRA train step, per preset, from compiled HLO.

Compiles (never runs) the train step and the forward pass alone of a Llama-style model on
8 fake CPU devices for each mesh preset, scanned and unscanned, and counts the collectives
in the compiled programs (an operation inside the scan body counts once). "kernel AG" counts
all-gathers whose result is a whole frozen base leaf: under FSDP the forward needs each
split leaf once, and the train step must need no more (the frozen base has no weight
gradient to reduce-scatter and its gathered copy serves the backward pass too). The
``fsdp (xla)`` row leaves the choice to XLA (``gather=()``): it keeps the kernels split,
replicates the batch and all-reduces activations, then gathers kernels for the backward.

    python scripts/bench_sharding.py            # d=256, 4 layers, batch 16x128
    python scripts/bench_sharding.py --hidden 512 --layers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import optax

import jaxlora as jl
from jaxlora import profiling
from jaxlora import sharding as sh
from jaxlora.models import llama
from jaxlora.targets import stacked

MESHES = {
    "dp": ({"data": 8}, "dp", ("fsdp",)),
    "fsdp": ({"fsdp": 8}, "fsdp", ("fsdp",)),
    "fsdp (xla)": ({"fsdp": 8}, "fsdp", ()),
    "fsdp_tp": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", ("fsdp",)),
    "tp": ({"data": 2, "tensor": 4}, "tp", ("fsdp",)),
}


def counts(config, mesh_shape, preset, gather, batch, seq):
    init = functools.partial(llama.init_params, config=config)
    shapes = jax.eval_shape(init, jax.random.key(0))
    # a scanned model's kernels are (L, d_in, d_out): their stack axis is said, not guessed
    method = jl.lora(rank=8, targets=stacked("all-linear") if config.scan_layers else "all-linear")
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    run = sh.setup(
        loss_fn,
        jl.optimizer(optax.adamw(1e-4)),
        shapes,
        llama.partition_rules(preset),
        sh.make_mesh(mesh_shape),
        method=method,
        key=jax.random.key(1),
        abstract=True,  # lowered and compiled only
        gather=gather,
    )
    psh, ash, bsh = run.param_shardings, run.adapter_shardings, run.batch_sharding
    fwd = jax.jit(jl.adapt(sh.gathered(loss_fn, psh, gather)), in_shardings=(psh, ash, bsh))
    programs = {
        "forward": fwd.lower(run.params, run.adapters, ids),
        "step": run.step.lower(run.params, run.adapters, run.opt_state, ids),
    }
    kernels = {tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes) if x.ndim >= 2}
    rows = {}
    for name, lowered in programs.items():
        cs = profiling.collectives(lowered.compile().as_text())
        row = {op: sum(c.op == op for c in cs) for op in profiling.COLLECTIVES}
        row["kernel AG"] = sum(c.op == "all-gather" and c.shapes[-1] in kernels for c in cs)
        row["kernel RS/AR"] = sum(
            c.op in ("reduce-scatter", "all-reduce") and bool(set(c.shapes) & kernels) for c in cs
        )
        rows[name] = row
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--presets", default=",".join(MESHES))
    args = parser.parse_args(argv)
    base = llama.LlamaConfig(
        vocab_size=4 * args.hidden,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
    )
    cols = ["kernel AG", "kernel RS/AR", *profiling.COLLECTIVES]
    print(f"{'preset':<12}{'scan':<6}{'program':<9}" + "".join(f"{c:>20}" for c in cols))
    for name in args.presets.split(","):
        mesh_shape, preset, gather = MESHES[name]
        for scan in (False, True):
            config = dataclasses.replace(base, scan_layers=scan)
            rows = counts(config, mesh_shape, preset, gather, args.batch, args.seq)
            for program, row in rows.items():
                print(
                    f"{name:<12}{scan!s:<6}{program:<9}" + "".join(f"{row[c]:>20}" for c in cols),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
