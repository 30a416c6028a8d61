"""Quantized bases on 8 fake CPU devices: shardings of codes and scales, training parity.

Not collected by the main suite: ``tests/test_quant.py`` runs it in its own pytest process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag only works before JAX
starts). A tiny Llama (2 layers, d=128, so NF4 blocks of 64 fall on shard boundaries when
an axis is split in two) trains a few SGD steps with LoRA on a quantized base, sharded
under the ``fsdp_tp`` preset, against the same quantized base on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxlora as jl
from jaxlora import distributed, profiling
from jaxlora import sharding as sh
from jaxlora.models import llama
from jaxlora.quant import QuantizedKernel
from jaxlora.targets import is_kernel_leaf, stacked

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices")

CONFIG = llama.LlamaConfig(
    vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2, scan_layers=True,
)  # fmt: skip
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STEPS = 3


def _params(kind):
    params = jax.jit(functools.partial(llama.init_params, config=CONFIG))(jax.random.key(0))
    return jl.quantize(params, targets=stacked("all-linear"), kind=kind)


def _loss_fn(params, ids):
    return llama.causal_lm_loss(llama.apply(params, ids, config=CONFIG), ids)


def _ids():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, CONFIG.vocab_size, size=(8, 16)).astype(np.int32))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_kernels_shard_like_their_float_version(kind):
    qparams = _params(kind)
    mesh = sh.make_mesh(MESH)
    rules = llama.partition_rules("fsdp_tp")
    float_specs = sh.param_specs(jl.dequantize(qparams), rules, mesh)
    specs = sh.param_specs(qparams, rules, mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_kernel_leaf)[0]
    ref = dict(jax.tree_util.tree_flatten_with_path(float_specs)[0])
    n = 0
    for kp, s in flat:
        if not isinstance(s, QuantizedKernel):
            assert s == ref[kp]
            continue
        n += 1
        kernel = ref[kp]
        # codes: exactly the kernel's spec; block scales too (int8's per-column scale,
        # one entry along the blocked axis, is replicated along it)
        assert s.data == kernel, (kp, s.data, kernel)
        expect_scale = P(*kernel[:-2], None, kernel[-1]) if kind == "int8" else kernel
        assert s.scale == expect_scale, (kp, s.scale, kernel)
    assert n == 7  # q, k, v, o, gate, up, down (stacked)
    psh = sh.param_shardings(qparams, rules, mesh)
    placed = distributed.put(qparams, psh)
    for x, s in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(psh)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_split_inside_a_block_is_an_error():
    qparams = _params("nf4")
    mesh = jax.sharding.AbstractMesh((8,), ("fsdp",))
    with pytest.raises(sh.ShardingError, match=r"layers/attn/k_proj/kernel.*cuts blocks"):
        sh.param_specs(qparams, [(r".*_proj/kernel", P("fsdp", None)), (".*", P())], mesh)


@pytest.mark.parametrize(
    "kind, mesh_shape, preset",
    [("nf4", MESH, "fsdp_tp"), ("int8", {"fsdp": 8}, "fsdp")],
)
def test_sharded_lora_on_quantized_base_matches_one_device(kind, mesh_shape, preset):
    """Per-layer gathers of packed codes (scanned, FSDP) train exactly as one device does."""
    qparams = _params(kind)
    method = jl.lora(rank=4, targets=stacked("all-linear"))
    tx = jl.optimizer(optax.sgd(0.1, momentum=0.9))

    # one device
    adapters = method.init(jax.random.key(1), qparams)
    state = tx.init(adapters)
    step = jl.train_step(_loss_fn, tx, donate=False)
    ref = []
    for _ in range(STEPS):
        _, adapters, state, m = step(qparams, adapters, state, _ids())
        ref.append(float(m["loss"]))
    ref_adapters = jax.device_get(adapters)

    mesh = sh.make_mesh(mesh_shape)
    psh = sh.param_shardings(qparams, llama.partition_rules(preset), mesh)
    params = distributed.put(qparams, psh)
    ad = sh.init_adapters(method, jax.random.key(1), params, psh)
    ash = sh.adapter_shardings(ad, psh)
    osh = sh.opt_state_shardings(tx, ad, ash)
    st = sh.init_opt_state(tx, ad, ash)
    bsh = sh.batch_sharding(mesh)
    sstep = sh.sharded_train_step(
        _loss_fn, tx, param_shardings=psh, adapter_shardings=ash, opt_state_shardings=osh,
        batch_sharding=bsh,
    )  # fmt: skip
    losses = []
    for _ in range(STEPS):
        params, ad, st, m = sstep(params, ad, st, distributed.put(_ids(), bsh))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0)
    got = jax.tree_util.tree_leaves(distributed.to_host(ad))
    for g, w in zip(got, jax.tree_util.tree_leaves(ref_adapters), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    assert ref[-1] < ref[0]

    # FSDP gathers the packed codes and scales, never a float copy of a quantized kernel,
    # and one layer of them at a time: no gather has a whole stack's shape
    hlo = sstep.lower(params, ad, st, distributed.put(_ids(), bsh)).compile().as_text()
    kernels = [
        x for x in jax.tree_util.tree_leaves(qparams, is_leaf=is_kernel_leaf)
        if isinstance(x, QuantizedKernel)
    ]  # fmt: skip
    floats = {tuple(x.shape) for x in kernels}
    gathers = [c for c in profiling.collectives(hlo) if c.op == "all-gather"]
    assert gathers and not [c for c in gathers if set(c.shapes) & floats], gathers
    # per-device shapes of the codes gathered over fsdp (tensor stays split): whole stacks
    # must not appear, one layer of every quantized kernel must
    qsh = [
        x for x in jax.tree_util.tree_leaves(psh, is_leaf=is_kernel_leaf)
        if isinstance(x, QuantizedKernel)
    ]  # fmt: skip

    def local(s, shape):
        spec = [None if e == "fsdp" else e for e in s.data.spec]
        spec = spec[len(spec) - len(shape) :]
        return jax.sharding.NamedSharding(mesh, P(*spec)).shard_shape(shape)

    stacks = {local(s, q.data.shape) for q, s in zip(kernels, qsh, strict=True)}
    layers = {local(s, q.data.shape[1:]) for q, s in zip(kernels, qsh, strict=True)}
    # a layer's codes are gathered with or without its unit stack axis
    shapes = {c.shapes[-1][1:] if c.shapes[-1][:1] == (1,) else c.shapes[-1] for c in gathers}
    assert not stacks & {c.shapes[-1] for c in gathers}, "a whole stack of codes was gathered"
    assert layers <= shapes, (layers, shapes)


# Wide and shallow-batched, so one layer's codes dwarf its activations (as for float in
# tests/_sharded_cases.py); NF4 blocks of 32 so that fsdp=8 splits d_in=256 on blocks.
WIDE = dataclasses.replace(
    CONFIG, hidden_size=256, intermediate_size=512, num_layers=2, remat=True
)  # fmt: skip


def _quantized_shapes(config, kind):
    def init():
        params = llama.init_params(jax.random.key(0), config=config)
        block = 32 if kind == "nf4" else None
        return jl.quantize(params, targets=stacked("all-linear"), kind=kind, block=block)

    return jax.eval_shape(init)


def _compiled(config, kind, per_layer):
    shapes = _quantized_shapes(config, kind)
    mesh = sh.make_mesh({"fsdp": 8})
    psh = sh.param_shardings(shapes, llama.partition_rules("fsdp"), mesh)
    method = jl.lora(rank=4, targets=stacked("all-linear"))
    adapters = jax.eval_shape(method.init, jax.random.key(1), shapes)
    ash = sh.adapter_shardings(adapters, psh)
    tx = jl.optimizer(optax.sgd(0.1, momentum=0.9))

    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    step = sh.sharded_train_step(
        loss_fn, tx, param_shardings=psh, adapter_shardings=ash,
        opt_state_shardings=sh.opt_state_shardings(tx, adapters, ash),
        batch_sharding=sh.batch_sharding(mesh), per_layer=per_layer,
    )  # fmt: skip
    batch = jax.ShapeDtypeStruct((8, 8), jnp.int32)
    return step.lower(shapes, adapters, jax.eval_shape(tx.init, adapters), batch).compile()


def _layer_code_bytes(shapes, layers) -> int:
    """Bytes of one layer's codes and scales (all quantized stacks), the gathered unit."""
    total = 0
    for q in jax.tree_util.tree_leaves(shapes, is_leaf=is_kernel_leaf):
        if isinstance(q, QuantizedKernel):
            for x in jax.tree_util.tree_leaves(q):
                assert x.shape[0] == layers
                total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total // layers


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_scanned_fsdp_quantized_temp_grows_by_one_layer_not_the_stack(kind):
    """Per-device temp memory, L=8 against L=2: less than one more layer of codes gathered."""

    def temp(layers, per_layer):
        config = dataclasses.replace(WIDE, num_layers=layers)
        return _compiled(config, kind, per_layer).memory_analysis().temp_size_in_bytes

    layer = _layer_code_bytes(_quantized_shapes(WIDE, kind), WIDE.num_layers)
    grown = temp(8, True) - temp(2, True)
    assert grown < layer, (grown, layer)
    # the control: codes gathered whole at the top, the six extra layers all show up
    assert temp(8, False) - temp(2, False) > 5 * layer
