"""LoRA-FA: A frozen at LoRA's init, B trained; no optimizer state and no gradient for A."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora as jl
from jaxlora.models import llama
from jaxlora.profiling import compiled_cost

PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)) * 0.3},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (2, 8, 4)) * 0.3},
}
BATCH = {
    "x": jax.random.normal(jax.random.key(2), (6, 16)),
    "y": jax.random.normal(jax.random.key(3), (2, 6, 4)),
}


def _loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["q"]["kernel"])
    h = jax.vmap(lambda w: h @ w)(p["s"]["kernel"])
    return jnp.mean((h - batch["y"]) ** 2)


def test_a_is_loras_init_and_frozen():
    key = jax.random.key(7)
    fa = jl.lora_fa(rank=2, alpha=4, targets=".*kernel").init(key, PARAMS)
    ref = jl.lora(rank=2, alpha=4, targets=".*kernel").init(key, PARAMS)
    for path in ("q", "s"):
        np.testing.assert_array_equal(fa[path]["kernel"].a, ref[path]["kernel"].a)
        assert fa[path]["kernel"].scale == ref[path]["kernel"].scale
    labels = jl.labels(fa)
    assert (labels["q"]["kernel"].a, labels["q"]["kernel"].b) == ("frozen", "lora_b")
    # r * d_out per kernel, stacked kernels once per layer
    assert jl.num_trainable(fa) == 2 * 8 + 2 * (2 * 4)


def test_sgd_step_moves_b_by_the_merged_gradient_and_never_a():
    fa = jl.lora_fa(rank=2, alpha=4, targets=".*kernel").init(jax.random.key(0), PARAMS)
    # B off zero, so that the gradient w.r.t. B depends on A
    fa["q"]["kernel"] = dataclasses.replace(fa["q"]["kernel"], b=jnp.full((2, 8), 0.1))
    lr = 0.5
    tx = jl.optimizer(optax.sgd(lr))
    state = tx.init(fa)
    assert all(x.size <= 1 for x in jax.tree_util.tree_leaves(state))  # sgd: no state at all
    step = jl.train_step(_loss, tx, donate=False)
    _, new, _, _ = step(PARAMS, fa, state, BATCH)
    grads = jax.grad(lambda a: _loss(jl.merge(PARAMS, a), BATCH))(fa)
    for path in ("q", "s"):
        old_n, new_n, g = fa[path]["kernel"], new[path]["kernel"], grads[path]["kernel"]
        np.testing.assert_array_equal(new_n.a, old_n.a)
        np.testing.assert_allclose(new_n.b, old_n.b - lr * g.b, atol=1e-6, rtol=1e-5)


def test_adam_holds_no_state_for_a():
    fa = jl.lora_fa(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    state = jl.optimizer(optax.adam(1e-3)).init(fa)
    b_size = sum(n.b.size for n in jax.tree_util.tree_leaves(fa, is_leaf=lambda x: hasattr(x, "b")))
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * b_size + 1  # mu, nu, count


@pytest.fixture(scope="module")
def temp_bytes():
    config = llama.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=352,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
    )
    params = llama.init_params(jax.random.key(0), config)
    batch = {"ids": jax.random.randint(jax.random.key(1), (2, 64), 0, 256)}

    def loss(p, b):
        return llama.causal_lm_loss(llama.apply(p, b["ids"], config=config), b["ids"])

    out = {}
    for name, method in [("lora", jl.lora), ("lora_fa", jl.lora_fa)]:
        adapters = method(rank=8, targets="all-linear").init(jax.random.key(2), params)
        tx = jl.optimizer(optax.adam(1e-3))
        step = jl.train_step(loss, tx)
        out[name] = compiled_cost(step, params, adapters, tx.init(adapters), batch).temp_bytes
    return out


def test_train_step_temp_memory_below_loras(temp_bytes):
    # memory_analysis is deterministic for a program; LoRA must keep every targeted
    # kernel's d_in-wide input for A's gradient, LoRA-FA only the r-wide x@A
    print({**temp_bytes, "ratio": temp_bytes["lora_fa"] / temp_bytes["lora"]})
    assert temp_bytes["lora_fa"] < temp_bytes["lora"]
