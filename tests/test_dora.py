"""DoRA: magnitude init, the merged kernel by hand, and forward/gradient parity with PEFT."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora as jl

PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))},
    "s": {"kernel": jax.random.normal(jax.random.key(1), (3, 6, 4))},  # stacked
    "o": {"kernel": jax.random.normal(jax.random.key(2), (2, 3, 4))},  # (heads, k) -> d
}
TARGETS = [
    jl.Target("q/kernel"),
    jl.Target("s/kernel", stack_axes=(0,)),
    jl.Target("o/kernel", in_axes=(0, 1)),
]


def _dora(randomize=True):
    ad = jl.dora(rank=2, alpha=3.0, targets=TARGETS).init(jax.random.key(3), PARAMS)
    if not randomize:
        return ad
    ks = iter(jax.random.split(jax.random.key(4), 9))
    for k in ("q", "s", "o"):
        n = ad[k]["kernel"]
        ad[k]["kernel"] = dataclasses.replace(
            n,
            a=n.a + 0.3 * jax.random.normal(next(ks), n.a.shape),
            b=0.3 * jax.random.normal(next(ks), n.b.shape),
            m=n.m * (1 + 0.2 * jax.random.normal(next(ks), n.m.shape)),
        )
    return ad


def test_magnitude_starts_at_column_norms_and_output_at_the_base():
    ad = _dora(randomize=False)
    np.testing.assert_allclose(
        ad["q"]["kernel"].m, np.linalg.norm(PARAMS["q"]["kernel"], axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        ad["s"]["kernel"].m, np.linalg.norm(PARAMS["s"]["kernel"], axis=1), rtol=1e-6
    )
    o = np.asarray(PARAMS["o"]["kernel"]).reshape(6, 4)
    np.testing.assert_allclose(ad["o"]["kernel"].m, np.linalg.norm(o, axis=0), rtol=1e-6)
    for x, y in zip(
        jax.tree_util.tree_leaves(jl.merge(PARAMS, ad)), jax.tree_util.tree_leaves(PARAMS)
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_leaves(jl.labels(ad))[:3] == ["lora_a", "lora_b", "dora_magnitude"]


def test_merge_equals_hand_computed_kernel():
    ad = _dora()
    merged = jl.merge(PARAMS, ad)

    def expect(w, n):  # m · V / ||V|| per output column, V = W + s·A@B (direct norm)
        v = np.asarray(w, np.float64) + 1.5 * np.asarray(n.a, np.float64) @ np.asarray(n.b)
        return np.asarray(n.m) * v / np.linalg.norm(v, axis=0)

    q = ad["q"]["kernel"]
    np.testing.assert_allclose(merged["q"]["kernel"], expect(PARAMS["q"]["kernel"], q), rtol=1e-5)
    s = ad["s"]["kernel"]
    for i in range(3):
        layer = dataclasses.replace(s, a=s.a[i], b=s.b[i], m=s.m[i])
        np.testing.assert_allclose(
            merged["s"]["kernel"][i], expect(PARAMS["s"]["kernel"][i], layer), rtol=1e-5
        )
    o = ad["o"]["kernel"]
    flat = dataclasses.replace(o, a=o.a.reshape(6, 2))
    np.testing.assert_allclose(
        merged["o"]["kernel"].reshape(6, 4),
        expect(PARAMS["o"]["kernel"].reshape(6, 4), flat),
        rtol=1e-5,
    )


def test_unmerge_is_refused():
    with pytest.raises(ValueError, match="cannot be unmerged"):
        jl.unmerge(PARAMS, _dora())


def test_forward_and_gradients_match_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    ad = _dora()
    node = ad["q"]["kernel"]
    w = np.asarray(PARAMS["q"]["kernel"])
    x = np.asarray(jax.random.normal(jax.random.key(5), (5, 6)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4, bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], use_dora=True)
    net = peft.get_peft_model(Net(), config)
    lin = net.base_model.model.lin
    with torch.no_grad():  # torch layout: weight (out, in), lora_A (r, in), lora_B (out, r)
        lin.base_layer.weight.copy_(torch.tensor(w.T))
        lin.lora_A["default"].weight.copy_(torch.tensor(np.asarray(node.a).T))
        lin.lora_B["default"].weight.copy_(torch.tensor(np.asarray(node.b).T))
        lin.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(node.m)))
    y = net(torch.tensor(x))
    (y**2).sum().backward()

    only_q = {"q": ad["q"]}
    f = lambda a: jnp.sum(jl.adapt(lambda p, x: x @ p["q"]["kernel"])(PARAMS, a, x) ** 2)
    np.testing.assert_allclose(
        jl.adapt(lambda p, x: x @ p["q"]["kernel"])(PARAMS, only_q, x),
        y.detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    g = jax.grad(f)(only_q)["q"]["kernel"]
    np.testing.assert_allclose(
        g.a, lin.lora_A["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        g.b, lin.lora_B["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        g.m, lin.lora_magnitude_vector["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5
    )


def test_init_needs_values_but_traces():
    # m comes from W's values; under eval_shape the init still traces (shapes only out)
    shapes = jax.eval_shape(
        lambda p: jl.dora(rank=2, targets=TARGETS).init(jax.random.key(0), p), PARAMS
    )
    assert shapes["s"]["kernel"].m.shape == (3, 4)
