"""LoRA init, scaling, merge/unmerge, and shape-only initialisation."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jl_testing import randomize

import jaxlora as jl

PARAMS = {
    "a": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (3, 16, 8))},
}


def test_init_shapes_and_reference_distribution():
    ad = jl.lora(rank=4, alpha=8, targets=".*kernel").init(jax.random.key(0), PARAMS)
    a, b = ad["a"]["kernel"].a, ad["a"]["kernel"].b
    assert a.shape == (64, 4) and b.shape == (4, 32)
    assert not b.any()
    # kaiming-uniform(a=sqrt(5)) over fan-in 64 is U(-1/8, 1/8): check bound and spread
    assert float(jnp.abs(a).max()) <= 1 / 8
    np.testing.assert_allclose(float(a.std()), (1 / 8) / math.sqrt(3), rtol=0.15)
    st = ad["s"]["kernel"]
    assert st.a.shape == (3, 16, 4) and st.b.shape == (3, 4, 8)
    assert ad["a"]["kernel"].scale == 2.0


def test_rslora_scale():
    ad = jl.lora(rank=4, alpha=8, rslora=True, targets="a/kernel").init(jax.random.key(0), PARAMS)
    assert ad["a"]["kernel"].scale == 4.0


def test_layers_get_independent_keys():
    ad = jl.lora(rank=4, targets=".*kernel").init(jax.random.key(0), PARAMS)
    s = ad["s"]["kernel"].a
    assert not jnp.allclose(s[0], s[1])


def test_merge_equals_hand_computed_delta_and_unmerge_inverts():
    ad = randomize(
        jl.lora(rank=4, alpha=8, targets=".*kernel").init(jax.random.key(0), PARAMS),
        jax.random.key(3),
    )
    merged = jl.merge(PARAMS, ad)
    node = ad["a"]["kernel"]
    np.testing.assert_allclose(
        merged["a"]["kernel"], PARAMS["a"]["kernel"] + 2.0 * node.a @ node.b, atol=1e-5
    )
    sn = ad["s"]["kernel"]
    for layer in range(3):
        np.testing.assert_allclose(
            merged["s"]["kernel"][layer],
            PARAMS["s"]["kernel"][layer] + 2.0 * sn.a[layer] @ sn.b[layer],
            atol=1e-5,
        )
    chex.assert_trees_all_close(jl.unmerge(merged, ad), PARAMS, atol=1e-5)


def test_init_is_shape_only_and_jittable():
    method = jl.lora(rank=4, targets=".*kernel")
    shapes = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    assert shapes["s"]["kernel"].a.shape == (3, 16, 4)
    shape_params = jax.eval_shape(lambda: PARAMS)
    ad = jax.jit(method.init)(jax.random.key(0), shape_params)
    ref = method.init(jax.random.key(0), PARAMS)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ad, ref)


def test_adapter_count_matches_formula():
    ad = jl.lora(rank=4, targets=".*kernel").init(jax.random.key(0), PARAMS)
    # r * (d_in + d_out) per (stacked) kernel: A is d_in x r, B is r x d_out
    assert jl.num_trainable(ad) == 4 * (64 + 32) + 3 * 4 * (16 + 8)


def test_bf16_base_keeps_float32_adapters_and_merges_to_bf16():
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    ad = jl.lora(rank=4, targets=".*kernel").init(jax.random.key(0), p16)
    assert ad["a"]["kernel"].a.dtype == jnp.float32
    assert jl.merge(p16, ad)["a"]["kernel"].dtype == jnp.bfloat16


def test_full_and_compose_train_a_head_beside_lora():
    params = {
        "body": {"kernel": PARAMS["a"]["kernel"]},
        "head": {"kernel": jnp.ones((32, 3)), "bias": jnp.zeros((3,))},
    }
    method = jl.compose(jl.lora(rank=2, targets="body/kernel"), jl.full(targets="head/.*"))
    ad = method.init(jax.random.key(0), params)
    assert jl.num_trainable(ad) == 2 * (64 + 32) + 32 * 3 + 3
    ad = randomize(ad, jax.random.key(1))

    def fn(p, x):
        return jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"] + p["head"]["bias"]

    from jl_testing import check_against_merged

    report = check_against_merged(fn, params, ad, jnp.ones((5, 64)))
    assert report.all_fast
    merged = jl.merge(params, ad)
    np.testing.assert_array_equal(merged["head"]["bias"], ad["__full__"]["head"]["bias"])
    with pytest.raises(ValueError, match=r"'head/bias' is fully trained"):
        jl.unmerge(merged, ad)
    with pytest.raises(ValueError, match=r"both target \['body/kernel'\]"):
        jl.compose(jl.lora(rank=2, targets="body/kernel"), jl.full(targets="body/.*")).init(
            jax.random.key(0), params
        )
    bad = dict(params, head={"kernel": jnp.ones((32, 4)), "bias": jnp.zeros((3,))})
    with pytest.raises(ValueError, match=r"'head/kernel' is float32\[32, 3\]"):
        jl.adapt(fn)(bad, ad, jnp.ones((5, 64)))


@pytest.mark.parametrize("make", [jl.lora, jl.lora_fa, jl.dora])
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "16"])
def test_non_finite_alpha_is_refused_naming_it(make, alpha):
    # a NaN/inf scale would make the merged kernel NaN from the first step
    with pytest.raises(ValueError, match=r"alpha must be a finite number, got alpha="):
        make(rank=2, alpha=alpha, targets=".*kernel")
