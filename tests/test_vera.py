"""VeRA: shared frozen matrices sliced per layer, hand-computed ΔW, key-only checkpoints."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora as jl
from jaxlora.methods.vera import restore_shared, strip_shared

PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (3, 8, 24))},  # stacked
    "o": {"kernel": jax.random.normal(jax.random.key(2), (2, 4, 12))},  # (heads, k) -> d
}
TARGETS = [jl.Target("q/kernel"), jl.Target("s/kernel"), jl.Target("o/kernel", in_axes=(0, 1))]


def _vera(rank=6, seed=3):
    return jl.vera(rank=rank, targets=TARGETS).init(jax.random.key(seed), PARAMS)


def _randomized(adapters):
    ks = iter(jax.random.split(jax.random.key(4), 8))
    out = dict(adapters)
    for path in ("q", "s", "o"):
        node = adapters[path]["kernel"]
        d = node.d + jax.random.normal(next(ks), node.d.shape)
        b = jax.random.normal(next(ks), node.b.shape)
        out[path] = {"kernel": type(node)(layout=node.layout, rank=node.rank, d=d, b=b)}
    return out


def test_shapes_defaults_and_one_shared_pair():
    ad = _vera()
    shared = ad["__shared__"]["vera"]
    assert shared.a.shape == (16, 6) and shared.b.shape == (6, 24)  # max d_in, max d_out
    assert ad["s"]["kernel"].d.shape == (3, 6) and ad["s"]["kernel"].b.shape == (3, 24)
    assert ad["o"]["kernel"].b.shape == (12,)
    np.testing.assert_array_equal(ad["q"]["kernel"].d, np.full(6, 0.1, np.float32))
    assert not ad["q"]["kernel"].b.any()
    labels = jax.tree_util.tree_leaves(jl.labels(ad))
    assert labels.count("frozen") == 3 and set(labels) == {"frozen", "vera_vector"}
    assert jl.num_trainable(ad) == (6 + 8) + 3 * (6 + 24) + (6 + 12)  # r + d_out per layer


def test_kaiming_uniform_bounds():
    shared = jl.vera(rank=64, targets="q/kernel").init(jax.random.key(0), PARAMS)
    shared = shared["__shared__"]["vera"]
    for x, fan_in in ((shared.a, 16), (shared.b, 64)):
        bound = math.sqrt(6 / fan_in)  # PEFT's VeRA init: kaiming-uniform, gain sqrt(2)
        assert float(jnp.abs(x).max()) <= bound
        np.testing.assert_allclose(float(x.std()), bound / math.sqrt(3), rtol=0.1)


def test_merge_equals_hand_computed_delta():
    ad = _randomized(_vera())
    a_s = np.asarray(ad["__shared__"]["vera"].a)
    b_s = np.asarray(ad["__shared__"]["vera"].b)
    merged = jl.merge(PARAMS, ad)

    def delta(d, b, d_in, d_out):  # A_s[:d_in] diag(d) B_s[:, :d_out] diag(b)
        return a_s[:d_in] @ np.diag(d) @ b_s[:, :d_out] @ np.diag(b)

    q = ad["q"]["kernel"]
    np.testing.assert_allclose(
        merged["q"]["kernel"], PARAMS["q"]["kernel"] + delta(q.d, q.b, 16, 8), rtol=1e-5, atol=1e-5
    )
    s = ad["s"]["kernel"]
    for layer in range(3):
        np.testing.assert_allclose(
            merged["s"]["kernel"][layer],
            PARAMS["s"]["kernel"][layer] + delta(s.d[layer], s.b[layer], 8, 24),
            rtol=1e-5,
            atol=1e-5,
        )
    o = ad["o"]["kernel"]
    expect = PARAMS["o"]["kernel"] + delta(o.d, o.b, 8, 12).reshape(2, 4, 12)
    np.testing.assert_allclose(merged["o"]["kernel"], expect, rtol=1e-5, atol=1e-5)


def test_adapt_is_unmerged_and_matches_merge_for_stacked_kernels():
    ad = _randomized(_vera())

    def fn(p, x):
        h = x @ p["q"]["kernel"]
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w)[:, :8], None), h, p["s"]["kernel"])
        return jnp.einsum("bhk,hkd->bd", h.reshape(-1, 2, 4), p["o"]["kernel"])

    x = jax.random.normal(jax.random.key(5), (3, 16))
    assert jl.adapt_report(fn, PARAMS, ad, x).all_fast
    np.testing.assert_allclose(
        jax.jit(jl.adapt(fn))(PARAMS, ad, x), fn(jl.merge(PARAMS, ad), x), rtol=1e-5, atol=1e-5
    )


def test_strip_and_restore_are_bit_identical_eager_and_jitted():
    ad = _vera(seed=11)
    small = strip_shared(ad)
    assert [x.shape for x in jax.tree_util.tree_leaves(small["__shared__"])] == [(2,)]
    for back in (restore_shared(small), jax.jit(restore_shared)(small)):
        for x, y in zip(
            jax.tree_util.tree_leaves(ad), jax.tree_util.tree_leaves(back), strict=True
        ):
            np.testing.assert_array_equal(x, y)
    # a legacy raw uint32 key regenerates the same way
    legacy = jl.vera(rank=6, targets=TARGETS).init(jax.random.PRNGKey(11), PARAMS)
    np.testing.assert_array_equal(legacy["__shared__"]["vera"].a, ad["__shared__"]["vera"].a)


def test_stripped_adapters_refuse_to_run():
    small = strip_shared(_vera())
    with pytest.raises(ValueError, match="restore_shared"):
        jl.merge(PARAMS, small)


def test_rank_above_the_shared_matrices_is_an_error():
    big = _vera(rank=8)
    small_shared = _vera(rank=4)["__shared__"]
    mixed = {**big, "__shared__": small_shared}
    with pytest.raises(
        ValueError,
        match=r"VeRA adapter at '\w/kernel' has rank 8, but the shared matrices have rank 4",
    ):
        jl.merge(PARAMS, mixed)
    with pytest.raises(ValueError, match="rank 8"):
        jl.adapt(lambda p: p["q"]["kernel"].sum())(PARAMS, mixed)


def test_missing_shared_state_and_bad_rank():
    ad = _vera()
    del ad["__shared__"]
    with pytest.raises(ValueError, match="shared matrices"):
        jl.merge(PARAMS, ad)
    with pytest.raises(jl.TargetError, match="rank must be a positive integer, got 0"):
        jl.vera(rank=0)


def test_init_does_not_alias_the_callers_key():
    params = {"w": {"kernel": jnp.ones((8, 8))}}
    key = jax.random.key(3)
    ad = jl.vera(rank=4, targets="w/kernel").init(key, params)
    tx = jl.optimizer(optax.sgd(0.1))
    step = jl.train_step(lambda p, b: jnp.sum(b @ p["w"]["kernel"]), tx)  # donates adapters
    step(params, ad, tx.init(ad), jnp.ones((2, 8)))
    jax.random.normal(key, (2,))  # the caller's key is still alive
