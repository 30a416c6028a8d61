"""PiSSA: adapters hold the top-r SVD part, the residual base keeps the rest exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxlora as jl

PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (2, 6, 8))},  # stacked
    "o": {"kernel": jax.random.normal(jax.random.key(2), (2, 3, 5))},  # (heads, k) -> d
}
TARGETS = [jl.Target("q/kernel"), jl.Target("s/kernel"), jl.Target("o/kernel", in_axes=(0, 1))]


def _top(w, r):  # numpy oracle: the best rank-r approximation
    u, s, vh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture(scope="module")
def pissa():
    method = jl.lora(rank=3, alpha=6.0, targets=TARGETS, init="pissa")
    assert method.name == "pissa"
    return method.prepare(jax.random.key(3), PARAMS)


def test_merge_of_residual_and_adapters_is_the_original(pissa):
    residual, adapters = pissa
    merged = jl.merge(residual, adapters)
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(PARAMS)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_adapter_is_the_top_r_svd_part(pissa):
    residual, adapters = pissa
    q, s = adapters["q"]["kernel"], adapters["s"]["kernel"]
    np.testing.assert_allclose(2.0 * q.a @ q.b, _top(PARAMS["q"]["kernel"], 3), atol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(
            2.0 * s.a[i] @ s.b[i], _top(PARAMS["s"]["kernel"][i], 3), atol=1e-5
        )
    o = adapters["o"]["kernel"]
    np.testing.assert_allclose(
        2.0 * o.a.reshape(6, 3) @ o.b, _top(PARAMS["o"]["kernel"].reshape(6, 5), 3), atol=1e-5
    )
    # the residual keeps exactly the remaining singular values
    sv = np.linalg.svd(np.asarray(PARAMS["q"]["kernel"]), compute_uv=False)
    got = np.linalg.svd(np.asarray(residual["q"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(got[:3], sv[3:], atol=1e-5)
    # A and B share the singular values evenly: AᵀA = BBᵀ = S_r / s
    np.testing.assert_allclose(q.a.T @ q.a, q.b @ q.b.T, atol=1e-5)


def test_bad_inputs():
    # the one entry point: a plain LoRA's prepare keeps the base, PiSSA's init alone is no base
    base, _ = jl.lora(rank=2, targets=TARGETS).prepare(jax.random.key(0), PARAMS)
    assert base is PARAMS
    with pytest.raises(ValueError, match="alpha > 0, got alpha=0"):
        jl.lora(rank=2, alpha=0, init="pissa")
    with pytest.raises(ValueError, match="init must be 'kaiming' or 'pissa', got 'svd'"):
        jl.lora(init="svd")
