"""Helper of tests/test_checkpoint.py: completes a save, then is killed during the next one.

Run as ``python tests/_ckpt_kill.py DIR``. It writes step 1, prints ``SAVING`` and starts
writing step 2 (32 MB of random adapters, large enough that the write takes a while); the
test SIGKILLs it as soon as orbax's temporary step directory appears.
"""

from __future__ import annotations

import sys
import time

import jax

import jaxlora as jl
from jaxlora.checkpoint import CheckpointManager


def params():
    # shapes only: LoRA's init never reads the base values
    return {"w": {"kernel": jax.ShapeDtypeStruct((4096, 4096), "float32")}}


def method_and_adapters(step: int):
    """The method and the (random, step-dependent) adapters saved at ``step``."""
    method = jl.lora(rank=1024, targets=".*kernel")
    adapters = method.init(jax.random.key(0), params())
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(step), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return method, jax.tree_util.tree_unflatten(treedef, leaves)


def main(directory: str) -> None:
    mgr = CheckpointManager(directory)
    mgr.save(1, adapters=method_and_adapters(1)[1])
    mgr.wait()
    _, adapters = method_and_adapters(2)
    jax.block_until_ready(adapters)
    print("SAVING", flush=True)
    mgr.save(2, adapters=adapters)
    mgr.wait()
    time.sleep(120)  # never reached in the test: the parent kills us first


if __name__ == "__main__":
    main(sys.argv[1])
