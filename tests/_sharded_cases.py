"""Sharded training on 8 fake CPU devices against one device, for every method and preset.

Not collected by the main suite: ``tests/test_sharding.py`` runs this module in its own
``pytest`` process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, because the
flag only takes effect before JAX starts. A tiny Llama (2 layers, d=32, 4 heads, 2 KV heads,
vocabulary 64, sequence 16) trains 5 steps with SGD + momentum, whose updates are linear in
the gradient, so float32 reduction-order noise is not amplified the way Adam's
``g/√v`` amplifies it near ``g = 0`` (where every method starts: B = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxlora as jl
from jaxlora import distributed, profiling
from jaxlora import sharding as sh
from jaxlora.adapters import SHARED_KEY, adapter_nodes
from jaxlora.models import llama
from jaxlora.targets import stacked

pytestmark = pytest.mark.skipif(
    jax.device_count() != 8,
    reason="needs 8 devices: run through tests/test_sharding.py (sets XLA_FLAGS)",
)

CONFIG = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
)
STEPS = 5
BATCH, SEQ = 8, 16
TOL = dict(atol=1e-5, rtol=0)

MESHES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
# (kernel spec of q_proj, kernel spec of o_proj) per preset: the oracle for adapter specs
KERNEL_SPECS = {
    "dp": ((None, None), (None, None)),
    "fsdp": (("fsdp", None), (None, "fsdp")),
    "fsdp_tp": (("fsdp", "tensor"), ("tensor", "fsdp")),
}
METHODS = {
    "lora": dict(rank=4, alpha=8.0),
    "lora_fa": dict(rank=4, alpha=8.0),
    "vera": dict(rank=8),
    "dora": dict(rank=4, alpha=8.0),
    "delta_lora": dict(rank=4, alpha=8.0, lam=0.5, start_step=2),
    "lora_plus": dict(rank=4, alpha=8.0, ratio=4.0),
}
# The default run covers each kind of state once (the compiles are what costs); the whole
# matrix (-m slow) covers every method under every preset, scanned and not.
FAST = {
    ("lora", "fsdp", False),
    ("lora", "fsdp_tp", True),
    ("vera", "fsdp_tp", False),  # shared matrices, per-layer vectors
    ("delta_lora", "fsdp", True),  # the optimizer also moves the sharded base kernels
}
CASES = [
    pytest.param(m, p, s, marks=() if (m, p, s) in FAST else pytest.mark.slow)
    for m in METHODS
    for p in MESHES
    for s in (False, True)
]


def _config(scan: bool) -> llama.LlamaConfig:
    return dataclasses.replace(CONFIG, scan_layers=scan)


def _loss_fn(config):
    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    return loss_fn


def _batches():
    # one batch, seen every step, so that the loss visibly falls
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
    return [ids] * STEPS


def _spec(name, scan):
    # a scanned model's kernels are (L, d_in, d_out): their stack axis is said, not guessed
    targets = stacked("all-linear") if scan else "all-linear"
    return jl.recipe(name, targets=targets, **METHODS[name])


def _init_params(config):
    return functools.partial(llama.init_params, config=config)


@functools.cache
def _reference(name: str, scan: bool):
    """Losses, adapters and base params after STEPS unsharded steps on one device."""
    config = _config(scan)
    spec = _spec(name, scan)
    # jitted: eager init would compile dozens of tiny programs
    params = jax.jit(_init_params(config))(jax.random.key(0))
    adapters = jax.jit(spec.init)(jax.random.key(1), params)
    tx = spec.optimizer(optax.sgd, learning_rate=0.1, momentum=0.9)
    state = tx.init(adapters)
    step = jl.train_step(_loss_fn(config), tx, donate=False)
    losses = []
    for ids in _batches():
        params, adapters, state, metrics = step(params, adapters, state, jnp.asarray(ids))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(adapters), jax.device_get(params)


def _sharded(name: str, preset: str, scan: bool):
    config = _config(scan)
    spec = _spec(name, scan)
    run = sh.setup(
        _loss_fn(config),
        spec.optimizer(optax.sgd, learning_rate=0.1, momentum=0.9),
        # the base is initialised straight into its shards, as a real run would
        lambda: _init_params(config)(jax.random.key(0)),
        llama.partition_rules(preset),
        sh.make_mesh(MESHES[preset]),
        method=spec.method,
        key=jax.random.key(1),
    )
    params, adapters, state = run.params, run.adapters, run.opt_state
    losses = []
    for ids in _batches():
        params, adapters, state, metrics = run.step(params, adapters, state, run.put_batch(ids))
        losses.append(float(metrics["loss"]))
    shardings = (run.param_shardings, run.adapter_shardings, run.opt_state_shardings)
    return np.array(losses), params, adapters, state, shardings


def _assert_shardings(arrays, shardings):
    for x, s in zip(jax.tree_util.tree_leaves(arrays), jax.tree_util.tree_leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def _expected(node, kernel_spec, field):
    """The spec an adapter array must have, from the kernel spec (independent oracle)."""
    stack = (None,) * len(node.layout.stack_axes)
    k_in, k_out = kernel_spec
    vera = type(node).__name__.startswith("Vera")
    if field == "a":  # (stack, in, rank)
        return P(*stack, k_in, None)
    if field == "b":  # LoRA (stack, rank, out); VeRA's per-output vector (stack, out)
        return P(*stack, k_out) if vera else P(*stack, None, k_out)
    if field == "d":  # VeRA's per-rank vector
        return P(*stack, None)
    if field == "m":  # DoRA's per-output magnitude
        return P(*stack, k_out)
    raise AssertionError(f"no oracle for {type(node).__name__}.{field}")


@pytest.mark.parametrize("name, preset, scan", CASES)
def test_sharded_matches_single_device(name, preset, scan):
    ref_losses, ref_adapters, ref_params = _reference(name, scan)
    losses, params, adapters, state, (psh, ash, osh) = _sharded(name, preset, scan)

    np.testing.assert_allclose(losses, ref_losses, **TOL)
    got = jax.tree_util.tree_leaves(distributed.to_host(adapters))
    want = jax.tree_util.tree_leaves(ref_adapters)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)
    # the base too (Delta-LoRA moves its kernels; the others return it unchanged)
    for g, w in zip(
        jax.tree_util.tree_leaves(distributed.to_host(params)),
        jax.tree_util.tree_leaves(ref_params),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, **TOL)
    assert ref_losses[-1] < ref_losses[0]

    # the step keeps every array in the sharding it was derived for
    _assert_shardings(params, psh)
    _assert_shardings(adapters, ash)
    _assert_shardings(state, osh)

    # adapter specs against the kernel specs of the preset
    nodes = adapter_nodes(adapters)
    q_spec, o_spec = KERNEL_SPECS[preset]
    layer = "layers/" if scan else "layers/0/"
    for kernel, kspec in (("attn/q_proj", q_spec), ("attn/o_proj", o_spec)):
        node = nodes[f"{layer}{kernel}/kernel"]
        for field in node.ARRAYS:
            got_spec = getattr(node, field).sharding.spec
            assert got_spec == _expected(node, kspec, field), (kernel, field, got_spec)
    for x in jax.tree_util.tree_leaves(adapters.get(SHARED_KEY, {})):
        assert x.sharding.is_fully_replicated

    # optimizer state: every per-parameter array sits exactly like its adapter array
    by_path = {tuple(kp): x.sharding for kp, x in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    matched = 0
    for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        hits = [s for path, s in by_path.items() if tuple(kp)[-len(path) :] == path]
        if hits and x.ndim:
            assert x.sharding.is_equivalent_to(hits[0], x.ndim), (kp, x.sharding, hits[0])
            matched += 1
        else:
            assert x.sharding.is_fully_replicated, (kp, x.sharding)
    assert matched > 0


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fsdp_gathers_each_frozen_kernel_once(scan):
    """The train step all-gathers no base kernel beyond what the forward pass needs."""
    config = _config(scan)
    shapes = jax.eval_shape(_init_params(config), jax.random.key(0))
    loss_fn = _loss_fn(config)
    run = sh.setup(
        loss_fn,
        jl.optimizer(optax.sgd(0.1, momentum=0.9)),
        shapes,
        llama.partition_rules("fsdp"),
        sh.make_mesh(MESHES["fsdp"]),
        method=jl.lora(rank=4, targets=stacked("all-linear") if scan else "all-linear"),
        key=jax.random.key(1),
        abstract=True,
    )
    psh, ash, bsh, adapters = (
        run.param_shardings,
        run.adapter_shardings,
        run.batch_sharding,
        run.adapters,
    )
    batch = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    forward = jax.jit(jl.adapt(sh.gathered(loss_fn, psh, ("fsdp",))), in_shardings=(psh, ash, bsh))
    step_hlo = run.step.lower(shapes, adapters, run.opt_state, batch).compile().as_text()
    in_step = profiling.collectives(step_hlo)
    in_fwd = profiling.collectives(forward.lower(shapes, adapters, batch).compile().as_text())

    kernels = {tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes) if x.ndim >= 2}
    split = sum(  # base leaves stored split over fsdp, each needed whole by the forward
        1
        for s in jax.tree_util.tree_leaves(psh)
        if "fsdp" in jax.tree_util.tree_leaves(tuple(s.spec))
    )

    def kernel_gathers(cs):
        return [c for c in cs if c.op == "all-gather" and c.shapes[-1] in kernels]

    assert len(kernel_gathers(in_fwd)) == split
    if scan:
        # stacked kernels are gathered one layer at a time inside the layer loops (forward
        # and rematerialised backward), so the step gathers no whole stack; the unscanned
        # ones (embedding, head) once
        # (outside the loops: a layer's kernel, gathered squeezed, may share its shape with
        # an unscanned leaf here, e.g. down_proj (64, 32) and the embedding)
        top = "\n".join(ln for ln in step_hlo.splitlines() if "while/" not in ln)
        stacks = {tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes) if x.ndim == 3}
        n_stacked = len([x for x in jax.tree_util.tree_leaves(shapes) if x.ndim == 3])
        assert len(kernel_gathers(profiling.collectives(top))) == split - n_stacked
        assert not [c for c in in_step if c.op == "all-gather" and c.shapes[-1] in stacks]
        layer = {tuple(x.shape[1:]) for x in jax.tree_util.tree_leaves(shapes) if x.ndim == 3}
        assert layer <= {_unit_dropped(c.shapes[-1]) for c in in_step if c.op == "all-gather"}
    else:
        assert len(kernel_gathers(in_step)) == split
    # no kernel-sized reduction: the frozen base never gets a weight gradient
    reductions = [c for c in in_step if c.op in ("all-reduce", "reduce-scatter")]
    assert not [c for c in reductions if set(c.shapes) & kernels]


# ----------------------------------------------------------------------------- per layer

# Wide and shallow-batched, so that one layer's frozen weights dwarf its activations: the
# temp figures then tell a per-layer gather from a whole-stack one.
WIDE = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    scan_layers=True,
    remat=True,
)


def _compiled_step(config, method, per_layer):
    run = sh.setup(
        _loss_fn(config),
        jl.optimizer(optax.sgd(0.1, momentum=0.9)),
        jax.eval_shape(_init_params(config), jax.random.key(0)),
        llama.partition_rules("fsdp"),
        sh.make_mesh(MESHES["fsdp"]),
        method=method,
        key=jax.random.key(1),
        abstract=True,
        per_layer=per_layer,
    )
    batch = jax.ShapeDtypeStruct((BATCH, 8), jnp.int32)
    return run.step.lower(run.params, run.adapters, run.opt_state, batch).compile()


def _unit_dropped(shape: tuple[int, ...]) -> tuple[int, ...]:
    # a layer is gathered as (1, d_in, d_out) or, squeezed, as (d_in, d_out)
    return shape[1:] if shape[:1] == (1,) else shape


def _layer_bytes(config) -> int:
    """float32 bytes of one decoder layer's kernels, counted from the config (the oracle)."""
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    return 4 * (d * d + 2 * d * kv + d * d + 3 * d * f)


@pytest.mark.parametrize(
    "name",
    [
        "lora",
        pytest.param("dora", marks=pytest.mark.slow),
        pytest.param("vera", marks=pytest.mark.slow),
    ],
)
def test_scanned_fsdp_temp_grows_by_one_layer_not_the_stack(name):
    """Per-device temp memory, L=8 against L=2: less than one more layer gathered."""
    method = _spec(name, True).method

    def temp(layers, per_layer):
        config = dataclasses.replace(WIDE, num_layers=layers)
        return _compiled_step(config, method, per_layer).memory_analysis().temp_size_in_bytes

    layer = _layer_bytes(WIDE)
    grown = temp(8, True) - temp(2, True)
    assert grown < layer, (grown, layer)
    # the control: gathered whole at the top, the stack's six extra layers all show up
    assert temp(8, False) - temp(2, False) > 5 * layer


def test_scanned_fsdp_gathers_inside_the_layer_loop():
    """Every base kernel is all-gathered per layer (its unstacked shape), L times a step."""
    config = dataclasses.replace(WIDE, num_layers=4)
    compiled = _compiled_step(config, jl.lora(rank=4, targets=stacked("all-linear")), True)
    shapes = jax.eval_shape(_init_params(config), jax.random.key(0))
    stacks = {tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes["layers"]) if x.ndim == 3}
    one_layer = {s[1:] for s in stacks}
    gathers = [
        c.shapes[-1] for c in profiling.collectives(compiled.as_text()) if c.op == "all-gather"
    ]
    assert not stacks & set(gathers), "a whole stack was gathered"
    assert one_layer <= {_unit_dropped(g) for g in gathers}, (one_layer, gathers)
    # trip-count weighted: L per-layer gathers of each kernel (+ their A factors) a step,
    # at least as many bytes as the kernels of all L layers
    moved = profiling.collective_bytes(compiled.as_text())["all-gather"]
    assert moved >= config.num_layers * _layer_bytes(config)


def test_full_fine_tuning_scanned_per_layer_matches_single_device():
    """Full fine-tuning through per-layer gathers: the gradient is reduce-scattered per layer."""
    config = _config(True)
    method = jl.full(targets=".*")
    tx = jl.optimizer(optax.sgd(0.1, momentum=0.9))
    loss_fn = _loss_fn(config)
    params = jax.jit(_init_params(config))(jax.random.key(0))
    adapters = jax.jit(method.init)(jax.random.key(1), params)
    step = jl.train_step(loss_fn, tx, donate=False)
    ref, state = adapters, tx.init(adapters)
    ref_losses = []
    for ids in _batches():
        _, ref, state, metrics = step(params, ref, state, jnp.asarray(ids))
        ref_losses.append(float(metrics["loss"]))

    run = sh.setup(
        loss_fn,
        tx,
        params,
        llama.partition_rules("fsdp"),
        sh.make_mesh(MESHES["fsdp"]),
        adapters=adapters,
    )
    sparams, sad, sstate = run.params, run.adapters, run.opt_state
    losses = []
    for ids in _batches():
        sparams, sad, sstate, metrics = run.step(sparams, sad, sstate, run.put_batch(ids))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    for g, w in zip(
        jax.tree_util.tree_leaves(distributed.to_host(sad)), jax.tree_util.tree_leaves(ref)
    ):
        np.testing.assert_allclose(g, w, **TOL)
    assert ref_losses[-1] < ref_losses[0]


def test_bf16_stacks_gathered_per_layer_as_16_bits_match_single_device():
    """A bf16 base on CPU is sliced and gathered as its 16-bit payload: the same numbers.

    ``jaxlora.adapt`` bit-casts a scanned bf16 stack to uint16 on CPU, gathers each layer's
    bits and casts them back (XLA:CPU would otherwise hoist an f32 copy of every stack out
    of the loop); a bit-cast round trip is exact, so the step equals the unsharded one.
    """
    config = dataclasses.replace(_config(True), param_dtype="bfloat16")
    spec = _spec("lora", True)
    loss_fn = _loss_fn(config)
    params = jax.jit(_init_params(config))(jax.random.key(0))
    adapters = jax.jit(spec.init)(jax.random.key(1), params)
    tx = spec.optimizer(optax.sgd, learning_rate=0.1, momentum=0.9)
    step = jl.train_step(loss_fn, tx, donate=False)
    ref, state, ref_losses = adapters, tx.init(adapters), []
    for ids in _batches():
        _, ref, state, metrics = step(params, ref, state, jnp.asarray(ids))
        ref_losses.append(float(metrics["loss"]))

    run = sh.setup(
        loss_fn,
        tx,
        params,
        llama.partition_rules("fsdp"),
        sh.make_mesh(MESHES["fsdp"]),
        adapters=adapters,
        donate=False,
    )
    sparams, sad, sstate, sstep, bsh = (
        run.params,
        run.adapters,
        run.opt_state,
        run.step,
        run.batch_sharding,
    )
    losses = []
    for ids in _batches():
        _, sad, sstate, metrics = sstep(sparams, sad, sstate, run.put_batch(ids))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    for g, w in zip(
        jax.tree_util.tree_leaves(distributed.to_host(sad)), jax.tree_util.tree_leaves(ref)
    ):
        np.testing.assert_allclose(g, w, **TOL)
    assert ref_losses[-1] < ref_losses[0]
    # each layer's kernels are gathered as 16-bit integers, none as a float of any width
    hlo = sstep.lower(sparams, sad, sstate, distributed.put(_batches()[0], bsh)).compile()
    # (inside the layer loops: the embedding and head, gathered at the top, are f32 on CPU)
    lines = [ln for ln in hlo.as_text().splitlines() if " all-gather(" in ln and "while/" in ln]
    layer = {tuple(x.shape[1:]) for x in jax.tree_util.tree_leaves(params["layers"]) if x.ndim == 3}
    found = set()
    for ln in lines:
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", ln.split("all-gather(")[0]):
            shape = _unit_dropped(tuple(int(d) for d in dims.split(",") if d))
            if shape in layer:
                assert dtype == "u16", ln
                found.add(shape)
    assert found == layer, (found, layer)
