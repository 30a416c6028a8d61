"""Quantized frozen kernels (QLoRA): int8 per-channel, NF4 and GGUF Q4_1, kept packed.

A :class:`QuantizedKernel` is a pytree node that stands for one kernel leaf. Its children
are the packed codes and the per-block scales (what is stored, sharded and checkpointed);
its static aux data is the format, the block size, the blocked axis and the logical dtype.
Every child keeps the kernel's axes in the kernel's order, with only the *blocked axis*
shortened (codes: two 4-bit values per byte; scales: one per block), so slicing a stacked
``(L, d_in, d_out)`` kernel per layer (``scan``) or sharding it by a kernel's
``PartitionSpec`` acts on every child alike, and the logical shape is read off the codes.

Blocks run along the kernel's (last) input axis, as bitsandbytes' blocks run along the
rows of a torch ``(out, in)`` weight and GGUF's along ``ne0``:

* ``"int8"``: one absmax scale per output channel (the whole input axis is one block),
  ``W ≈ q · absmax/127``.
* ``"nf4"``: QLoRA's 4-bit NormalFloat, blocks of 64, ``W ≈ NF4[q] · absmax``; with
  ``double_quant`` the float32 absmax values are themselves quantized to int8 (centred on
  their group mean, one float32 scale per group of up to 256 scales, as in QLoRA §3).
* ``"q4_1"``: llama.cpp's Q4_1, blocks of 32, ``W ≈ q · d + m`` with float16 ``d``, ``m``;
  loaded straight from GGUF files (:func:`jaxlora.models.loaders.load_llama_gguf`).

:func:`jaxlora.targets.select` sees a quantized kernel as a kernel leaf of its logical
shape and dtype, so methods initialise on a quantized tree unchanged. Under
:func:`jaxlora.adapt` each quantized kernel is dequantized where it is used (inside the
layer, per scan step, recomputed in the backward pass rather than saved), never for the
whole model; :func:`jaxlora.merge` returns float weights.

References:
  Dettmers et al., 2023, QLoRA: Efficient Finetuning of Quantized LLMs,
  https://arxiv.org/abs/2305.14314.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.targets import TargetError, TargetsLike, is_kernel_leaf, match, path_str

__all__ = [
    "KINDS",
    "NF4_CODE",
    "QuantizedKernel",
    "dequantize",
    "gather_rows",
    "quantize",
    "quantize_kernel",
]

KINDS = ("int8", "nf4", "q4_1")
"""The supported formats."""

# The 16 NF4 values (QLoRA, Appendix E): quantiles of N(0, 1) normalised to [-1, 1], with
# an exact zero; 7 negative and 8 positive levels.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The NF4 code book (QLoRA Appendix E), indexed by the 4-bit code."""

_DEFAULT_BLOCK = {"nf4": 64, "q4_1": 32}
_PACKED = ("nf4", "q4_1")  # two 4-bit codes per byte along the blocked axis
_DQ_GROUP = 256  # QLoRA's second-level block size
# Divisions by constants are multiplications by their float32 reciprocals, as XLA compiles
# them anyway: numpy then computes the same scales.
_INV127 = np.float32(1 / 127)


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored quantized; a pytree node standing for one kernel leaf.

    Array fields are pytree children, all with the kernel's axes in order and only the
    blocked axis ``axis`` shortened. The others are static.
    """

    data: Any
    """Codes: int8 (``"int8"``) or uint8 with two 4-bit codes per byte, element ``2i`` in
    the low nibble of byte ``i`` along ``axis``."""
    scale: Any
    """One per block along ``axis``: float32 absmax (``"int8"``: divided by 127), int8
    codes of it (``"nf4"`` with double quantization), float16 ``d`` (``"q4_1"``)."""
    offset: Any = None
    """``"q4_1"``: the float16 block minimum ``m``."""
    scale_scale: Any = None
    """Double quantization: float32 step of the int8 scale codes, per group of scales."""
    scale_offset: Any = None
    """Double quantization: float32 mean of each group of scales."""
    kind: str = "nf4"
    """``"int8"``, ``"nf4"`` or ``"q4_1"``."""
    axis: int = -2
    """The blocked (input) axis, counted from the end so that slicing leading stacked
    axes keeps it valid."""
    block: int = 64
    """Elements per block along ``axis`` (``"int8"``: the whole axis)."""
    group: int = 0
    """Scales per double-quantization group along ``axis`` (0: no double quantization)."""
    dtype_name: str = "float32"
    """The logical (dequantized) dtype."""

    jaxlora_kernel = True  # jaxlora.targets.is_kernel_leaf: a kernel leaf to target code

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical kernel shape."""
        shape = list(self.data.shape)
        if self.kind in _PACKED:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        """The logical kernel dtype."""
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (codes and scales)."""
        return sum(
            int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self)
        )

    def dequantize(self) -> jax.Array:
        """The float kernel (logical shape and dtype)."""
        return _dequantize(self)

    def partition_specs(self, spec: Any, mesh_sizes: dict[str, int]) -> QuantizedKernel:
        """The ``PartitionSpec`` of each child for the kernel's (full-rank) ``spec``.

        Every child shards like the kernel, axis by axis, so each device holds the codes
        and the scales of the same blocks. A split of the blocked axis must therefore fall
        on block boundaries (and on double-quantization group boundaries); int8's
        per-column scale (one entry along that axis) is replicated along it.

        Raises:
          ValueError: If the blocked axis is split inside a block.
        """
        from jax.sharding import PartitionSpec

        entries = [*tuple(spec), *(None,) * (self.ndim - len(tuple(spec)))]
        ax = self.axis % self.ndim
        entry = entries[ax]
        names = () if entry is None else entry if isinstance(entry, tuple | list) else (entry,)
        n = math.prod(mesh_sizes[a] for a in names)
        unit = self.block * max(self.group, 1)
        if n > 1 and self.kind != "int8" and (self.shape[ax] // n) % unit:
            raise ValueError(
                f"{self.kind} kernel of shape {self.shape} blocks its axis {ax} by {unit}, "
                f"but {spec} splits that axis into {n} shards of {self.shape[ax] // n}, "
                f"which cuts blocks: shard the other axis, use fewer shards, or quantize with "
                f"a block that divides {self.shape[ax] // n}"
            )

        def child(x):
            if x is None:
                return None
            e = list(entries)
            if x.shape[ax] == 1 and self.shape[ax] != 1:
                e[ax] = None
            return PartitionSpec(*e)

        arrays = {f: child(getattr(self, f)) for f in _CHILDREN}
        return dataclasses.replace(self, **arrays)

    def __jax_array__(self) -> jax.Array:
        # lets value-reading code (DoRA's column norms, PiSSA's SVD) take a quantized kernel
        return self.dequantize()


_CHILDREN = ("data", "scale", "offset", "scale_scale", "scale_offset")

jax.tree_util.register_dataclass(
    QuantizedKernel,
    data_fields=list(_CHILDREN),
    meta_fields=["kind", "axis", "block", "group", "dtype_name"],
)


# ----------------------------------------------------------------------------- blocks


def _blocked(x: jax.Array, ax: int, block: int) -> jax.Array:
    """``x`` with axis ``ax`` split into ``(n / block, block)``."""
    return x.reshape(*x.shape[:ax], x.shape[ax] // block, block, *x.shape[ax + 1 :])


def _unpack(data: jax.Array, ax: int) -> jax.Array:
    lo, hi = data & 0xF, data >> 4
    both = jnp.stack([lo, hi], axis=ax + 1)
    return both.reshape(*data.shape[:ax], 2 * data.shape[ax], *data.shape[ax + 1 :])


def _pack(codes: Any, ax: int) -> Any:
    xp = _xp(codes)
    pairs = _blocked(codes.astype(np.uint8), ax, 2)
    lo = xp.take(pairs, 0, axis=ax + 1)
    hi = xp.take(pairs, 1, axis=ax + 1)
    return lo | (hi << 4)


def _xp(x: Any):
    """numpy for host arrays (no XLA compilation, synchronous), jax.numpy otherwise."""
    return np if isinstance(x, np.ndarray) else jnp


def _group_mean(g: Any, axis: int) -> Any:
    """The mean over ``axis`` by a fixed pairwise tree of elementwise float32 additions
    (then a multiplication by ``1/n``).

    numpy and XLA reduce in different orders, so ``mean`` can differ in the last bit
    between them; this sum is the same in both (zeros pad the axis to a power of two, and
    adding 0.0 is exact).
    """
    xp = _xp(g)
    n = g.shape[axis]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        pad = [(0, 0)] * g.ndim
        pad[axis] = (0, width - n)
        g = xp.pad(g, pad)
    lead = (slice(None),) * axis
    while g.shape[axis] > 1:
        half = g.shape[axis] // 2
        g = g[(*lead, slice(0, half))] + g[(*lead, slice(half, None))]
    return xp.squeeze(g, axis) * np.float32(1 / n)


def _absmax_scales(q: QuantizedKernel, ax: int) -> jax.Array:
    if not q.group:
        return q.scale.astype(jnp.float32)
    codes = _blocked(q.scale.astype(jnp.float32), ax, q.group)
    step = jnp.expand_dims(q.scale_scale, ax + 1)
    mean = jnp.expand_dims(q.scale_offset, ax + 1)
    c = codes * step + mean
    return c.reshape(q.scale.shape)


def _dequantize(q: QuantizedKernel) -> jax.Array:
    ax = q.axis % q.ndim
    if q.kind == "int8":
        w = q.data.astype(jnp.float32) * q.scale.astype(jnp.float32)
        return w.astype(q.dtype)
    codes = _blocked(_unpack(q.data, ax), ax, q.block)
    if q.kind == "nf4":
        values = jnp.asarray(NF4_CODE)[codes]
        w = values * jnp.expand_dims(_absmax_scales(q, ax), ax + 1)
    else:  # q4_1
        d = jnp.expand_dims(q.scale.astype(jnp.float32), ax + 1)
        m = jnp.expand_dims(q.offset.astype(jnp.float32), ax + 1)
        w = codes.astype(jnp.float32) * d + m
    return w.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------- quantize


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def quantize_kernel(
    w: Any,
    *,
    kind: str = "nf4",
    axis: int = -2,
    block: int | None = None,
    double_quant: bool = False,
    path: str = "<kernel>",
) -> QuantizedKernel:
    """Quantizes one float kernel, in blocks along ``axis``.

    A host (numpy) kernel is quantized with numpy, into numpy codes and scales (no XLA
    compilation: what the loaders use while reading a checkpoint); a jax array with
    ``jax.numpy``. The two agree but for rare rounding ties: XLA's fused division can be
    an ulp off IEEE's, moving a value sitting on a code boundary to the next code.

    Args:
      w: The kernel (any float dtype); its dtype becomes the logical dtype.
      kind: ``"int8"``, ``"nf4"`` or ``"q4_1"``.
      axis: The (input) axis the blocks run along.
      block: Block size (``"nf4"``: 64, ``"q4_1"``: 32; ``"int8"`` always uses the whole
        axis). Must divide the axis and be even for 4-bit formats.
      double_quant: ``"nf4"`` only: quantize the absmax scales to int8 as well.
      path: Named in errors.

    Returns:
      The :class:`QuantizedKernel`.

    Raises:
      ValueError: For an unknown kind, an axis the block does not divide, or double
        quantization of a format other than NF4.

    Examples:
      >>> import jax.numpy as jnp
      >>> q = quantize_kernel(jnp.linspace(-1, 1, 128).reshape(128, 1), kind="nf4")
      >>> q.shape, q.data.shape, q.data.dtype, q.scale.shape
      ((128, 1), (64, 1), dtype('uint8'), (2, 1))
    """
    if kind not in KINDS:
        raise ValueError(f"{path!r}: unknown quantization kind {kind!r}; choose one of {KINDS}")
    if double_quant and kind != "nf4":
        raise ValueError(f"{path!r}: double quantization is defined for 'nf4' only, not {kind!r}")
    xp = _xp(w)
    w = xp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{path!r}: can only quantize float kernels, got {w.dtype}")
    ndim = w.ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"{path!r}: axis {axis} out of range for shape {tuple(w.shape)}")
    ax = axis % ndim
    n = w.shape[ax]
    block = n if kind == "int8" else (block or _DEFAULT_BLOCK[kind])
    if n % block or (kind in _PACKED and block % 2):
        raise ValueError(
            f"{path!r} with shape {tuple(w.shape)}: {kind} blocks of {block} along axis {ax} "
            f"need a{'n even' if kind in _PACKED else ''} block that divides its size {n}; "
            "pass block=... or leave this kernel out of the targets"
        )
    x = _blocked(w.astype(np.float32), ax, block)
    f32 = np.float32
    fields: dict[str, Any] = {}
    if kind == "int8":
        absmax = xp.max(xp.abs(x), axis=ax + 1)
        step = xp.where(absmax > 0, absmax * _INV127, f32(1.0))
        data = xp.clip(xp.round(x / xp.expand_dims(step, ax + 1)), -127, 127).astype(np.int8)
        fields.update(data=data.reshape(w.shape), scale=step)
    elif kind == "nf4":
        absmax = xp.max(xp.abs(x), axis=ax + 1)
        safe = xp.where(absmax > 0, absmax, f32(1.0))
        scaled = x / xp.expand_dims(safe, ax + 1)
        mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
        codes = xp.searchsorted(xp.asarray(mid), scaled.reshape(-1)).reshape(scaled.shape)
        fields.update(data=_pack(codes.reshape(w.shape), ax), scale=absmax)
        if double_quant:
            fields.update(_double_quant(absmax, ax))
    else:
        lo, hi = xp.min(x, axis=ax + 1), xp.max(x, axis=ax + 1)
        d = ((hi - lo) * f32(1 / 15)).astype(np.float16)
        m = lo.astype(np.float16)
        d32 = d.astype(np.float32)
        safe = xp.expand_dims(xp.where(d32 > 0, d32, f32(1.0)), ax + 1)
        codes = xp.round((x - xp.expand_dims(m.astype(np.float32), ax + 1)) / safe)
        codes = xp.clip(codes, 0, 15).reshape(w.shape)
        fields.update(data=_pack(codes, ax), scale=d, offset=m)
    group = fields.pop("group", 0)
    return QuantizedKernel(
        **fields,
        kind=kind,
        axis=ax - ndim,
        block=block,
        group=group,
        dtype_name=jnp.dtype(w.dtype).name,
    )


def _double_quant(absmax: jax.Array, ax: int) -> dict[str, Any]:
    """Int8 codes of the absmax scales, centred on each group's mean (QLoRA §3)."""
    xp = _xp(absmax)
    group = _largest_divisor(absmax.shape[ax], _DQ_GROUP)
    g = _blocked(absmax, ax, group)
    mean = _group_mean(g, ax + 1)
    centred = g - xp.expand_dims(mean, ax + 1)
    top = xp.max(xp.abs(centred), axis=ax + 1)
    step = xp.where(top > 0, top * _INV127, np.float32(1.0))
    codes = xp.clip(xp.round(centred / xp.expand_dims(step, ax + 1)), -127, 127)
    return dict(
        scale=codes.astype(np.int8).reshape(absmax.shape),
        scale_scale=step,
        scale_offset=mean,
        group=group,
    )


def quantize(
    params: Any,
    *,
    targets: TargetsLike = "all-linear",
    kind: str = "nf4",
    block: int | None = None,
    double_quant: bool = False,
) -> Any:
    """Replaces the selected kernels of ``params`` by :class:`QuantizedKernel` nodes.

    Blocks run along each kernel's last input axis (the target's ``in_axes``). The
    returned tree holds only the packed codes and scales of those kernels; other leaves
    are returned as they are.

    Args:
      params: Any parameter pytree.
      targets: Which kernels to quantize, as for :func:`jaxlora.lora` (a regex, a
        :class:`jaxlora.Target`, ``"all-linear"`` or a list).
      kind: ``"nf4"`` (QLoRA), ``"int8"`` (per-channel absmax) or ``"q4_1"``.
      block: Block size (default 64 for NF4, 32 for Q4_1).
      double_quant: NF4 only: also quantize the block scales (QLoRA's double quantization).

    Returns:
      The quantized tree.

    Raises:
      TargetError: If a target matches nothing, or a matched leaf cannot be blocked (named).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 8))}}
      >>> q = jl.quantize(params, targets=".*kernel", kind="nf4")
      >>> q["dense"]["kernel"].shape, q["dense"]["kernel"].nbytes  # 64*8 codes + 2*8 scales
      ((128, 8), 576)
      >>> err = jnp.abs(jl.dequantize(q)["dense"]["kernel"] - params["dense"]["kernel"])
      >>> bool(err.max() < 0.2 * jnp.abs(params["dense"]["kernel"]).max())
      True
    """
    selected = match(params, targets)

    def visit(kp, x):
        path = path_str(kp)
        if path not in selected or is_kernel_leaf(x):
            return x
        spec, _ = selected[path]
        layout = spec.layout(path, tuple(x.shape), x.dtype)
        try:
            return quantize_kernel(
                x,
                kind=kind,
                axis=layout.in_axes[-1],
                block=block,
                double_quant=double_quant,
                path=path,
            )
        except ValueError as e:
            raise TargetError(str(e)) from None

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_kernel_leaf)


def dequantize(params: Any, *, targets: TargetsLike | None = None) -> Any:
    """Replaces :class:`QuantizedKernel` nodes by float kernels (all, or the ``targets``).

    Args:
      params: A tree from :func:`quantize` (or a quantized GGUF load).
      targets: Only dequantize these kernels (as for :func:`quantize`); default all.

    Returns:
      The tree with float kernels of the logical shape and dtype at those leaves.

    Raises:
      TargetError: If a target matches nothing.

    Examples:
      >>> import jax.numpy as jnp, jaxlora as jl
      >>> q = jl.quantize({"k": {"kernel": jnp.ones((64, 2))}}, targets=".*", kind="int8")
      >>> jl.dequantize(q)["k"]["kernel"].sum()
      Array(128., dtype=float32)
    """
    chosen = None if targets is None else set(match(params, targets))

    def visit(kp, x):
        if is_kernel_leaf(x) and (chosen is None or path_str(kp) in chosen):
            return x.dequantize()
        return x

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_kernel_leaf)


# ------------------------------------------------------------------------------- GGUF


GGML_Q4_1_BLOCK = 32
"""Elements per llama.cpp Q4_1 block (stored as float16 ``d``, float16 ``m``, 16 bytes)."""


def q4_1_children(blocks: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The codes and scales of a GGUF Q4_1 tensor, rows first, in this module's packing.

    Args:
      blocks: The tensor's raw bytes, ``(rows, cols / 32 * 20)`` uint8 (``gguf``'s
        ``ReaderTensor.data``).
      shape: The tensor's ``(rows, cols)`` (numpy order; ``cols`` is ggml's ``ne0``).

    Returns:
      ``{"data": (rows, cols/2) uint8, "scale": (rows, cols/32) float16, "offset": ...}``
      with blocks along the last axis: transform each array like the weight itself (e.g.
      transpose) and build a ``QuantizedKernel(kind="q4_1", block=32, ...)`` from them.

    Raises:
      ValueError: If the bytes do not hold ``shape`` in Q4_1 blocks.
    """
    rows, cols = shape
    nb = cols // GGML_Q4_1_BLOCK
    if cols % GGML_Q4_1_BLOCK or blocks.shape != (rows, nb * 20) or blocks.dtype != np.uint8:
        raise ValueError(
            f"Q4_1 data {blocks.dtype}{list(blocks.shape)} does not hold a {shape} tensor "
            f"(expected uint8[{rows}, {nb * 20}])"
        )
    b = blocks.reshape(rows, nb, 20)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]
    qs = b[..., 4:]
    # ggml: byte j holds element j (low nibble) and j + 16 (high); here pairs (2i, 2i+1)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return {"data": data, "scale": d, "offset": m}


def constrain(q: QuantizedKernel, sharding: Any) -> QuantizedKernel:
    """``with_sharding_constraint`` of a kernel, applied to its codes and scales.

    A block split by the constraint leaves the blocked axis of the children unconstrained
    (XLA chooses) rather than failing: the constraint is a hint, not storage.
    """
    mesh = sharding.mesh
    sizes = dict(mesh.shape)
    try:
        specs = q.partition_specs(sharding.spec, sizes)
    except ValueError:
        from jax.sharding import PartitionSpec

        entries = [*tuple(sharding.spec), *(None,) * (q.ndim - len(tuple(sharding.spec)))]
        entries[q.axis % q.ndim] = PartitionSpec.UNCONSTRAINED
        specs = q.partition_specs(PartitionSpec(*entries), sizes)
    out = {}
    for f in _CHILDREN:
        x, spec = getattr(q, f), getattr(specs, f)
        named = jax.sharding.NamedSharding(mesh, spec) if x is not None else None
        out[f] = x if x is None else jax.lax.with_sharding_constraint(x, named)
    return dataclasses.replace(q, **out)


def gather_rows(q: QuantizedKernel, indices: jax.Array, **params: Any) -> jax.Array | None:
    """``lax.gather(q.dequantize(), indices, **params)`` from gathered codes and scales.

    An embedding lookup (``jnp.take(embedding, ids, axis=0)``) of a quantized embedding
    blocked along its hidden axis: each child is gathered with the same indices, whole
    along the blocked axis, and only the gathered rows are dequantized, never the table.

    Args:
      q: The quantized kernel (the gather's operand).
      indices: The gather's start indices.
      **params: The ``gather`` primitive's parameters (``dimension_numbers``,
        ``slice_sizes``, ``mode``, ``fill_value``, ``indices_are_sorted``,
        ``unique_indices``).

    Returns:
      The gathered float rows (exactly the gather of the dequantized kernel, including
      the fill value of out-of-range indices), or None when the gather indexes or slices
      the blocked axis (then only the dequantized kernel can be gathered).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax import lax
      >>> table = jnp.arange(4 * 64.0).reshape(4, 64) / 256
      >>> q = quantize_kernel(table, kind="int8", axis=-1)
      >>> ids = jnp.array([[2], [0]])
      >>> dn = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
      ...                                 start_index_map=(0,))
      >>> rows = gather_rows(q, ids, dimension_numbers=dn, slice_sizes=(1, 64),
      ...                    mode=lax.GatherScatterMode.CLIP, fill_value=None,
      ...                    indices_are_sorted=False, unique_indices=False)
      >>> bool(jnp.all(rows == q.dequantize()[jnp.array([2, 0])]))
      True
    """
    dn = params["dimension_numbers"]
    ax = q.axis % q.ndim
    sizes = tuple(params["slice_sizes"])
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    if ax in dn.start_index_map or ax in dn.collapsed_slice_dims or ax in batching:
        return None
    if sizes[ax] != q.shape[ax]:
        return None
    kept = [d for d in range(q.ndim) if d not in dn.collapsed_slice_dims and d not in batching]
    options = {k: v for k, v in params.items() if k not in ("slice_sizes", "fill_value")}

    def take(x, fill=None):
        if x is None:
            return None
        s = list(sizes)
        s[ax] = x.shape[ax]
        return jax.lax.gather(x, indices, slice_sizes=tuple(s), fill_value=fill, **options)

    rows = {f: take(getattr(q, f)) for f in _CHILDREN}
    out_ax = dn.offset_dims[kept.index(ax)]
    out_ndim = rows["data"].ndim
    out = dataclasses.replace(q, **rows, axis=out_ax - out_ndim).dequantize()
    if params.get("mode") == jax.lax.GatherScatterMode.FILL_OR_DROP:
        # out-of-range rows read the fill value (NaN by default), as the float gather does
        zero = jnp.zeros(tuple(1 if d == ax else n for d, n in enumerate(q.shape)), out.dtype)
        out = out + take(zero, params.get("fill_value"))
    return out


def dense(x: Any) -> Any:
    """``x`` dequantized if it is a quantized kernel, else ``x`` itself."""
    return x.dequantize() if is_kernel_leaf(x) else x
