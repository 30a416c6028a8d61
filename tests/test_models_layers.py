"""The shared model layers against independent references: jax.nn's attention and GELU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import _layers


def _reference_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _qkv(kv_heads, heads=4, b=2, t=5, d=8):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, heads, d))
    k = jax.random.normal(keys[1], (b, t, kv_heads, d))
    v = jax.random.normal(keys[2], (b, t, kv_heads, d))
    return q, k, v


MASKS = {
    "none": lambda b, t: None,
    "causal": lambda b, t: _layers.attention_mask_4d(None, t, causal=True),
    "padding": lambda b, t: _layers.attention_mask_4d(
        jnp.array([[1] * t, [1] * (t - 2) + [0] * 2]), t, causal=False
    ),
    "causal+padding": lambda b, t: _layers.attention_mask_4d(
        jnp.array([[1] * t, [1] * (t - 2) + [0] * 2]), t, causal=True
    ),
    # a row that sees no key at all: both give it a uniform softmax and no logit gradient
    "empty row": lambda b, t: jnp.zeros((b, 1, t, t), bool).at[0, 0, 1:].set(True),
}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_attention_matches_jax_nn_in_value_and_gradient(kv_heads, mask_name):
    q, k, v = _qkv(kv_heads)
    mask = MASKS[mask_name](q.shape[0], q.shape[1])
    w = jax.random.normal(jax.random.key(1), q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v, mask)) * w)

    out = jax.jit(_layers.attention)(q, k, v, mask)
    np.testing.assert_allclose(out, _reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(loss(_layers.attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_attention_keeps_only_the_probabilities_for_the_backward():
    from jax.ad_checkpoint import print_saved_residuals  # noqa: F401  (API check)

    q, k, v = _qkv(4, t=16)
    mask = MASKS["padding"](2, 16)
    # a (b, heads, t, t) float array per saved logits/probabilities tensor
    big = 2 * 4 * 16 * 16

    def saved(f):
        _, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
        leaves = jax.tree_util.tree_leaves(vjp)
        return [x for x in leaves if getattr(x, "size", 0) == big and x.dtype == jnp.float32]

    assert len(saved(_layers.attention)) == 1
    assert len(saved(_reference_attention)) > 1


def test_attention_rejects_heads_not_divisible_by_kv_heads():
    q = jnp.ones((1, 2, 3, 4))
    kv = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        _layers.attention(q, kv, kv, None)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_matches_exact_gelu_in_value_and_gradient(dtype):
    x = (jnp.linspace(-6.0, 6.0, 101) + 0.013).astype(dtype)
    ref = jax.nn.gelu(x, approximate=False)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(_layers.gelu(x), ref, atol=tol, rtol=tol)
    g = jax.jit(jax.grad(lambda x: jnp.sum(_layers.gelu(x) * x)))(x)
    r = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False) * x))(x)
    assert g.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * 10, rtol=tol
    )


def test_gelu_keeps_only_its_input_for_the_backward():
    x = jnp.linspace(-3.0, 3.0, 64)
    _, vjp = jax.vjp(_layers.gelu, x)
    saved = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if getattr(leaf, "size", 0) == 64]
    assert len(saved) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_in_value_and_gradient(dtype):
    import flax.linen as nn

    keys = jax.random.split(jax.random.key(3), 4)
    x = (3.0 + 2.0 * jax.random.normal(keys[0], (2, 5, 16))).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (16,))
    bias = 0.1 * jax.random.normal(keys[2], (16,))
    w = jax.random.normal(keys[3], x.shape)
    ref_ln = nn.LayerNorm(epsilon=1e-12, dtype=dtype, use_fast_variance=False)

    def ref(x, scale, bias):
        return ref_ln.apply({"params": {"scale": scale, "bias": bias}}, x)

    def loss(f):
        return lambda x, s, b: jnp.sum(jnp.tanh(f(x, s, b).astype(jnp.float32)) * w)

    ours = lambda x, s, b: _layers.layer_norm(x, s, b, 1e-12)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(jax.jit(ours)(x, scale, bias), np.float32),
        np.asarray(ref(x, scale, bias), np.float32),
        atol=tol,
        rtol=tol,
    )
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, scale, bias)
    refs = jax.grad(loss(ref), argnums=(0, 1, 2))(x, scale, bias)
    for g, r in zip(grads, refs):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * 10, rtol=tol * 10
        )


def test_layer_norm_keeps_only_its_input_and_statistics_for_the_backward():
    x = jax.random.normal(jax.random.key(0), (8, 32))
    _, vjp = jax.vjp(lambda x: _layers.layer_norm(x, jnp.ones(32), jnp.zeros(32), 1e-6), x)
    saved = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if getattr(leaf, "size", 0) == 256]
    assert len(saved) == 1
