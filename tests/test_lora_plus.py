"""LoRA+: one SGD and one Adam step against hand computations, schedules, bad ratios."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jl_testing import randomize

import jaxlora as jl

PARAMS = {"q": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
BATCH = {"x": jax.random.normal(jax.random.key(1), (5, 6)), "y": jnp.ones((5, 4))}


def _loss(p, batch):
    return jnp.mean((jnp.tanh(batch["x"] @ p["q"]["kernel"]) - batch["y"]) ** 2)


def _setup(method=jl.lora):
    ad = randomize(
        method(rank=2, targets=".*kernel").init(jax.random.key(2), PARAMS), jax.random.key(3)
    )
    grads = jax.grad(lambda a: _loss(jl.merge(PARAMS, a), BATCH))(ad)
    return ad, grads


def _step(tx, ad, state=None):
    step = jl.train_step(_loss, tx, donate=False)
    return step(PARAMS, ad, tx.init(ad) if state is None else state, BATCH)


@pytest.mark.parametrize("ratio", [16.0, 2.5])
def test_sgd_step(ratio):
    ad, g = _setup()
    lr = 0.1
    _, new, _, _ = _step(jl.lora_plus(optax.sgd, learning_rate=lr, ratio=ratio), ad)
    node, gn, nn = ad["q"]["kernel"], g["q"]["kernel"], new["q"]["kernel"]
    np.testing.assert_allclose(nn.a, node.a - lr * gn.a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nn.b, node.b - ratio * lr * gn.b, rtol=1e-5, atol=1e-6)


def test_adam_step_with_weight_decay():
    ad, g = _setup()
    lr, wd, eps = 1e-3, 0.1, 1e-8
    tx = jl.lora_plus(optax.adamw, learning_rate=lr, ratio=16, weight_decay=wd, eps=eps)
    _, new, _, _ = _step(tx, ad)
    node, gn, nn = ad["q"]["kernel"], g["q"]["kernel"], new["q"]["kernel"]
    # first Adam step: m̂ = g, v̂ = g², so the direction is g / (|g| + eps); AdamW adds wd·x
    for x, gx, got, rate in ((node.a, gn.a, nn.a, lr), (node.b, gn.b, nn.b, 16 * lr)):
        expect = x - rate * (gx / (jnp.abs(gx) + eps) + wd * x)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)


def test_schedule_is_scaled_every_step():
    ad, _ = _setup()
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    tx = jl.lora_plus(optax.sgd, learning_rate=schedule, ratio=4)
    state = tx.init(ad)
    for count in range(3):
        g = jax.grad(lambda a, ad=ad: _loss(jl.merge(PARAMS, a), BATCH))(ad)
        _, new, state, _ = _step(tx, ad, state)
        lr = float(schedule(count))
        np.testing.assert_allclose(
            new["q"]["kernel"].a,
            ad["q"]["kernel"].a - lr * g["q"]["kernel"].a,
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            new["q"]["kernel"].b,
            ad["q"]["kernel"].b - 4 * lr * g["q"]["kernel"].b,
            rtol=1e-5,
            atol=1e-7,
        )
        ad = new


def test_frozen_and_other_labels():
    # LoRA-FA: frozen A gets no state and no movement; DoRA's magnitude learns at lr
    ad, g = _setup(jl.lora_fa)
    tx = jl.lora_plus(optax.adam, learning_rate=1e-3)
    assert sum(x.size for x in jax.tree_util.tree_leaves(tx.init(ad))) == 2 * (2 * 4) + 2
    _, new, _, _ = _step(tx, ad)
    np.testing.assert_array_equal(new["q"]["kernel"].a, ad["q"]["kernel"].a)
    ad, g = _setup(jl.dora)
    _, new, _, _ = _step(jl.lora_plus(optax.sgd, learning_rate=0.1, ratio=8), ad)
    np.testing.assert_allclose(
        new["q"]["kernel"].m, ad["q"]["kernel"].m - 0.1 * g["q"]["kernel"].m, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("ratio", [0, -2.0])
def test_non_positive_ratio_is_an_error(ratio):
    with pytest.raises(ValueError, match=f"ratio must be > 0, got ratio={ratio!r}"):
        jl.lora_plus(optax.adamw, ratio=ratio)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        jl.recipe("lora_plus", ratio=ratio)
