"""A keyed (dropout) sharded train step on 8 fake CPU devices against one device.

Run by ``tests/test_train.py::test_sharded_step_with_rng_equals_the_unsharded_one`` as a
script in its own process, with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the flag acts only before JAX starts). A tiny scanned Llama with attention dropout and
LoRA with low-rank dropout trains 3 steps under FSDP (stacked kernels gathered per layer,
the batch split over the 8 devices); losses and adapters must equal the unsharded ``with_rng`` step
fed the same keys. SGD keeps float32 reduction-order noise linear (see _sharded_cases.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora as jl
from jaxlora import distributed
from jaxlora import sharding as sh
from jaxlora.models import llama
from jaxlora.targets import stacked

CONFIG = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    scan_layers=True,
    attention_dropout=0.1,
)
STEPS, BATCH, SEQ = 3, 8, 16
TOL = dict(atol=1e-5, rtol=0)


def loss_fn(params, ids, key):
    return llama.causal_lm_loss(llama.apply(params, ids, config=CONFIG, dropout_rng=key), ids)


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    method = jl.lora(rank=4, alpha=8.0, targets=stacked("all-linear"), dropout=0.1)
    init = functools.partial(llama.init_params, config=CONFIG)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    keys = jax.random.split(jax.random.key(5), STEPS)
    tx = jl.optimizer(optax.sgd(0.1, momentum=0.9))

    params = jax.jit(init)(jax.random.key(0))
    adapters = jax.jit(method.init)(jax.random.key(1), params)
    state = tx.init(adapters)
    step = jl.train_step(loss_fn, tx, with_rng=True, donate=False)
    ref = []
    for k in keys:
        params, adapters, state, m = step(params, adapters, state, jnp.asarray(ids), k)
        ref.append(float(m["loss"]))
    ref_adapters = jax.device_get(adapters)

    for preset, axes in (("fsdp", {"fsdp": 8}),):
        run = sh.setup(
            loss_fn,
            tx,
            lambda: init(jax.random.key(0)),
            llama.partition_rules(preset),
            sh.make_mesh(axes),
            method=method,
            key=jax.random.key(1),
            with_rng=True,
        )
        params, adapters, state, sstep = run.params, run.adapters, run.opt_state, run.step
        bsh = run.batch_sharding
        # the compiled step is inspectable like the unsharded one
        lowered = sstep.lower(params, adapters, state, distributed.put(ids, bsh), keys[0])
        assert lowered.compile().cost_analysis()["flops"] > 0
        losses = []
        for k in keys:
            params, adapters, state, m = sstep(
                params, adapters, state, distributed.put(ids, bsh), k
            )
            losses.append(float(m["loss"]))
        np.testing.assert_allclose(losses, ref, **TOL)
        got = jax.tree_util.tree_leaves(distributed.to_host(adapters))
        want = jax.tree_util.tree_leaves(ref_adapters)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL)
        print(preset, "losses", losses)
    print("sharded == unsharded")


if __name__ == "__main__":
    main()
