"""Delta-LoRA: N steps against N hand-computed steps and the telescoped sum; bad wiring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora as jl
from jaxlora.methods.delta_lora import DeltaLoraState

PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(0), (6, 4)) * 0.5},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (2, 4, 3)) * 0.5},
    "bias": jnp.ones((4,)),
}
BATCH = {
    "x": jax.random.normal(jax.random.key(2), (5, 6)),
    "y": jax.random.normal(jax.random.key(3), (2, 5, 3)),
}
TARGETS = ".*kernel"
LR, LAM, K, STEPS = 0.2, 0.5, 2, 5


def _loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["q"]["kernel"] + p["bias"])
    h = jax.vmap(lambda w: h @ w)(p["s"]["kernel"])
    return jnp.mean((h - batch["y"]) ** 2)


def _adapters():
    ad = jl.lora(rank=2, alpha=3.0, targets=TARGETS).init(jax.random.key(4), PARAMS)
    ad["q"]["kernel"] = dataclasses.replace(ad["q"]["kernel"], b=jnp.full((2, 4), 0.2))
    return ad


def _run(scale_delta=False):
    tx = jl.delta_lora(jl.optimizer(optax.sgd(LR)), lam=LAM, start_step=K, scale_delta=scale_delta)
    step = jl.train_step(_loss, tx, donate=False)  # the one step every method uses
    params, ad = PARAMS, _adapters()
    state = tx.init(ad)
    history = [(params, ad)]
    for _ in range(STEPS):
        params, ad, state, _ = step(params, ad, state, BATCH)
        history.append((params, ad))
    return history, state


def _product(node):  # A@B laid out like the kernel (no scale)
    return np.einsum("...ir,...ro->...io", np.asarray(node.a), np.asarray(node.b))


def test_steps_equal_hand_computed_steps():
    history, _ = _run()
    params, ad = PARAMS, _adapters()
    for t in range(STEPS):
        # oracle gradient: the merged loss, differentiated with respect to A and B only
        grads = jax.grad(lambda a, p=params: _loss(jl.merge(p, a), BATCH))(ad)
        new_ad = jax.tree_util.tree_map(lambda x, g: x - LR * g, ad, grads)
        new_params = jax.tree_util.tree_map(lambda x: x, params)
        if t >= K:
            for k in ("q", "s"):
                old_n, new_n = ad[k]["kernel"], new_ad[k]["kernel"]
                change = _product(new_n) - _product(old_n)
                new_params[k] = {"kernel": params[k]["kernel"] + LAM * change}
        params, ad = new_params, new_ad
        got_params, got_ad = history[t + 1]
        for x, y in zip(jax.tree_util.tree_leaves(got_ad), jax.tree_util.tree_leaves(ad)):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
        for x, y in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_delta", [False, True])
def test_base_equals_telescoped_sum(scale_delta):
    history, _ = _run(scale_delta)
    _, ad_k = history[K]
    s = 3.0 / 2 if scale_delta else 1.0
    for t in range(STEPS + 1):
        params, ad = history[t]
        for k in ("q", "s"):
            w0 = np.asarray(PARAMS[k]["kernel"])
            if t <= K:
                np.testing.assert_array_equal(params[k]["kernel"], w0)  # not started yet
                continue
            expect = w0 + LAM * s * (_product(ad[k]["kernel"]) - _product(ad_k[k]["kernel"]))
            np.testing.assert_allclose(params[k]["kernel"], expect, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(params["bias"], PARAMS["bias"])  # untargeted: never moves


def test_no_optimizer_state_for_the_base():
    _, state = _run()
    assert isinstance(state, DeltaLoraState) and int(state.count) == STEPS
    adam = jl.optimizer(optax.adam(1e-3))
    ad = _adapters()
    ours = jl.delta_lora(adam, lam=LAM, start_step=0).init(ad)
    inner = adam.init(ad)
    assert jax.tree_util.tree_structure(ours.inner_state) == jax.tree_util.tree_structure(inner)
    n = sum(x.size for x in jax.tree_util.tree_leaves(ours))
    assert n == sum(x.size for x in jax.tree_util.tree_leaves(inner)) + 1  # + count


def test_bad_wiring_is_a_clear_error():
    tx = jl.delta_lora(jl.optimizer(optax.sgd(LR)), lam=LAM, start_step=0)
    ad = _adapters()
    # the optimizer is over the adapters alone (the old pair convention is refused)
    with pytest.raises(TypeError, match="adapters must be the dict returned by a method"):
        tx.init((PARAMS, ad))
    state = tx.init(ad)
    with pytest.raises(ValueError, match=r"params lack the targeted kernels \['q/kernel'\]"):
        tx.move_base({"s": PARAMS["s"]}, ad, ad, state)


def test_bad_hyper_parameters_and_dora():
    with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
        jl.delta_lora(optax.sgd(0.1), lam=0.5, start_step=-1)
    ad = jl.dora(rank=2, targets=TARGETS).init(jax.random.key(0), PARAMS)
    tx = jl.delta_lora(jl.optimizer(optax.sgd(LR)), lam=LAM, start_step=0)
    with pytest.raises(ValueError, match="rescales columns"):
        tx.move_base(PARAMS, ad, ad, tx.init(ad))
