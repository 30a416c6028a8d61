"""LoRA init, scaling, merge/unmerge, and shape-only initialisation."""

from __future__ import annotations

import dataclasses
import json
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
# the stacked kernel's leading axis is said: a 3-D shape alone is ambiguous
TARGETS = [r"a/kernel", jl.Target(r"s/kernel", stack_axes=(0,))]


def test_init_shapes_and_reference_distribution():
    ad = jl.lora(rank=4, alpha=8, targets=TARGETS).init(jax.random.key(0), PARAMS)
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
    ad = jl.lora(rank=4, targets=TARGETS).init(jax.random.key(0), PARAMS)
    s = ad["s"]["kernel"].a
    assert not jnp.allclose(s[0], s[1])


def test_merge_equals_hand_computed_delta_and_unmerge_inverts():
    ad = randomize(
        jl.lora(rank=4, alpha=8, targets=TARGETS).init(jax.random.key(0), PARAMS),
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
    method = jl.lora(rank=4, targets=TARGETS)
    shapes = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    assert shapes["s"]["kernel"].a.shape == (3, 16, 4)
    shape_params = jax.eval_shape(lambda: PARAMS)
    ad = jax.jit(method.init)(jax.random.key(0), shape_params)
    ref = method.init(jax.random.key(0), PARAMS)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ad, ref)


def test_adapter_count_matches_formula():
    ad = jl.lora(rank=4, targets=TARGETS).init(jax.random.key(0), PARAMS)
    # r * (d_in + d_out) per (stacked) kernel: A is d_in x r, B is r x d_out
    assert jl.num_trainable(ad) == 4 * (64 + 32) + 3 * 4 * (16 + 8)


def test_bf16_base_keeps_float32_adapters_and_merges_to_bf16():
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    ad = jl.lora(rank=4, targets=TARGETS).init(jax.random.key(0), p16)
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


# ----------------------------------------------------------------------------- lora_dropout

KEY = jax.random.key(7)


def _identity(adapters):
    """A = B = I (rank = d_in = d_out): with scale 1 on W = 0, the layer returns dropout(x)."""

    def eye(node):
        return dataclasses.replace(
            node,
            a=jnp.broadcast_to(jnp.eye(node.rank), node.a.shape),
            b=jnp.broadcast_to(jnp.eye(node.rank), node.b.shape),
        )

    return jax.tree_util.tree_map(eye, adapters, is_leaf=lambda n: isinstance(n, jl.Adapter))


def _identity_adapters(params, rate, targets=".*"):
    return _identity(jl.lora(rank=16, alpha=16.0, targets=targets, dropout=rate).init(KEY, params))


def test_dropout_zero_and_evaluation_are_bit_exact_no_ops():
    params = {"w": {"kernel": jax.random.normal(KEY, (16, 12))}}
    x = jax.random.normal(jax.random.key(1), (9, 16))
    fn = lambda p, x: jnp.tanh(x @ p["w"]["kernel"])
    plain = randomize(jl.lora(rank=4, targets=".*").init(KEY, params), jax.random.key(2))
    zero = jl.lora(rank=4, targets=".*", dropout=0.0).init(KEY, params)
    assert jax.tree_util.tree_structure(zero) == jax.tree_util.tree_structure(plain)
    rated = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, dropout=0.3),
        plain,
        is_leaf=lambda n: isinstance(n, jl.Adapter),
    )
    f = jax.jit(jl.adapt(fn))
    want = np.asarray(f(params, plain, x))
    rng = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(f(params, plain, x, dropout_rng=rng)), want)
    np.testing.assert_array_equal(np.asarray(f(params, rated, x)), want)  # no key: eval
    assert not np.array_equal(np.asarray(f(params, rated, x, dropout_rng=rng)), want)
    # merge never drops
    np.testing.assert_array_equal(
        np.asarray(jl.merge(params, rated)["w"]["kernel"]),
        np.asarray(jl.merge(params, plain)["w"]["kernel"]),
    )
    # the PEFT alias, and bad rates
    alias = jl.lora(rank=4, targets=".*", lora_dropout=0.3).init(KEY, params)
    assert alias["w"]["kernel"].dropout == 0.3
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        jl.lora(rank=4, targets=".*", dropout=1.0)
    with pytest.raises(ValueError, match="not both"):
        jl.lora_fa(rank=4, targets=".*", dropout=0.1, lora_dropout=0.2)


def test_dropout_mask_statistics_and_scaling():
    params = {"w": jnp.zeros((16, 16))}
    x = jnp.ones((512, 16))
    rate = 0.25
    ad = _identity_adapters(params, rate)
    f = jax.jit(jl.adapt(lambda p, x: x @ p["w"]))
    y = np.asarray(f(params, ad, x, dropout_rng=KEY))
    dropped = y == 0
    # 8192 Bernoulli(0.25) draws: 4 standard deviations are 0.019
    assert abs(dropped.mean() - rate) < 0.02
    np.testing.assert_allclose(y[~dropped], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(f(params, ad, x, dropout_rng=KEY)), y)
    assert not np.array_equal(np.asarray(f(params, ad, x, dropout_rng=jax.random.key(8))), y)


def test_dropout_masks_differ_per_use_and_per_scan_step():
    params = {"a": jnp.zeros((16, 16)), "s": jnp.zeros((3, 16, 16))}
    ad = _identity_adapters(params, 0.5, targets=["a", jl.Target("s", stack_axes=(0,))])

    def fn(p, x):
        first, second = x @ p["a"], x @ p["a"]  # two uses of one kernel
        _, per_step = jax.lax.scan(lambda c, w: (c, c @ w), x, p["s"])
        return first, second, per_step

    x = jnp.ones((8, 16))
    first, second, steps = jax.jit(jl.adapt(fn))(params, ad, x, dropout_rng=KEY)
    masks = [np.asarray(m) != 0 for m in (first, second, *steps)]
    for i in range(len(masks)):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), (i, j)


def test_dropout_matches_the_merged_oracle_with_the_same_mask():
    ks = jax.random.split(KEY, 3)
    params = {"w": jax.random.normal(ks[0], (16, 16))}
    x = jax.random.normal(ks[1], (6, 16))
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    rate, rng = 0.3, jax.random.key(11)
    # the mask, read off an identity adapter on a zero kernel (same shapes, same site)
    zero = {"w": jnp.zeros((16, 16))}
    probe = jl.adapt(lambda p, x: x @ p["w"])(
        zero, _identity_adapters(zero, rate), jnp.ones_like(x), dropout_rng=rng
    )
    keep = probe != 0
    method = jl.lora(rank=16, alpha=8.0, targets=".*", dropout=rate)
    ad = randomize(method.init(ks[2], params), ks[2])

    def oracle(p, a, x):  # x·W + dropout(x)·ΔW, with ΔW from merge
        delta = jl.merge(zero, a)["w"]
        return jnp.tanh(x @ p["w"] + jnp.where(keep, x / (1 - rate), 0) @ delta)

    got = jl.adapt(fn)(params, ad, x, dropout_rng=rng)
    np.testing.assert_allclose(got, oracle(params, ad, x), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda a: jl.adapt(fn)(params, a, x, dropout_rng=rng).sum())(ad)
    ge = jax.grad(lambda a: oracle(params, a, x).sum())(ad)
    for u, v in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ge), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_lora_dropout_travels_through_the_peft_format(tmp_path):
    params = {"q": {"kernel": jax.random.normal(KEY, (8, 6))}}
    ad = jl.lora(rank=2, targets=".*", lora_dropout=0.05).init(KEY, params)
    out = jl.export_peft(tmp_path / "peft", ad, {"q/kernel": "q"})
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert jl.import_peft(out, params, {"q/kernel": "q"})["q"]["kernel"].dropout == 0.05


@pytest.mark.parametrize("make", [jl.lora, jl.lora_fa, jl.dora])
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "16"])
def test_non_finite_alpha_is_refused_naming_it(make, alpha):
    # a NaN/inf scale would make the merged kernel NaN from the first step
    with pytest.raises(ValueError, match=r"alpha must be a finite number, got alpha="):
        make(rank=2, alpha=alpha, targets=".*kernel")
