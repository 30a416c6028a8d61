"""train_step: gradients only for trainable adapters, hand-checked updates, donation,
dropout keys, and the compiled step's inspection."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jl_testing import randomize
from test_optim import PARAMS, TARGETS, _frozen_a_adapters

import jaxlora as jl
from jaxlora import profiling
from jaxlora.train import dropout_keys


def _loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["q"]["kernel"])
    h = jax.vmap(lambda w: h @ w)(p["s"]["kernel"])
    return jnp.mean((h - batch["y"]) ** 2)


BATCH = {
    "x": jax.random.normal(jax.random.key(5), (6, 16)),
    "y": jax.random.normal(jax.random.key(6), (2, 6, 4)),
}


def test_sgd_step_equals_hand_computed_step_on_merged_gradient():
    ad = randomize(
        jl.lora(rank=2, targets=TARGETS).init(jax.random.key(0), PARAMS), jax.random.key(1)
    )
    lr = 0.3
    expect_grads = jax.grad(lambda a: _loss(jl.merge(PARAMS, a), BATCH))(ad)
    expect = jax.tree_util.tree_map(lambda a, g: a - lr * g, ad, expect_grads)
    tx = jl.optimizer(optax.sgd(lr))
    step = jl.train_step(_loss, tx, donate=False)
    params, new, _, metrics = step(PARAMS, ad, tx.init(ad), BATCH)
    chex.assert_trees_all_equal(params, PARAMS)  # nothing moves the base
    chex.assert_trees_all_close(new, expect, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], _loss(jl.merge(PARAMS, ad), BATCH), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(expect_grads), rtol=1e-5)


def test_frozen_arrays_unchanged_and_not_differentiated():
    ad = randomize(_frozen_a_adapters(), jax.random.key(1))
    tx = jl.optimizer(optax.adam(1e-2))
    step = jl.train_step(_loss, tx, donate=False, jit=False)
    _, new, _, _ = step(PARAMS, ad, tx.init(ad), BATCH)
    np.testing.assert_array_equal(new["q"]["kernel"].a, ad["q"]["kernel"].a)
    assert not np.allclose(new["q"]["kernel"].b, ad["q"]["kernel"].b)
    # the backward pass never forms a (d_in, r) cotangent for the frozen A of "q"
    jaxpr = jax.make_jaxpr(step)(PARAMS, ad, tx.init(ad), BATCH)
    text = str(jaxpr)
    assert "f32[16,2]" in text  # A itself is an input...
    shapes = [
        str(v.aval)
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name == "dot_general"
        for v in e.outvars
    ]
    assert "float32[16,2]" not in shapes and "f32[16,2]" not in shapes  # ...never a product


def test_step_traces_once_and_donates():
    ad = jl.lora(rank=2, targets=TARGETS).init(jax.random.key(0), PARAMS)
    tx = jl.optimizer(optax.adam(1e-2))

    @chex.assert_max_traces(n=1)
    def loss(p, b):
        return _loss(p, b)

    step = jl.train_step(loss, tx)
    state = tx.init(ad)
    params = jax.tree_util.tree_map(jnp.copy, PARAMS)  # the step donates the base too
    old, old_params = ad, params
    losses = []
    for _ in range(4):
        params, ad, state, m = step(params, ad, state, BATCH)
        losses.append(float(m["loss"]))
    assert old["q"]["kernel"].a.is_deleted()
    assert old_params["q"]["kernel"].is_deleted()  # donated through, not copied
    chex.assert_trees_all_equal(params, PARAMS)
    assert losses[-1] < losses[0]


def test_has_aux_metrics():
    ad = jl.lora(rank=2, targets=TARGETS).init(jax.random.key(0), PARAMS)
    tx = jl.optimizer(optax.sgd(0.1))

    def loss(p, b):
        v = _loss(p, b)
        return v, {"twice": 2 * v}

    _, _, _, m = jl.train_step(loss, tx, has_aux=True, donate=False)(PARAMS, ad, tx.init(ad), BATCH)
    np.testing.assert_allclose(m["twice"], 2 * m["loss"], rtol=1e-6)


def _spec_state(name):
    extra = {"lam": 0.5, "start_step": 0} if name == "delta_lora" else {}
    recipe = jl.recipe(name, rank=2, targets=TARGETS, **extra)
    params, ad = recipe.prepare(jax.random.key(0), PARAMS)
    params = jax.tree_util.tree_map(jnp.copy, params)
    tx = recipe.optimizer(optax.adam, learning_rate=0.1)
    return recipe, tx, params, ad, tx.init(ad)


@pytest.mark.parametrize("name", ["lora", "delta_lora"])
def test_finite_flag_reports_nan_and_inf(name):
    _, tx, params, ad, state = _spec_state(name)
    step = jl.train_step(_loss, tx, donate=False)
    *_, m = step(params, ad, state, BATCH)
    assert m["finite"].dtype == jnp.bool_ and bool(m["finite"])
    for bad in (jnp.nan, jnp.inf):
        batch = {**BATCH, "x": BATCH["x"].at[0, 0].set(bad)}
        *_, m = step(params, ad, state, batch)
        # the independent check: the host sees a non-finite loss or gradient norm
        host = np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
        assert not host and not bool(m["finite"])


def test_finite_flag_catches_a_nan_update_from_finite_gradients():
    _, _, params, ad, _ = _spec_state("lora")
    tx = jl.optimizer(optax.sgd(jnp.nan))  # finite gradients, NaN updates
    *_, m = jl.train_step(_loss, tx, donate=False)(params, ad, tx.init(ad), BATCH)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"])


@pytest.mark.parametrize("name", ["lora", "delta_lora"])
def test_skip_nonfinite_leaves_the_state_unchanged(name):
    _, tx, params, ad, state = _spec_state(name)
    step = jl.train_step(_loss, tx, donate=False, skip_nonfinite=True)
    batch = {**BATCH, "x": BATCH["x"].at[0, 0].set(jnp.nan)}
    out = step(params, ad, state, batch)
    chex.assert_trees_all_equal(out[:3], (params, ad, state))
    out = step(params, ad, state, BATCH)  # a finite step still trains
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), out[1], ad)
    assert any(jax.tree_util.tree_leaves(changed))


# ----------------------------------------------------------------------------- dropout


def _dropout_loss(p, batch, key):
    # the model's own dropout (on its input), drawn from the key the step hands it
    keep = jax.random.bernoulli(key, 0.8, batch["x"].shape)
    return _loss(p, {**batch, "x": jnp.where(keep, batch["x"] / 0.8, 0.0)})


def _adapters(dropout=0.0):
    ad = jl.lora(rank=2, targets=TARGETS, dropout=dropout).init(jax.random.key(0), PARAMS)
    return randomize(ad, jax.random.key(1))


def test_dropout_zero_with_rng_is_bit_exactly_the_step_without():
    ad = _adapters(0.0)
    tx = jl.optimizer(optax.adam(1e-2))
    plain = jl.train_step(_loss, tx, donate=False)
    keyed = jl.train_step(lambda p, b, key: _loss(p, b), tx, with_rng=True, donate=False)
    want = plain(PARAMS, ad, tx.init(ad), BATCH)
    got = keyed(PARAMS, ad, tx.init(ad), BATCH, jax.random.key(3))
    chex.assert_trees_all_equal(got, want)
    # and the traced programs agree too: no mask is drawn for the low-rank branch
    n_rng = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("random_bits")
    assert n_rng(keyed, PARAMS, ad, tx.init(ad), BATCH, jax.random.key(3)) == 0


def test_step_with_dropout_equals_hand_built_oracle():
    ad = _adapters(0.25)
    lr, key = 0.05, jax.random.key(7)
    tx = jl.optimizer(optax.adam(lr))
    state = tx.init(ad)
    # the oracle: the documented key derivation, adapt with dropout_rng, one adam update
    model_key, lora_key = jax.random.split(key)
    loss, grads = jax.value_and_grad(
        lambda a: jl.adapt(_dropout_loss)(PARAMS, a, BATCH, model_key, dropout_rng=lora_key)
    )(ad)
    updates, want_state = optax.adam(lr).update(grads, optax.adam(lr).init(ad), ad)
    want = optax.apply_updates(ad, updates)
    step = jl.train_step(_dropout_loss, tx, with_rng=True, donate=False)
    _, got, got_state, m = step(PARAMS, ad, state, BATCH, key)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(
        jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state), atol=1e-6
    )
    # both dropouts really act: without the low-rank one, or the model's, the loss differs
    undropped = jl.adapt(_dropout_loss)(PARAMS, ad, BATCH, model_key)
    assert abs(float(undropped) - float(loss)) > 1e-4
    assert abs(float(jl.adapt(_loss)(PARAMS, ad, BATCH, dropout_rng=lora_key)) - loss) > 1e-4
    # the documented helper is the derivation the oracle used
    chex.assert_trees_all_equal(
        jax.random.key_data(jnp.stack(dropout_keys(key))),
        jax.random.key_data(jnp.stack([model_key, lora_key])),
    )


def test_dropout_keys_change_the_step_and_the_same_key_repeats_it():
    ad = _adapters(0.25)
    tx = jl.optimizer(optax.sgd(0.1))
    step = jl.train_step(_dropout_loss, tx, with_rng=True, donate=False)
    run = lambda k: step(PARAMS, ad, tx.init(ad), BATCH, jax.random.key(k))
    a, again, other = run(1), run(1), run(2)
    chex.assert_trees_all_equal(a, again)
    assert float(a[3]["loss"]) != float(other[3]["loss"])
    # a loss that ignores its key still varies: the low-rank masks alone differ
    lora_only = jl.train_step(lambda p, b, k: _loss(p, b), tx, with_rng=True, donate=False)
    l1, l2 = (
        float(lora_only(PARAMS, ad, tx.init(ad), BATCH, jax.random.key(k))[3]["loss"])
        for k in (1, 2)
    )
    assert l1 != l2


def test_dropout_adapters_without_rng_are_refused_by_name():
    ad = _adapters(0.1)
    tx = jl.optimizer(optax.sgd(0.1))
    step = jl.train_step(_loss, tx, donate=False)
    with pytest.raises(ValueError, match=r"'q/kernel': 0\.1.*with_rng=True"):
        step(PARAMS, ad, tx.init(ad), BATCH)
    with pytest.raises(TypeError):  # a keyed step needs its key
        jl.train_step(_dropout_loss, tx, with_rng=True)(PARAMS, ad, tx.init(ad), BATCH)


def test_sharded_step_with_rng_equals_the_unsharded_one():
    """8 fake devices (FSDP, a scanned Llama with attention and low-rank dropout) against
    one device, in a process of its own (``XLA_FLAGS`` acts only before JAX starts)."""
    flags = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_force_host_platform_device_count=8",
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
        ]
    ).strip()
    script = pathlib.Path(__file__).with_name("_rng_sharded_case.py")
    # this checkout's jaxlora, not whichever one is installed
    path = os.pathsep.join(p for p in (str(script.parents[1]), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=script.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "sharded == unsharded" in proc.stdout, proc.stdout[-2000:]


# ----------------------------------------------------------------------------- inspection


@pytest.mark.parametrize("with_rng", [False, True])
def test_compiled_step_is_inspectable_and_runs_as_the_step(with_rng):
    ad = _adapters(0.25 if with_rng else 0.0)
    tx = jl.optimizer(optax.adam(1e-2))
    loss = _dropout_loss if with_rng else _loss
    step = jl.train_step(loss, tx, with_rng=with_rng, donate=False)
    args = (PARAMS, ad, tx.init(ad), BATCH) + ((jax.random.key(4),) if with_rng else ())
    # lowered from shapes alone: nothing is allocated or run to read the figures
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    compiled = step.lower(*shapes).compile()
    cost = profiling.cost_of(compiled)
    assert cost.flops > 0 and cost.argument_bytes > 0
    assert profiling.compiled_cost(step, *args).flops == cost.flops
    # the executable is the step: same outputs, bit for bit
    chex.assert_trees_all_equal(compiled(*args), step(*args))
    if not with_rng:
        # its figures say what the design says: no weight gradient of the frozen base, so
        # fewer flops than full fine-tuning of the same kernels through the same step
        full = jl.full(targets=TARGETS).init(jax.random.key(0), PARAMS)
        full_flops = profiling.compiled_cost(step, PARAMS, full, tx.init(full), BATCH).flops
        assert cost.flops < full_flops


def test_sharded_step_is_a_jit_function():
    # one device: the sharded step lowers and compiles like the unsharded one
    mesh = jl.make_mesh()
    psh = jl.sharding.param_shardings(PARAMS, [(".*", jax.sharding.PartitionSpec())], mesh)
    ad = jl.sharding.init_adapters(
        jl.lora(rank=2, targets=TARGETS, dropout=0.1), jax.random.key(0), PARAMS, psh
    )
    ash = jl.sharding.adapter_shardings(ad, psh)
    tx = jl.optimizer(optax.sgd(0.1))
    step = jl.sharded_train_step(
        _dropout_loss,
        tx,
        param_shardings=psh,
        adapter_shardings=ash,
        opt_state_shardings=jl.sharding.opt_state_shardings(tx, ad, ash),
        batch_sharding=jl.sharding.batch_sharding(mesh),
        with_rng=True,
        donate=False,
    )
    state = jl.sharding.init_opt_state(tx, ad, ash)
    args = (PARAMS, ad, state, BATCH, jax.random.key(2))
    compiled = step.lower(*args).compile()
    assert profiling.cost_of(compiled).flops > 0
    plain = jl.train_step(_dropout_loss, tx, with_rng=True, donate=False)
    chex.assert_trees_all_close(compiled(*args), plain(*args), atol=1e-6, rtol=1e-6)
