"""Helper of tests/test_multihost.py: checkpoints whose arrays span two processes.

Run once per process under ``scripts/launch_processes.py local -n 2 --cpu-devices 2``:

* ``save DIR``: LoRA adapters and an Adam state FSDP-sharded over the 4 devices of both
  processes (each process holds half of every factor) are saved to ``DIR/fsdp``, and the
  same values replicated over every device to ``DIR/repl``. Then every restore that crosses
  layouts must give the saved bits back, each array verified: ``fsdp`` onto the same mesh,
  onto the mesh with its devices reversed (each process now holds the regions the other
  one wrote), and replicated; ``repl`` onto the FSDP mesh (no process holds a whole saved
  region: it is gathered to be verified).
* ``corrupt DIR``: after the parent flipped a byte of each directory, every restore must
  be refused on every process with the corrupt array named.

The values are random bits (incompressible, so a flipped byte decodes as one wrong byte
rather than as a broken compressed block), drawn from a seed on every process alike. Each
shard is 4 KiB: OCDBT inlines values up to 1 KiB into its b-tree nodes, which carry a
CRC-32C of their own; larger ones, the case that needs these checksums, are stored apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

QA = "layers/0/attn/q_proj/kernel/a"
"""The array whose bytes the parent flips."""


def main(mode: str, root: str) -> None:
    from jaxlora import distributed

    distributed.initialize()

    import jax
    import numpy as np
    import optax

    import jaxlora as jl
    from jaxlora import sharding as sh
    from jaxlora.checkpoint import CheckpointManager, CorruptCheckpointError
    from jaxlora.keypaths import path_tuple
    from jaxlora.models import llama

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    me = jax.process_index()
    config = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
    )
    params = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), config))
    method = jl.lora(rank=16, targets=r".*(q|down)_proj/kernel")
    tx = jl.optimizer(optax.adam(1e-2))
    target = jax.eval_shape(method.init, jax.random.key(0), params)
    opt_target = jax.eval_shape(tx.init, target)

    def random_bits(tree, seed):
        rng = np.random.default_rng(seed)

        def one(x):
            raw = rng.integers(0, 256, int(np.prod(x.shape)) * x.dtype.itemsize, np.uint8)
            return raw.view(x.dtype).reshape(x.shape)

        return jax.tree_util.tree_map(one, tree)

    want, want_opt = random_bits(target, 0), random_bits(opt_target, 1)

    def shardings(devices):
        mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("fsdp",))
        psh = sh.param_shardings(params, llama.partition_rules("fsdp"), mesh)
        ash = sh.adapter_shardings(target, psh)
        return ash, sh.opt_state_shardings(tx, target, ash)

    fsdp = shardings(jax.devices())
    reversed_ = shardings(jax.devices()[::-1])
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)), jax.sharding.PartitionSpec()
    )
    repl = (
        jax.tree_util.tree_map(lambda _: everywhere, target),
        jax.tree_util.tree_map(lambda _: everywhere, opt_target),
    )

    def restore(directory, layout):
        with CheckpointManager(directory) as mgr:
            return mgr.restore(
                adapters=target,
                opt_state=opt_target,
                adapter_shardings=layout[0],
                opt_state_shardings=layout[1],
            )

    def check(directory, layout, name):
        st = restore(directory, layout)
        for got, expected in [(st.adapters, want), (st.opt_state, want_opt)]:
            flat_got = jax.tree_util.tree_leaves(got)
            flat_want = jax.tree_util.tree_leaves(expected)
            assert len(flat_got) == len(flat_want) >= 4
            for x, ref in zip(flat_got, flat_want, strict=True):
                for shard in x.addressable_shards:
                    a = np.ascontiguousarray(np.asarray(shard.data)).view(np.uint8)
                    b = np.ascontiguousarray(ref[shard.index]).view(np.uint8)
                    assert np.array_equal(a, b), (name, shard.index)
        print(f"restored {name}", flush=True)

    root = Path(root)
    if mode == "save":
        for name, layout in [("fsdp", fsdp), ("repl", repl)]:
            adapters = distributed.put(want, layout[0])
            opt_state = distributed.put(want_opt, layout[1])
            if name == "fsdp":  # each process holds only part of the factors
                assert not any(x.is_fully_addressable for x in jax.tree_util.tree_leaves(adapters))
            with CheckpointManager(root / name) as mgr:
                mgr.save(1, adapters=adapters, opt_state=opt_state)
            # the bytes of one region this process wrote, for the parent to find and flip
            x = next(
                x
                for kp, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
                if "/".join(path_tuple(kp, unbox=False)) == QA
            )
            mine = [s for s in x.addressable_shards if s.replica_id == 0]
            if mine and (name == "repl") == (me == 0):
                head = np.ascontiguousarray(np.asarray(mine[-1].data)).reshape(-1)
                head = head.view(np.uint8)[:32]
                print(f"WROTE {name} {head.tobytes().hex()}", flush=True)
        check(root / "fsdp", fsdp, "fsdp onto fsdp")
        check(root / "fsdp", reversed_, "fsdp onto reversed devices")
        check(root / "fsdp", repl, "fsdp onto replicated")
        check(root / "repl", fsdp, "repl onto fsdp")
        print(f"OK {me}", flush=True)
    else:
        for name, layout in [("fsdp", fsdp), ("fsdp", reversed_), ("repl", fsdp)]:
            try:
                restore(root / name, layout)
            except CorruptCheckpointError as e:
                print(f"REFUSED {name}: {e}", flush=True)
            else:
                raise AssertionError(f"{name}: a corrupt checkpoint restored")
        print(f"OK {me}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
