"""Tests for jaxlora.quant: the quantized kernel formats.

Oracles: a numpy dequantizer written here from the format descriptions (the NF4 code book
typed in from the QLoRA paper, Appendix E, and checked against the normal quantiles it is
built from), and each format's own error bound on random and real (MiniLM, SmolLM2) weights.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _model_fixtures import require_asset
from jl_testing import randomize

import jaxlora as jl
from jaxlora import quant
from jaxlora.targets import is_kernel_leaf, match, path_str, select
from jaxlora.train import join_trainable, split_trainable

# QLoRA (Dettmers et al. 2023), Appendix E: the NF4 data type, code 0..15.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_book_is_the_papers_normal_quantiles():
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(PAPER_NF4, np.float32))
    # QLoRA §3: 8 positive and 7 negative quantiles of N(0, 1) at offset 0.9677, normalised
    n, offset = statistics.NormalDist(), 0.9677083
    pos = [n.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-n.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.asarray([*pos, 0.0, *neg]))
    np.testing.assert_allclose(values / np.abs(values).max(), PAPER_NF4, atol=1e-6)


# ----------------------------------------------------------------------------- numpy oracle


def _np_unpack(data: np.ndarray, ax: int) -> np.ndarray:
    data = np.moveaxis(np.asarray(data), ax, 0)
    codes = np.empty((2 * data.shape[0], *data.shape[1:]), np.int64)
    codes[0::2] = data & 0x0F
    codes[1::2] = data >> 4
    return np.moveaxis(codes, 0, ax)


def _np_repeat(x: np.ndarray, block: int, ax: int) -> np.ndarray:
    return np.repeat(np.asarray(x, np.float64), block, axis=ax)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


def np_dequantize(q: jl.QuantizedKernel) -> np.ndarray:
    """Dequantization from the format description: each operation float32-rounded.

    Products and sums are formed exactly in float64 (all operands are float32 or small
    integers) and rounded once to float32, which is what float32 arithmetic defines.
    """
    ax = q.axis % q.ndim
    if q.kind == "int8":
        return _f32(np.asarray(q.data, np.float64) * np.asarray(q.scale, np.float64))
    codes = _np_unpack(q.data, ax)
    if q.kind == "nf4":
        absmax = np.asarray(q.scale, np.float64)
        if q.group:  # int8 code * group step + group mean, one fused multiply-add
            prod = absmax * _np_repeat(q.scale_scale, q.group, ax)
            absmax = _f32(prod + _np_repeat(q.scale_offset, q.group, ax))
        values = np.asarray(PAPER_NF4, np.float64)[codes]
        return _f32(values * _np_repeat(absmax, q.block, ax))
    d = _np_repeat(np.asarray(q.scale, np.float32), q.block, ax)
    m = _np_repeat(np.asarray(q.offset, np.float32), q.block, ax)
    return _f32(_f32(codes * d) + m)


CASES = [  # shape, blocked axis
    ((256, 24), -2),
    ((3, 128, 16), -2),  # scanned (L, d_in, d_out)
    ((4, 64, 8), -2),  # DenseGeneral (heads, head_dim, d) output projection, last in axis
    ((64, 4, 8), -3),  # DenseGeneral (d, heads, head_dim) input projection
]
KINDS = [("int8", False), ("nf4", False), ("nf4", True), ("q4_1", False)]


def _random(shape, seed=0):
    w = jax.random.normal(jax.random.key(seed), shape) * 0.05
    # heavy-tailed outliers, as real weights have, so blocks differ in scale
    return w * (1 + 20 * (jax.random.uniform(jax.random.key(seed + 1), shape) > 0.995))


@pytest.mark.parametrize("kind,dq", KINDS)
@pytest.mark.parametrize("shape,axis", CASES)
def test_dequantize_equals_numpy_reference(kind, dq, shape, axis):
    q = quant.quantize_kernel(_random(shape), kind=kind, axis=axis, double_quant=dq)
    assert q.shape == shape and q.dtype == jnp.float32
    out = jax.jit(quant.QuantizedKernel.dequantize)(q)
    ref = np_dequantize(q)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_packing_layout_and_memory():
    w = jnp.arange(128, dtype=jnp.float32).reshape(128, 1) - 64.0
    q = quant.quantize_kernel(w, kind="nf4")
    codes = _np_unpack(q.data, 0)[:, 0]
    # element 2i is the low nibble of byte i: codes follow w's order (monotone in w)
    assert np.all(np.diff(codes[:64]) >= 0) and np.all(np.diff(codes[64:]) >= 0)
    assert q.data.dtype == jnp.uint8 and q.data.shape == (64, 1)
    big = quant.quantize_kernel(jnp.ones((1024, 512)), kind="nf4", double_quant=True)
    # 4 bits per weight plus 8-bit scales per 64 and a float32 pair per group of 16 blocks
    assert big.nbytes == 1024 * 512 // 2 + (1024 // 64) * 512 + 2 * 4 * 512


def _np_nf4_bound(w, q, absmax):
    ax = q.axis % q.ndim
    gaps = np.diff(quant.NF4_CODE.astype(np.float64)) / 2
    return _np_repeat(absmax, q.block, ax) * gaps.max()


def check_round_trip(w, q):
    """|W - dequant(quant(W))| within the format's bound, element-wise."""
    w = np.asarray(w, np.float64)
    err = np.abs(np.asarray(q.dequantize(), np.float64) - w)
    ax = q.axis % q.ndim
    eps = 4 * np.finfo(np.float32).eps * np.abs(w).max()  # float32 arithmetic
    if q.kind == "int8":
        bound = _np_repeat(q.scale, q.block, ax) / 2
    elif q.kind == "nf4":
        wb = np.moveaxis(w, ax, 0)
        wb = wb.reshape(wb.shape[0] // q.block, q.block, *wb.shape[1:])
        absmax = np.moveaxis(np.abs(wb).max(axis=1), 0, ax)
        bound = _np_nf4_bound(w, q, absmax)
        if q.group:  # the stored absmax is off by at most half a step of its int8 code
            step = _np_repeat(q.scale_scale, q.group, ax) / 2
            bound = bound + _np_repeat(step, q.block, ax) * 1.0
        # and the chosen code is the nearest one to w / absmax (up to float32 rounding)
        if not q.group:
            x = w / np.where(
                _np_repeat(absmax, q.block, ax) > 0, _np_repeat(absmax, q.block, ax), 1
            )
            dist = np.abs(x[..., None] - quant.NF4_CODE.astype(np.float64))
            chosen = np.take_along_axis(dist, _np_unpack(q.data, ax)[..., None], -1)[..., 0]
            assert np.all(chosen <= dist.min(-1) + 1e-6)
    else:
        bound = _np_repeat(np.asarray(q.scale, np.float32), q.block, ax) / 2
    assert np.all(err <= bound + eps), float(np.max(err - bound))
    return float(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(w**2)))


@pytest.mark.parametrize("kind,dq", KINDS)
@pytest.mark.parametrize("shape,axis", CASES)
def test_round_trip_within_format_bound(kind, dq, shape, axis):
    w = _random(shape, seed=3)
    check_round_trip(w, quant.quantize_kernel(w, kind=kind, axis=axis, double_quant=dq))


def test_quantize_tree_targets_and_errors():
    params = {
        "a": {"kernel": _random((128, 8))},
        "b": {"kernel": _random((128, 8)), "bias": jnp.zeros(8)},
    }
    q = jl.quantize(params, targets="a/kernel", kind="int8")
    assert isinstance(q["a"]["kernel"], jl.QuantizedKernel)
    assert q["b"]["kernel"] is params["b"]["kernel"]
    # target selection sees the node as one kernel leaf of its logical shape
    layout = select(q, ".*kernel")["a/kernel"]
    assert layout.shape == (128, 8) and layout.dtype == "float32"
    # re-quantizing leaves quantized kernels alone; dequantize restores float leaves
    assert jl.quantize(q, targets=".*kernel")["a"]["kernel"] is q["a"]["kernel"]
    back = jl.dequantize(q)
    assert back["a"]["kernel"].dtype == jnp.float32 and back["a"]["kernel"].shape == (128, 8)
    with pytest.raises(jl.TargetError, match=r"'odd/kernel' with shape \(100, 8\)"):
        jl.quantize({"odd": {"kernel": jnp.ones((100, 8))}}, targets=".*kernel")
    with pytest.raises(jl.TargetError, match="matched no leaf"):
        jl.quantize(params, targets="nothing")
    with pytest.raises(ValueError, match="unknown quantization kind 'nf3'"):
        jl.quantize(params, targets="a/kernel", kind="nf3")
    with pytest.raises(ValueError, match="double quantization is defined for 'nf4' only"):
        jl.quantize(params, targets="a/kernel", kind="int8", double_quant=True)


def test_bfloat16_kernel_keeps_its_logical_dtype():
    w = _random((128, 8)).astype(jnp.bfloat16)
    q = quant.quantize_kernel(w, kind="nf4")
    assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16


def test_round_trip_on_minilm_weights():
    from jaxlora.models import loaders

    _, params = loaders.load_bert_safetensors(require_asset("minilm"))
    for kind, dq in KINDS:
        q = jl.quantize(params, targets="all-linear", kind=kind, double_quant=dq)
        kernels = {
            path_str(kp): x
            for kp, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=is_kernel_leaf)[0]
            if isinstance(x, jl.QuantizedKernel)
        }
        assert len(kernels) == 36  # 6 layers x (q, k, v, o, intermediate, output)
        flat = dict(match(params, "all-linear"))
        for path, qk in list(kernels.items())[:6]:  # layer 0: one kernel of each kind
            check_round_trip(flat[path][1], qk)


@pytest.mark.slow
def test_round_trip_on_smollm2_weights():
    from jaxlora.models import loaders

    _, params = loaders.load_llama_gguf(require_asset("smollm2"), scan_layers=True)
    q = jl.quantize(params, targets="all-linear", kind="nf4", double_quant=True)
    flat = dict(match(params, "all-linear"))
    qflat = dict(match(q, "all-linear"))
    for path, (_, w) in flat.items():
        check_round_trip(w, qflat[path][1])


# ------------------------------------------------------------------- adapt on a quantized base

_QK = jax.random.split(jax.random.key(7), 8)
QPARAMS = {
    "inp": {"kernel": jax.random.normal(_QK[0], (64, 128)) * 0.2},
    "layers": {"kernel": jax.random.normal(_QK[1], (3, 128, 128)) * 0.1},  # scanned
    "frozen": {"kernel": jax.random.normal(_QK[2], (3, 128, 128)) * 0.1},  # scanned, no adapter
    "out": {"kernel": jax.random.normal(_QK[3], (2, 64, 64)) * 0.1},  # DenseGeneral (h, k) -> d
    "bias": jnp.zeros((128,)),
}
QTARGETS = [
    jl.Target(r"inp/kernel"),
    jl.Target(r"layers/kernel", stack_axes=(0,)),
    jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(2,)),
]
QBATCH = {
    "x": jax.random.normal(_QK[4], (6, 64)),
    "y": jax.random.normal(_QK[5], (6, 64)),
}
METHOD_KWARGS = {
    "lora": dict(rank=4, alpha=8.0),
    "rslora": dict(rank=4, alpha=8.0),
    "lora_fa": dict(rank=4, alpha=8.0),
    "vera": dict(rank=8),
    "dora": dict(rank=4, alpha=8.0),
    "lora_plus": dict(rank=4, alpha=8.0, ratio=4.0),
}
FORMATS = [("nf4", True), ("int8", False), ("q4_1", False)]


def qmodel(p, x):
    h = jnp.tanh(x @ p["inp"]["kernel"] + p["bias"])

    def layer(h, ws):
        w, f = ws
        return jnp.tanh(h @ w) + 0.5 * jnp.tanh(h @ f), None

    h, _ = jax.lax.scan(layer, h, (p["layers"]["kernel"], p["frozen"]["kernel"]))
    return jnp.einsum("bhk,hkd->bd", h.reshape(-1, 2, 64), p["out"]["kernel"])


def qloss(p, batch):
    return jnp.mean((qmodel(p, batch["x"]) - batch["y"]) ** 2)


def _quantized(kind, dq):
    # blocks along each kernel's input axis; (h, k) -> d blocks along k
    spec = [
        jl.Target("out/kernel", in_axes=(0, 1), out_axes=(2,)),
        jl.Target("inp/kernel"),
        jl.Target("(layers|frozen)/kernel", stack_axes=(0,)),
    ]
    block = 32 if kind == "nf4" else None  # k = 64: two blocks per column
    return jl.quantize(QPARAMS, targets=spec, kind=kind, block=block, double_quant=dq)


def _perturbed(adapters, key):
    return randomize(adapters, key)


def _check_value_and_grad(fn, qparams, adapters, *args):
    """adapt(fn) on the quantized base == fn(merge(dequantize(base), adapters))."""
    trainable, frozen = split_trainable(adapters, adapters)
    float_base = jl.dequantize(qparams)

    @jax.jit
    def adapted(t):
        return jax.value_and_grad(lambda t: jl.adapt(fn, strict=True)(qparams, join(t), *args))(t)

    @jax.jit
    def merged(t):
        return jax.value_and_grad(lambda t: fn(jl.merge(float_base, join(t)), *args))(t)

    join = lambda t: join_trainable(t, frozen)
    (v, g), (ve, ge) = adapted(trainable), merged(trainable)
    np.testing.assert_allclose(v, ve, rtol=1e-5)
    leaves, ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ge)
    assert len(leaves) == len(ref) > 0
    for a, b in zip(leaves, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)  # composed: scan + tanh chain


@pytest.mark.parametrize("kind,dq", FORMATS)
@pytest.mark.parametrize("name", sorted(METHOD_KWARGS))
def test_adapt_on_quantized_base_equals_merged_dequantized(name, kind, dq):
    qparams = _quantized(kind, dq)
    spec = jl.recipe(name, targets=QTARGETS, **METHOD_KWARGS[name])
    adapters = _perturbed(spec.init(jax.random.key(1), qparams), jax.random.key(2))
    out = jax.jit(jl.adapt(qmodel, strict=True))(qparams, adapters, QBATCH["x"])
    ref = qmodel(jl.merge(jl.dequantize(qparams), adapters), QBATCH["x"])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    _check_value_and_grad(qloss, qparams, adapters, QBATCH)
    report = jl.adapt_report(qmodel, qparams, adapters, QBATCH["x"])
    assert report.all_fast, report
    assert set(report.targets) == {"inp/kernel", "layers/kernel", "out/kernel"}


def _float_arrays(jaxpr, shape):
    """Top-level (not inside scan/remat bodies) float values of ``shape`` in a jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = v.aval
            if getattr(aval, "shape", None) == shape and jnp.issubdtype(aval.dtype, jnp.floating):
                found.append(eqn.primitive.name)
    return found


def test_stacked_quantized_kernels_are_dequantized_per_layer_only():
    qparams = _quantized("nf4", True)
    adapters = _perturbed(
        jl.lora(rank=4, targets=QTARGETS).init(jax.random.key(1), qparams), jax.random.key(2)
    )
    trainable, frozen = split_trainable(adapters, adapters)
    f = lambda t: jl.adapt(qloss)(qparams, join_trainable(t, frozen), QBATCH)
    closed = jax.make_jaxpr(jax.grad(f))(trainable)
    # no float (L, d, d) stack anywhere outside the scan: neither a dequantized copy nor
    # a saved residual of one; the merged reference has both
    assert _float_arrays(closed.jaxpr, (3, 128, 128)) == []
    ref = lambda t: qloss(jl.merge(jl.dequantize(qparams), join_trainable(t, frozen)), QBATCH)
    assert _float_arrays(jax.make_jaxpr(jax.grad(ref))(trainable).jaxpr, (3, 128, 128))


def test_untargeted_quantized_kernels_are_not_reported_nor_merged():
    qparams = _quantized("int8", False)
    adapters = jl.lora(rank=2, targets="inp/kernel").init(jax.random.key(1), qparams)
    report = jl.adapt_report(qmodel, qparams, adapters, QBATCH["x"])
    assert report.targets == ("inp/kernel",) and report.all_fast, report
    # strict mode does not object to a quantized kernel used outside a matmul
    params = {"emb": jl.quantize({"e": jnp.ones((64, 4))}, targets="e", kind="int8")["e"]}
    out = jl.adapt(lambda p: jnp.sin(p["emb"]).sum(), strict=True)(params, {})
    np.testing.assert_allclose(out, 64 * 4 * np.sin(1.0), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHOD_KWARGS))
def test_training_on_quantized_base_equals_training_on_its_dequantized_copy(name):
    qparams = _quantized("nf4", True)
    float_base = jl.dequantize(qparams)
    spec = jl.recipe(name, targets=QTARGETS, **METHOD_KWARGS[name])
    adapters = _perturbed(spec.init(jax.random.key(1), qparams), jax.random.key(2))
    tx = spec.optimizer(optax.adam, learning_rate=1e-2)
    step = jl.train_step(qloss, tx, donate=False)
    runs = []
    for base in (qparams, float_base):
        p, a, state = base, adapters, tx.init(adapters)
        for _ in range(2):
            p, a, state, metrics = step(p, a, state, QBATCH)
        runs.append((a, float(metrics["loss"])))
        # the frozen base is passed through untouched
        jax.tree_util.tree_map(np.testing.assert_array_equal, p, base)
    (aq, lq), (af, lf) = runs
    np.testing.assert_allclose(lq, lf, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(aq), jax.tree_util.tree_leaves(af), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_delta_lora_refuses_quantized_targets_and_runs_on_dequantized_ones():
    qparams = _quantized("nf4", True)
    spec = jl.recipe("delta_lora", targets=QTARGETS, rank=4, alpha=8.0, lam=0.5, start_step=0)
    adapters = _perturbed(spec.init(jax.random.key(1), qparams), jax.random.key(2))
    tx = spec.optimizer(optax.adam, learning_rate=1e-2)
    step = jl.train_step(qloss, tx, donate=False)
    with pytest.raises(ValueError, match=r"targeted kernels \['inp/kernel', 'layers/kernel'"):
        step(qparams, adapters, tx.init(adapters), QBATCH)
    # the documented way: the moving kernels float, the untargeted one stays quantized
    mixed = jl.dequantize(qparams, targets=QTARGETS)
    assert isinstance(mixed["frozen"]["kernel"], jl.QuantizedKernel)
    runs = []
    for base in (mixed, jl.dequantize(qparams)):
        p, a, state = base, adapters, tx.init(adapters)
        for _ in range(2):
            p, a, state, _ = step(p, a, state, QBATCH)
        runs.append(p)
    pm, pf = runs
    assert isinstance(pm["frozen"]["kernel"], jl.QuantizedKernel)
    np.testing.assert_array_equal(pm["frozen"]["kernel"].data, qparams["frozen"]["kernel"].data)
    for path in ("inp", "layers", "out"):
        np.testing.assert_allclose(pm[path]["kernel"], pf[path]["kernel"], atol=1e-6)
        assert not np.allclose(pm[path]["kernel"], mixed[path]["kernel"])  # W moved


def test_merge_on_quantized_base_returns_float_weights():
    qparams = _quantized("nf4", True)
    adapters = _perturbed(
        jl.lora(rank=4, targets=QTARGETS).init(jax.random.key(1), qparams), jax.random.key(2)
    )
    merged = jl.merge(qparams, adapters)
    leaves = jax.tree_util.tree_leaves(merged)
    assert all(x.dtype == jnp.float32 for x in leaves)
    expect = jl.merge(jl.dequantize(qparams), adapters)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, expect)


# ----------------------------------------------------------------------------- sharding


def test_sharded_quantized_cases():
    """Codes and scales shard like the kernel; sharded QLoRA == one device (8 fake CPUs)."""
    here = pathlib.Path(__file__).parent
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", str(here / "_quant_sharded_cases.py")]
    proc = subprocess.run(
        cmd, env=env, cwd=here.parent, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# --------------------------------------------------------- numpy quantizer (the loaders')


@pytest.mark.parametrize("kind,dq", KINDS)
def test_numpy_quantizer_agrees_with_jax_numpy(kind, dq):
    """Host arrays quantize with numpy; jax arrays with XLA, whose fused division may be an
    ulp off IEEE's, so a value on a code boundary may land one code away, rarely."""
    w = np.asarray(_random((576, 384)))
    a = quant.quantize_kernel(w, kind=kind, double_quant=dq)
    b = quant.quantize_kernel(jnp.asarray(w), kind=kind, double_quant=dq)
    assert isinstance(a.data, np.ndarray) and not isinstance(b.data, np.ndarray)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for f in ("scale", "offset", "scale_scale", "scale_offset"):
        x, y = getattr(a, f), getattr(b, f)
        if x is not None:
            if x.dtype == np.int8:  # double-quantized scale codes: ties only
                assert np.mean(x != np.asarray(y)) < 1e-3
            else:
                np.testing.assert_array_equal(x, np.asarray(y))
    ca = np.asarray(quant._unpack(jnp.asarray(a.data), 0)).astype(int)
    cb = np.asarray(quant._unpack(b.data, 0)).astype(int)
    if kind == "int8":
        ca, cb = a.data.astype(int), np.asarray(b.data).astype(int)
    assert np.max(np.abs(ca - cb)) <= 1 and np.mean(ca != cb) < 1e-4


# ------------------------------------------------------------ quantized embedding tables


def _tiny_llama(tied):
    from jaxlora.models import llama

    c = llama.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=192,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        tie_embeddings=tied,
        scan_layers=True,
        remat=True,
    )
    p = llama.init_params(jax.random.key(3), c)
    q = jl.quantize(p, targets=jl.targets.stacked("all-linear"), kind="nf4", double_quant=True)
    q["embed"]["embedding"] = quant.quantize_kernel(
        p["embed"]["embedding"], kind="nf4", axis=-1, double_quant=True
    )
    ids = jax.random.randint(jax.random.key(4), (2, 12), 0, c.vocab_size)

    def loss(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=c), ids)

    return c, q, ids, loss


def _all_float_shapes(jaxpr):
    """Shapes of every float value in a jaxpr and its sub-jaxprs (scan, remat, jit bodies)."""
    out = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if jnp.issubdtype(v.aval.dtype, jnp.floating):
                out.append(tuple(v.aval.shape))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _all_float_shapes(inner)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_quantized_embedding_under_adapt_equals_merged_dequantized(name, tied):
    _, qparams, ids, loss = _tiny_llama(tied)
    kw = {"vera": dict(rank=8)}.get(name, dict(rank=4, alpha=8.0))
    spec = jl.recipe(name, targets=jl.targets.stacked("all-linear"), **kw)
    adapters = _perturbed(spec.init(jax.random.key(1), qparams), jax.random.key(2))
    _check_value_and_grad(loss, qparams, adapters, ids)


def test_quantized_embedding_lookup_gathers_rows_of_codes():
    c, qparams, ids, loss = _tiny_llama(tied=False)
    adapters = jl.lora(rank=4, targets=jl.targets.stacked("all-linear")).init(
        jax.random.key(1), qparams
    )
    trainable, frozen = split_trainable(adapters, adapters)
    f = lambda t: jl.adapt(loss)(qparams, join_trainable(t, frozen), ids)
    table = (c.vocab_size, c.hidden_size)
    # untied: the table is only looked up, so no float copy of it exists anywhere
    assert table not in _all_float_shapes(jax.make_jaxpr(jax.grad(f))(trainable).jaxpr)
    ref = lambda t: loss(jl.merge(jl.dequantize(qparams), join_trainable(t, frozen)), ids)
    assert table in _all_float_shapes(jax.make_jaxpr(jax.grad(ref))(trainable).jaxpr)


def test_gather_rows_equals_gathering_the_dequantized_table():
    from jax import lax

    table = _random((10, 128))
    for kind, dq in KINDS:
        q = quant.quantize_kernel(table, kind=kind, axis=-1, double_quant=dq)
        ids = jnp.array([[3, 0, 9], [11, -1, 2]])  # 11 is out of range, -1 too
        dense = q.dequantize()
        dn = lax.GatherDimensionNumbers(
            offset_dims=(2,), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        for mode in (lax.GatherScatterMode.FILL_OR_DROP, lax.GatherScatterMode.CLIP):
            params = dict(
                dimension_numbers=dn,
                slice_sizes=(1, 128),
                mode=mode,
                fill_value=None,
                indices_are_sorted=False,
                unique_indices=False,
            )
            got = quant.gather_rows(q, ids[..., None], **params)
            want = lax.gather(dense, ids[..., None], **params)
            np.testing.assert_array_equal(got, want)  # NaN rows where out of range
        # a gather that slices the blocked axis is not a row lookup: None (dequantize)
        cols = lax.GatherDimensionNumbers(
            offset_dims=(0,), collapsed_slice_dims=(1,), start_index_map=(1,)
        )
        assert (
            quant.gather_rows(
                q, ids[0, :, None], **{**params, "dimension_numbers": cols, "slice_sizes": (10, 1)}
            )
            is None
        )
