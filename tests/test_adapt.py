"""adapt(fn) against the merged reference, for every model family it must see through."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import tunix_llama3
from flax import nnx
from jl_testing import check_against_merged, randomize

import jaxlora as jl

KEY = jax.random.key(0)


STACK = jl.Target(r"stack/kernel", stack_axes=(0,))


def _lora(params, targets, rank=3, like=None, **kw):
    method = jl.lora(rank=rank, alpha=6.0, targets=targets, **kw)
    ad = method.init(jax.random.key(1), params, like=like)
    return randomize(ad, jax.random.key(2))


# ----------------------------------------------------------------------------- plain JAX


def _plain_params():
    ks = jax.random.split(KEY, 5)
    return {
        "embed": jax.random.normal(ks[0], (11, 8)),
        "w1": {"kernel": jax.random.normal(ks[1], (8, 16)) * 0.3},
        "w2": {"kernel": jax.random.normal(ks[2], (16, 8)) * 0.3},
        "stack": {"kernel": jax.random.normal(ks[3], (3, 8, 8)) * 0.3},
        "bias": jnp.zeros((16,)),
    }


def _plain_fn(p, x):
    h = jnp.tanh(x @ p["w1"]["kernel"] + p["bias"])
    h = jnp.einsum("bf,fd->bd", h, p["w2"]["kernel"])
    h = h @ p["w2"]["kernel"].T @ p["w2"]["kernel"]  # W and W.T in one chain
    # vmap over stacked layers: dot_general with a batch dim on the stack axis
    h = jax.vmap(lambda w, y: y @ w, in_axes=(0, None))(p["stack"]["kernel"], h).sum(0)
    h = jax.jit(lambda a, w: a @ w.astype(jnp.float32).reshape(8, 16))(h, p["w1"]["kernel"])
    return h


def test_plain_jax_matches_merged_and_is_fast():
    params = _plain_params()
    ad = _lora(params, [r"w\d/kernel", STACK])
    report = check_against_merged(_plain_fn, params, ad, jax.random.normal(KEY, (5, 8)))
    assert report.all_fast, report
    assert report.fast["w2/kernel"] == 3


def test_tied_decoder_contracts_output_axis_and_lookup_merges():
    params = _plain_params()
    ad = _lora(params, r"embed", rank=4)

    def fn(p, ids):
        h = p["embed"][ids]  # gather: no unmerged rule, merged and reported
        return h @ p["embed"].T  # x @ W.T: contracts the output axis, stays unmerged

    report = check_against_merged(fn, params, ad, jnp.array([1, 2, 3]), strict=False)
    assert report.fast == {"embed": 1}
    assert list(report.merged) == ["embed"] and report.num_merged == 1
    with pytest.raises(jl.AdaptError, match=r"'embed'.*'gather'"):
        jl.adapt(fn, strict=True)(params, ad, jnp.array([1, 2, 3]))


def test_cond_and_nested_jit():
    params = _plain_params()
    ad = _lora(params, r"w1/kernel")

    def fn(p, x, flag):
        w = p["w1"]["kernel"]
        return jax.lax.cond(flag > 0, lambda x: jax.jit(jnp.dot)(x, w), lambda x: -(x @ w), x)

    for flag in (1, -1):
        report = check_against_merged(fn, params, ad, jnp.ones((2, 8)), jnp.int32(flag))
        assert report.all_fast


def test_mixed_precision_casts_stay_unmerged():
    params = _plain_params()
    ad = _lora(params, r"w1/kernel")

    def fn(p, x):
        return (x.astype(jnp.bfloat16) @ p["w1"]["kernel"].astype(jnp.bfloat16)).astype(jnp.float32)

    x = jax.random.normal(KEY, (4, 8))
    report = jl.adapt_report(fn, params, ad, x)
    assert report.all_fast
    # bf16 has an 8-bit mantissa: the unmerged sum rounds x·W and x·ΔW separately, the
    # merged reference rounds W+ΔW once, so they agree to bf16 resolution (2^-8 relative).
    got = jl.adapt(fn)(params, ad, x)
    ref = fn(jl.merge(params, ad), x)
    np.testing.assert_allclose(got, ref, rtol=2**-6, atol=2**-6 * float(jnp.abs(ref).max()))


# ----------------------------------------------------------------------------- Flax linen


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (b, t, 4, 6)
        h = nn.DenseGeneral(10, axis=(-2, -1), name="proj_in")(x)  # kernel (4, 6, 10)
        h = nn.Dense(12, name="dense")(nn.gelu(h))
        h = nn.Einsum((12, 2, 5), "btd,dhk->bthk", name="einsum")(h)  # kernel (12, 2, 5)
        return nn.DenseGeneral(3, axis=(-2, -1), name="out")(h)  # kernel (2, 5, 3)


def test_linen_dense_densegeneral_einsum():
    model = _LinenNet()
    x = jax.random.normal(KEY, (2, 3, 4, 6))
    params = model.init(KEY, x)["params"]
    targets = [
        jl.Target(r"proj_in/kernel", in_axes=(0, 1), out_axes=(2,)),
        jl.Target(r"dense/kernel"),
        jl.Target(r"einsum/kernel", in_axes=(0,), out_axes=(1, 2)),
        jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(2,)),
    ]
    ad = _lora(params, targets)
    report = check_against_merged(lambda p, x: model.apply({"params": p}, x), params, ad, x)
    assert report.all_fast and len(report.fast) == 4


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        y = nn.Dense(16, name="up")(h)
        y = nn.Dense(8, name="down")(jax.nn.silu(y))
        return h + y, None


def test_linen_scan_remat_stacked_kernels():
    Stack = nn.scan(
        nn.remat(_Block),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=3,
    )

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h, _ = Stack(name="layers")(x, None)
            return h

    model = Net()
    x = jax.random.normal(KEY, (4, 8))
    params = model.init(KEY, x)["params"]
    assert params["layers"]["up"]["kernel"].shape == (3, 8, 16)
    fn = lambda p, x: model.apply({"params": p}, x)
    ad = _lora(params, r"layers/.*/kernel", like=(fn, x))  # (3, d_in, d_out): axes from use
    assert ad["layers"]["up"]["kernel"].a.shape == (3, 8, 3)
    report = check_against_merged(fn, params, ad, x)
    assert report.all_fast and set(report.fast) == {"layers/up/kernel", "layers/down/kernel"}


# ----------------------------------------------------------------------------- Flax NNX


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.lin1 = nnx.Linear(6, 12, rngs=rngs)
        self.lin2 = nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
        return self.lin2(nnx.relu(self.lin1(x)))


def test_nnx_split_merge():
    graphdef, state = nnx.split(_NnxNet(nnx.Rngs(0)))
    ad = _lora(state, r"lin\d/kernel", rank=2)

    def fn(st, x):
        return nnx.merge(graphdef, st)(x)

    report = check_against_merged(fn, state, ad, jax.random.normal(KEY, (3, 6)))
    assert report.all_fast and set(report.fast) == {"lin1/kernel", "lin2/kernel"}


# ----------------------------------------------------------------------------- behaviour


def test_eager_calls_are_cached_by_shape():
    params = _plain_params()
    ad = _lora(params, r"w1/kernel")
    traces = []

    def fn(p, x):
        traces.append(x.shape)
        return x @ p["w1"]["kernel"]

    f = jl.adapt(fn)
    f(params, ad, jnp.ones((2, 8)))
    f(params, ad, jnp.ones((2, 8)) * 3)
    assert len(traces) == 1
    f(params, ad, jnp.ones((5, 8)))
    assert len(traces) == 2


def test_static_python_arguments():
    params = _plain_params()
    ad = _lora(params, r"w1/kernel")

    def fn(p, x, *, negate):
        y = x @ p["w1"]["kernel"]
        return -y if negate else y

    f = jl.adapt(fn)
    a = f(params, ad, jnp.ones((1, 8)), negate=True)
    b = f(params, ad, jnp.ones((1, 8)), negate=False)
    np.testing.assert_allclose(a, -b)


def test_shape_mismatch_is_a_clear_error():
    params = _plain_params()
    ad = _lora(params, r"w1/kernel")
    bad = dict(params, w1={"kernel": jnp.ones((8, 4))})
    with pytest.raises(ValueError, match=r"'w1/kernel'.*\(8, 16\).*\(8, 4\)"):
        jl.adapt(lambda p: p["w1"]["kernel"].sum())(bad, ad)
    with pytest.raises(ValueError, match=r"missing from params: \['w1/kernel'\]"):
        jl.adapt(lambda p: p["w2"]["kernel"].sum())({"w2": params["w2"]}, ad)


def test_targets_sharing_an_input_fuse_their_first_product():
    ks = jax.random.split(KEY, 3)
    params = {n: {"kernel": jax.random.normal(k, (8, 7))} for n, k in zip("qkv", ks)}
    ad = _lora(params, r"[qkv]/kernel", rank=2)

    def fn(p, x):
        q, k, v = (x @ p[n]["kernel"] for n in "qkv")
        return jnp.tanh(q * k) @ v.T

    report = check_against_merged(fn, params, ad, jax.random.normal(KEY, (5, 8)))
    assert report.all_fast

    def rank_widths(fuse):
        jaxpr = jax.make_jaxpr(jl.adapt(fn, fuse=fuse))(params, ad, jnp.ones((5, 8)))
        return sorted(
            e.outvars[0].aval.shape[-1]
            for e in _all_eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] in (2, 6)
        )

    assert rank_widths(fuse=True) == [6]  # one x @ [A_q|A_k|A_v]
    assert rank_widths(fuse=False) == [2, 2, 2]


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, custom_vjp, scan bodies) included."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


# ----------------------------------------------------------------------------- pass-through


class _RematBlock(nnx.Module):
    def __init__(self, rngs, calls=1):
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.calls = calls

    def __call__(self, x):
        for _ in range(self.calls):  # nnx.remat returns the module state, kernel included
            x = nnx.remat(lambda m, x: jnp.tanh(m.fc(x)))(self, x)
        return x


@pytest.mark.parametrize("calls", [1, 2])
def test_nnx_remat_returns_kernel_unmerged(calls):
    graphdef, state = nnx.split(_RematBlock(nnx.Rngs(0), calls))
    ad = _lora(state, "fc/kernel", rank=2)

    def fn(st, x):
        return nnx.merge(graphdef, st)(x)

    x = jax.random.normal(KEY, (4, 8))
    report = check_against_merged(fn, state, ad, x)  # strict=True: a merge would raise
    assert report.merged == {} and report.fast == {"fc/kernel": calls}


def test_checkpoint_cond_scan_pass_a_kernel_through_lazily():
    params = _plain_params()
    ad = _lora(params, [r"w1/kernel", STACK])

    def fn(p, x, flag):
        w, stack = p["w1"]["kernel"], p["stack"]["kernel"]
        y, w = jax.checkpoint(lambda w, x: (jnp.tanh(x @ w), w))(w, x)
        # every branch returns the kernel it was given
        y, w = jax.lax.cond(flag, lambda w, y: (y @ w.T, w), lambda w, y: (-(y @ w.T), w), w, y)

        def step(c, s):  # a loop-invariant carry, and ys that are the body's own slice
            h, w = c
            return (jnp.tanh(h @ s), w), s

        (y, w), restacked = jax.lax.scan(step, (y, w), stack)
        _, again = jax.lax.scan(lambda h, s: (h @ s, s), y, restacked, reverse=True)
        return jnp.tanh(y @ w).sum() + jnp.einsum("bi,lij->lbj", y, again).sum()

    x = jax.random.normal(KEY, (4, 8))
    for flag in (True, False):
        report = check_against_merged(fn, params, ad, x, jnp.bool_(flag))
        assert report.merged == {}
        # w1: checkpoint, one per cond branch, the last matmul; stack: both scans, einsum
        assert report.fast == {"w1/kernel": 4, "stack/kernel": 3}


# ----------------------------------------------------------------------------- third party


# Tunix 0.1.7 uses several APIs that flax 0.12 and jax 0.10 deprecate (Param ``sharding=``
# metadata, ``pxla.thread_resources``, ``Variable.value``); they are its warnings, not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("remat", ["BLOCK", "DECODER"])
def test_tunix_llama3_with_remat_is_all_fast(remat):
    tunix = tunix_llama3()
    cfg = tunix.ModelConfig(
        num_layers=2,
        vocab_size=32,
        embed_dim=16,
        hidden_dim=24,
        num_heads=4,
        head_dim=4,
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-5,
        remat_config=tunix.RematConfig[remat],
    )
    graphdef, state = nnx.split(tunix.Llama3(cfg, rngs=nnx.Rngs(0)))
    state = randomize(state, jax.random.key(3), scale=0.3)  # its MLP kernels start at zero
    # Tunix's projections are einsum kernels (D, N, H) and (N, H, D)
    targets = [
        jl.Target(r".*attn/(q|k|v)_proj/w", in_axes=(0,), out_axes=(1, 2)),
        jl.Target(r".*attn/o_proj/w", in_axes=(0, 1), out_axes=(2,)),
        jl.Target(r".*mlp/(gate|up|down)_proj/kernel"),
    ]
    ad = _lora(state, targets, rank=2)
    tokens = jax.random.randint(KEY, (2, 5), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)

    def fn(st, tokens):
        logits, _ = nnx.merge(graphdef, st)(tokens, positions, None, mask)
        return logits

    report = check_against_merged(fn, state, ad, tokens)  # strict: any merge raises
    assert report.merged == {} and report.all_fast and len(report.fast) == 2 * 7
