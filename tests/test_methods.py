"""Every registered method through init → adapt → grad → optimizer step → merge.

The oracle is the merged form: ``adapt(fn)(params, adapters)`` must equal
``fn(merge(params, adapters))`` in value and in the gradient of the trainable arrays, before
and after real optimizer steps, and frozen arrays must never move. Per-method oracles (hand
steps, PEFT, telescoping sums) live in ``test_<method>.py``; the flop claim of the method
table (``scripts/compare_methods.py``) is asserted at the bottom.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jl_testing import load_script

import jaxlora as jl
from jaxlora.adapters import FROZEN, FULL_KEY
from jaxlora.methods import NAMES
from jaxlora.models import llama
from jaxlora.train import join_trainable, split_trainable

_KS = jax.random.split(jax.random.key(0), 6)
PARAMS = {
    "inp": {"kernel": jax.random.normal(_KS[0], (8, 16)) * 0.4},
    "layers": {"kernel": jax.random.normal(_KS[1], (3, 16, 16)) * 0.3},  # scanned
    "out": {"kernel": jax.random.normal(_KS[2], (2, 8, 8)) * 0.3},  # DenseGeneral (h, k) -> d
    "bias": jnp.zeros((16,)),
}
TARGETS = [
    jl.Target(r"inp/kernel"),
    jl.Target(r"layers/kernel", stack_axes=(0,)),
    jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(2,)),
]
BATCH = {
    "x": jax.random.normal(_KS[3], (5, 8)),
    "y": jax.random.normal(_KS[4], (5, 8)),
}
KWARGS = {
    "lora": dict(rank=4, alpha=8.0),
    "rslora": dict(rank=4, alpha=8.0),
    "pissa": dict(rank=4, alpha=8.0),
    "lora_fa": dict(rank=4, alpha=8.0),
    "vera": dict(rank=8),
    "dora": dict(rank=4, alpha=8.0),
    "lora_plus": dict(rank=4, alpha=8.0, ratio=4.0),
    "delta_lora": dict(rank=4, alpha=8.0, lam=0.5, start_step=1),
}


def model(p, x):
    h = jnp.tanh(x @ p["inp"]["kernel"] + p["bias"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["kernel"])
    return jnp.einsum("bhk,hkd->bd", h.reshape(-1, 2, 8), p["out"]["kernel"])


def loss_fn(p, batch):
    return jnp.mean((model(p, batch["x"]) - batch["y"]) ** 2)


def perturb(adapters, key, scale=0.1):
    """Moves every trainable array off its init (B = 0 would hide bugs); frozen ones stay."""
    lab = jax.tree_util.tree_leaves(jl.labels(adapters))
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    out = [
        x if lb == FROZEN else x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, lb, k in zip(leaves, lab, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


# module-level jits: the checks before and after training reuse one compilation per method
@jax.jit
def _adapted_out(params, adapters):
    return jl.adapt(model, strict=True)(params, adapters, BATCH["x"])


@jax.jit
def _merged_out(params, adapters):
    return model(jl.merge(params, adapters), BATCH["x"])


@jax.jit
def _adapted_grad(params, trainable, frozen):
    f = lambda t: jl.adapt(loss_fn, strict=True)(params, join_trainable(t, frozen), BATCH)
    return jax.value_and_grad(f)(trainable)


@jax.jit
def _merged_grad(params, trainable, frozen):
    f = lambda t: loss_fn(jl.merge(params, join_trainable(t, frozen)), BATCH)
    return jax.value_and_grad(f)(trainable)


def assert_adapted_equals_merged(params, adapters):
    """Value and trainable-array gradient of adapt(loss) vs loss(merge(...))."""
    trainable, frozen = split_trainable(adapters, adapters)
    out, ref = _adapted_out(params, adapters), _merged_out(params, adapters)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    v, g = _adapted_grad(params, trainable, frozen)
    ve, ge = _merged_grad(params, trainable, frozen)
    np.testing.assert_allclose(v, ve, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ge), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)  # composed: scan + tanh chain


@pytest.fixture(scope="module", params=NAMES)
def run(request):
    """One method trained for 3 steps; everything the checks below need."""
    name = request.param
    recipe = jl.recipe(name, targets=TARGETS, **KWARGS[name])
    base, init_adapters = recipe.prepare(jax.random.key(1), PARAMS)
    adapters = perturb(init_adapters, jax.random.key(2))
    tx = recipe.optimizer(optax.adam, learning_rate=1e-2)
    step = jl.train_step(loss_fn, tx, donate=False)  # one step for every method
    state = tx.init(adapters)
    p, a, losses = base, adapters, []
    for _ in range(3):
        p, a, state, metrics = step(p, a, state, BATCH)
        losses.append(float(metrics["loss"]))
    return dict(
        name=name,
        recipe=recipe,
        base=base,
        init_adapters=init_adapters,
        adapters=adapters,
        params_after=p,
        adapters_after=a,
        losses=losses,
    )


def test_init_starts_at_the_base_model(run):
    merged = jl.merge(run["base"], run["init_adapters"])
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(PARAMS)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_adapted_equals_merged_and_takes_the_fast_path(run):
    report = jl.adapt_report(loss_fn, run["base"], run["adapters"], BATCH)
    assert report.all_fast, report
    assert_adapted_equals_merged(run["base"], run["adapters"])


def test_adapted_equals_merged_after_optimizer_steps(run):
    assert_adapted_equals_merged(run["params_after"], run["adapters_after"])
    assert run["losses"][-1] < run["losses"][0], run["losses"]


def test_frozen_leaves_never_change_and_trainable_ones_do(run):
    before, after = run["adapters"], run["adapters_after"]
    labels = jax.tree_util.tree_leaves(jl.labels(before))
    for lb, x, y in zip(
        labels, jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True
    ):
        if lb == FROZEN:
            np.testing.assert_array_equal(x, y)
        else:
            assert not np.array_equal(x, y), lb


def test_base_moves_only_for_delta_lora(run):
    before, after = run["base"], run["params_after"]
    targeted = {"inp", "layers", "out"}
    for key in before:
        same = all(
            np.array_equal(x, y)
            for x, y in zip(
                jax.tree_util.tree_leaves(before[key]), jax.tree_util.tree_leaves(after[key])
            )
        )
        assert same == (run["name"] != "delta_lora" or key not in targeted), key


def test_unknown_method_and_hyper_parameter():
    with pytest.raises(ValueError, match=r"unknown method 'loha'.*'vera'"):
        jl.recipe("loha")
    with pytest.raises(TypeError, match="lam"):
        jl.recipe("delta_lora", rank=4, start_step=0)
    with pytest.raises(TypeError, match="ratio"):
        jl.recipe("lora", ratio=4)


# ----------------------------------------------------------------------------- heads

HEADED = {
    **PARAMS,
    "head": {
        "kernel": jax.random.normal(_KS[5], (8, 3)) * 0.3,
        "bias": jnp.zeros((3,)),
    },
}


def headed_loss(p, batch):
    logits = model(p, batch["x"]) @ p["head"]["kernel"] + p["head"]["bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])


@pytest.mark.parametrize("name", ["lora", "vera", "pissa"])
def test_recipe_train_is_compose_with_full(name):
    plain = jl.recipe(name, targets=TARGETS, **KWARGS[name])
    headed = jl.recipe(name, targets=TARGETS, train="head/.*", **KWARGS[name])
    assert headed.name == name and headed.method.name == f"{plain.method.name}+full"
    assert headed.method.replaces_base == plain.method.replaces_base
    by_hand = jl.compose(plain.method, jl.full(targets="head/.*"))
    got = headed.prepare(jax.random.key(3), HEADED)
    want = by_hand.prepare(jax.random.key(3), HEADED)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(g, w)
    full = got[1][FULL_KEY]["head"]
    np.testing.assert_array_equal(full["kernel"], HEADED["head"]["kernel"])
    assert set(jax.tree_util.tree_leaves(jl.labels(got[1])[FULL_KEY])) == {"full"}
    # training starts at the model it was given (PiSSA: from the residual, head untouched)
    merged = jl.merge(*got)
    for g, w in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(HEADED)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    np.testing.assert_array_equal(got[0]["head"]["kernel"], HEADED["head"]["kernel"])


def test_recipe_head_trains_at_the_base_learning_rate_beside_lora_plus():
    lr, ratio = 0.1, 4.0
    recipe = jl.recipe("lora_plus", targets=TARGETS, train="head/.*", rank=4, ratio=ratio)
    params, adapters = recipe.prepare(jax.random.key(0), HEADED)
    adapters = perturb(adapters, jax.random.key(1))
    tx = recipe.optimizer(optax.sgd, learning_rate=lr)
    step = jl.train_step(headed_loss, tx, donate=False)
    _, new, _, _ = step(params, adapters, tx.init(adapters), BATCH)
    # oracle: the merged model's gradient; SGD moves the head by lr, B by ratio * lr
    grads = jax.grad(lambda a: headed_loss(jl.merge(params, a), BATCH))(adapters)
    for leaf in ("kernel", "bias"):
        want = adapters[FULL_KEY]["head"][leaf] - lr * grads[FULL_KEY]["head"][leaf]
        np.testing.assert_allclose(new[FULL_KEY]["head"][leaf], want, atol=1e-6, rtol=1e-5)
    node, g = adapters["inp"]["kernel"], grads["inp"]["kernel"]
    np.testing.assert_allclose(new["inp"]["kernel"].b, node.b - ratio * lr * g.b, atol=1e-6)
    np.testing.assert_allclose(new["inp"]["kernel"].a, node.a - lr * g.a, atol=1e-6)
    assert not np.array_equal(new[FULL_KEY]["head"]["bias"], HEADED["head"]["bias"])


def test_recipe_train_errors_name_the_pattern_and_paths():
    recipe = jl.recipe("lora", targets=TARGETS, train="hed/.*", rank=4)
    with pytest.raises(jl.TargetError, match=r"train='hed/\.\*'.*paths seen: .*head/kernel"):
        recipe.init(jax.random.key(0), HEADED)
    recipe = jl.recipe("lora", targets=TARGETS, train=["head/.*", "inp/.*"], rank=4)
    with pytest.raises(ValueError, match=r"train=\['head/\.\*', 'inp/\.\*'\].*\['inp/kernel'\]"):
        recipe.init(jax.random.key(0), HEADED)


# ----------------------------------------------------------------------------- method table

compare_methods = load_script("compare_methods")

# d=256 keeps rank 8 small relative to the kernels (as in real models) and compiles fast
CONFIG = llama.LlamaConfig(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
)


@pytest.fixture(scope="module")
def table():
    return {r["method"]: r for r in compare_methods.compare(CONFIG, 2, 64, vera_rank=8)}


@pytest.mark.slow
def test_every_method_costs_at_most_072_of_full_finetuning(table):
    ratios = {k: round(r["flops_ratio"], 4) for k, r in table.items()}
    print(ratios)
    assert set(ratios) == {"full", *NAMES}
    assert all(v <= 0.72 for k, v in ratios.items() if k != "full"), ratios
    for r in table.values():
        assert r["trainable"] == r["expected"], r["method"]
    # LoRA-FA never keeps the d_in-wide inputs that A's gradient would need
    assert table["lora_fa"]["cost"].temp_bytes < table["lora"]["cost"].temp_bytes


def test_llama_takes_the_fast_path_for_every_factor_form():
    # the table's model must stay one the adapt fast path covers, scanned or not
    for scan in (False, True):
        config = dataclasses.replace(compare_methods.QUICK_CONFIG, scan_layers=scan)
        params = jax.eval_shape(lambda k, c=config: llama.init_params(k, c), jax.random.key(0))
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        fn = functools.partial(llama.apply, config=config)
        for name in ("lora", "vera", "dora"):
            recipe = jl.recipe(name, **compare_methods.method_kwargs(name, vera_rank=8))
            # scanned kernels are (L, d_in, d_out): their axes are read off the model's use
            like = (fn, ids)
            init = lambda k, p, recipe=recipe, like=like: recipe.init(k, p, like=like)
            adapters = jax.eval_shape(init, jax.random.key(1), params)
            report = jl.adapt_report(fn, params, adapters, ids)
            assert report.all_fast, (name, scan, report)
