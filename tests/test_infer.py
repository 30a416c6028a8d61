"""Kernel axes inferred from use (jl.infer_targets, init(..., like=...)) == hand-written Targets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _model_fixtures import tunix_llama3
from flax import nnx
from jl_testing import check_against_merged, randomize

import jaxlora as jl
from jaxlora.targets import select

KEY = jax.random.key(0)


def _same_layouts(fn, params, args, pattern, hand):
    """infer_targets and init(like=...) give exactly the hand-written layouts."""
    inferred = jl.infer_targets(fn, params, *args, pattern=pattern)
    assert select(params, inferred) == select(params, hand)
    method = jl.lora(rank=2, alpha=4.0, targets=pattern)
    got = method.init(jax.random.key(1), params, like=(fn, *args))
    want = jl.lora(rank=2, alpha=4.0, targets=hand).init(jax.random.key(1), params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(lambda a, b: bool((a == b).all()) or pytest.fail("differs"), got, want)
    return randomize(got, jax.random.key(2))


# ----------------------------------------------------------------------------- linen


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, h, _):  # h: (b, t, d)
        q, k, v = (nn.DenseGeneral((2, 4), name=n)(h) for n in "qkv")  # kernels (d, 2, 4)
        att = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
        y = jnp.einsum("bhts,bshk->bthk", att, v)
        return h + nn.DenseGeneral(8, axis=(-2, -1), name="o")(y), None  # kernel (2, 4, d)


def test_linen_scan_remat_dense_general():
    stack = nn.scan(
        nn.remat(_Attn), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return stack(name="layers")(x, None)[0]

    model = Net()
    x = jax.random.normal(KEY, (2, 5, 8))
    params = model.init(KEY, x)["params"]
    assert params["layers"]["q"]["kernel"].shape == (3, 8, 2, 4)
    hand = [
        jl.Target(r"layers/[qkv]/kernel", stack_axes=(0,), in_axes=(1,), out_axes=(2, 3)),
        jl.Target(r"layers/o/kernel", stack_axes=(0,), in_axes=(1, 2), out_axes=(3,)),
    ]

    def fn(p, x):
        return model.apply({"params": p}, x)

    ad = _same_layouts(fn, params, (x,), r"layers/.*/kernel", hand)
    assert check_against_merged(fn, params, ad, x).all_fast


# ----------------------------------------------------------------------------- NNX


class _Layer(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 6, rngs=rngs)
        self.back = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.back(jnp.tanh(self.fc(x)))


class _ScanNet(nnx.Module):
    def __init__(self, rngs):
        make = nnx.split_rngs(splits=3)(nnx.vmap(_Layer, in_axes=(0,), out_axes=0))
        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


def test_nnx_scan_stacked_layers():
    graphdef, state = nnx.split(_ScanNet(nnx.Rngs(0)))
    assert state["layers"]["fc"]["kernel"].shape == (3, 8, 6)

    def fn(st, x):
        return nnx.merge(graphdef, st)(x)

    x = jax.random.normal(KEY, (4, 8))
    hand = jl.Target(r"layers/.*/kernel", stack_axes=(0,), in_axes=(1,), out_axes=(2,))
    ad = _same_layouts(fn, state, (x,), r"layers/.*/kernel", hand)
    assert check_against_merged(fn, state, ad, x).all_fast


# ----------------------------------------------------------------------------- raw JAX


def test_einsum_raw_parameters_and_vmap_over_stacked_layers():
    ks = jax.random.split(KEY, 3)
    params = {
        "q": jax.random.normal(ks[0], (8, 2, 4)) * 0.3,  # einsum('bsd,dhk->bshk')
        "layers": jax.random.normal(ks[1], (3, 8, 8)) * 0.3,  # vmapped over axis 0
        "mix": jax.random.normal(ks[2], (8, 3, 8)) * 0.3,  # stacked on a middle axis, vmapped
    }

    def fn(p, x):  # x: (b, s, d)
        q = jnp.einsum("bsd,dhk->bshk", x, p["q"]).reshape(x.shape)
        # vmap batches kernel and input alike: a dot_general batch dim, a stacked axis
        per_layer = jax.vmap(lambda w, h: jnp.tanh(h @ w))(p["layers"], jnp.stack([q] * 3))
        mixed = jax.vmap(lambda w, h: h @ w, in_axes=(1, 0))(p["mix"], per_layer)
        return mixed.sum(0)

    x = jax.random.normal(KEY, (2, 5, 8))
    hand = [
        jl.Target("q", in_axes=(0,), out_axes=(1, 2)),
        jl.Target("layers", stack_axes=(0,)),
        jl.Target("mix", stack_axes=(1,), in_axes=(0,), out_axes=(2,)),
    ]
    ad = _same_layouts(fn, params, (x,), "q|layers|mix", hand)
    assert check_against_merged(fn, params, ad, x).all_fast


# Tunix 0.1.7 uses APIs that flax 0.12 and jax 0.10 deprecate; they are its warnings, not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tunix_llama3_einsum_projections():
    tunix = tunix_llama3()
    cfg = tunix.ModelConfig(
        num_layers=1,
        vocab_size=32,
        embed_dim=16,
        hidden_dim=24,
        num_heads=4,
        head_dim=4,
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-5,
        remat_config=tunix.RematConfig.BLOCK,
    )
    graphdef, state = nnx.split(tunix.Llama3(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 5), jnp.int32)
    positions, mask = jnp.arange(5)[None], jnp.tril(jnp.ones((1, 5, 5), bool))

    def fn(st, tokens):
        return nnx.merge(graphdef, st)(tokens, positions, None, mask)[0]

    hand = [
        jl.Target(r".*attn/(q|k|v)_proj/w", in_axes=(0,), out_axes=(1, 2)),
        jl.Target(r".*attn/o_proj/w", in_axes=(0, 1), out_axes=(2,)),
        jl.Target(r".*mlp/(gate|up|down)_proj/kernel"),
    ]
    pattern = r".*(attn/._proj/w|mlp/.*_proj/kernel)"
    inferred = jl.infer_targets(fn, state, tokens, pattern=pattern)
    assert len(inferred) == 7
    assert select(state, inferred) == select(state, hand)


# ----------------------------------------------------------------------------- errors


def test_two_different_contractions_is_an_error_naming_the_uses():
    params = {"w": jnp.ones((8, 8))}

    def fn(p, x):
        return x @ p["w"] + x @ p["w"].T

    with pytest.raises(jl.TargetError) as err:
        jl.infer_targets(fn, params, jnp.ones((2, 8)), pattern="w")
    msg = str(err.value)
    assert "'w' (8, 8)" in msg and "different contractions" in msg
    assert "contracts axes (0,), produces (1,)" in msg
    assert "contracts axes (1,), produces (0,)" in msg
    assert "jl.Target('w'" in msg


def test_a_kernel_never_contracted_is_an_error_naming_the_uses():
    params = {"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}

    def fn(p, ids):
        return p["embed"][ids] @ p["w"]

    with pytest.raises(jl.TargetError, match=r"'embed' \(10, 4\).*never contracted.*gather"):
        jl.infer_targets(fn, params, jnp.array([1, 2]), pattern="embed|w")
    with pytest.raises(jl.TargetError, match=r"'w' .*never contracted.*none: fn never reads it"):
        jl.infer_targets(lambda p, ids: p["embed"][ids], params, jnp.array([1]), pattern="w")
    with pytest.raises(jl.TargetError, match=r"matched no leaf"):
        jl.infer_targets(fn, params, jnp.array([1]), pattern="nothing")


def test_a_layer_axis_only_the_kernel_has_is_an_output_axis():
    # vmap(in_axes=(0, None)) gives the layer axis to the kernel alone: the dot_general
    # produces it like any output axis, so that is what use says; stack_axes says otherwise
    params = {"w": jnp.ones((3, 4, 5))}

    def fn(p, x):
        return jax.vmap(lambda w, h: h @ w, in_axes=(0, None))(p["w"], x)

    (t,) = jl.infer_targets(fn, params, jnp.ones((2, 4)), pattern="w")
    assert (t.stack_axes, t.in_axes, t.out_axes) == ((), (1,), (0, 2))


def test_explicit_axes_are_kept_as_written_with_like():
    params = {"w": jnp.ones((3, 4, 5))}

    def fn(p, x):  # uses w as a stack of (4, 5) matmuls
        return jnp.einsum("bi,lio->lbo", x, p["w"])

    x = jnp.ones((2, 4))
    got = jl.lora(rank=2, targets=jl.Target("w", in_axes=(0, 1))).init(KEY, params, like=(fn, x))
    assert got["w"].layout.in_axes == (0, 1)  # as written, though fn contracts axis 1 only
    got = jl.lora(rank=2, targets="w").init(KEY, params, like=(fn, x))
    assert (got["w"].layout.in_axes, got["w"].layout.out_axes) == ((1,), (0, 2))
