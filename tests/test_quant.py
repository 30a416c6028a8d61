"""Tests for jaxlora.quant: the quantized kernel formats.

Oracles: a numpy dequantizer written here from the format descriptions (the NF4 code book
typed in from the QLoRA paper, Appendix E, and checked against the normal quantiles it is
built from), and each format's own error bound on random and real (MiniLM, SmolLM2) weights.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import require_asset

import jaxlora as jl
from jaxlora import quant
from jaxlora.targets import is_kernel_leaf, match, path_str, select

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
