"""Weight and tokenizer loaders: Hugging Face safetensors and llama.cpp GGUF to jaxlora trees.

Every loader follows the same three steps, so the format-specific code is only a name table
and a tensor reader:

1. A *plan* lists, for the given config, each tensor the file must hold: its name in the
   file, its expected shape there, its key path in the jaxlora tree and a transform (the
   torch ``(out, in)`` to JAX ``(in, out)`` transpose, llama.cpp's q/k un-permutation).
2. The plan is checked against the file's tensor names and shapes *before* any data is
   read; missing, unexpected or mis-shaped tensors raise one ValueError that names them.
3. Tensors are read one at a time (safetensors memory-mapped, GGUF dequantised to float32),
   transformed and put on the device immediately, so besides the finished tree at most one
   tensor (or, with ``scan_layers``, one stacked group) exists as a host copy: never more
   than two copies of the weights. Asked for a quantized base (``quantize="nf4"``), the
   loaders quantize each tensor (each layer's, before stacking) as soon as it is read, so
   at most one float tensor exists at a time and the float model is never held.

Tokenizers come from the files shipped with the model: a ``tokenizer.json`` when present,
otherwise the vocabulary and merges embedded in the GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.models.bert import BertConfig
from jaxlora.models.llama import LlamaConfig
from jaxlora.quant import KINDS, QuantizedKernel, q4_1_children, quantize_kernel

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One planned tensor: where it is in the file, and where it goes in the tree."""

    source: str
    shape: tuple[int, ...]
    path: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


@dataclasses.dataclass(frozen=True)
class _Quantizer:
    """Quantizes planned tensors as they are read (the loaders' ``quantize=`` argument).

    The kernels ``jaxlora.quantize(params, targets="all-linear", ...)`` would select (every
    ``kernel`` but an output head's), blocked along their input axis, and, with
    ``embedding``, the token embedding blocked along its hidden axis: the axis the tied
    output projection ``x @ embedding.T`` contracts, so that a looked-up row is whole
    blocks.
    """

    kind: str
    double_quant: bool
    embedding: bool

    def axis(self, path: tuple[str, ...]) -> int | None:
        """The blocked axis of the tensor at ``path``, or None to keep it float."""
        if path[-1] == "kernel" and not {"lm_head", "head", "classifier", "score"} & set(path):
            return -2
        if self.embedding and path[-1] == "embedding":
            return -1
        return None

    def by_rows(self, t: _Tensor) -> bool:
        """Whether ``t`` is quantized a slab of rows at a time (read and quantized in pieces).

        Untransformed 2-D tensors blocked along their last axis: the token embedding, the
        largest tensor of a small model, whose float copy would otherwise set the peak.
        """
        return t.transform is None and len(t.shape) == 2 and self.axis(t.path) == -1

    def __call__(self, path: tuple[str, ...], x: np.ndarray) -> Any:
        axis = self.axis(path)
        if axis is None:
            return x
        q = quantize_kernel(
            np.asarray(x),
            kind=self.kind,
            axis=axis,
            double_quant=self.double_quant,
            path="/".join(path),
        )
        return q  # x is a host array: numpy codes and scales, no XLA compilation


QUANTIZE_ROWS = 4096
"""Rows per slab when the loaders quantize a tensor by rows (see ``_Quantizer.by_rows``)."""


def _quantize_by_rows(reader, t: _Tensor, quantizer: _Quantizer, dtype: Any) -> QuantizedKernel:
    """Reads and quantizes ``t`` a slab of rows at a time; the same codes as all at once.

    Blocks (and double-quantization groups) run along the last axis, so every row's codes
    and scales depend on that row alone.
    """
    parts = []
    for start in range(0, t.shape[0], QUANTIZE_ROWS):
        stop = min(start + QUANTIZE_ROWS, t.shape[0])
        x = np.asarray(reader.read_rows(t.source, start, stop)).astype(dtype, copy=False)
        parts.append(jax.tree_util.tree_map(np.asarray, quantizer(t.path, x)))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def _quantizer(
    quantize: str | None, double_quant: bool | None, quantize_embedding: bool
) -> _Quantizer | None:
    if quantize is None:
        if quantize_embedding or double_quant:
            raise ValueError(
                "quantize_embedding and double_quant need quantize='nf4' (or 'int8', 'q4_1')"
            )
        return None
    if quantize not in KINDS:
        raise ValueError(f"unknown quantize={quantize!r}; choose one of {KINDS} or None")
    if double_quant is None:
        double_quant = quantize == "nf4"  # QLoRA's default
    return _Quantizer(quantize, bool(double_quant), bool(quantize_embedding))


# ----------------------------------------------------------------------------- readers


class _SafetensorsReader:
    """Tensors of one or more safetensors files, memory-mapped, by name."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self._handles = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            handle = safe_open(str(file), framework="numpy")
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                self._handles[name] = handle
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handles[name].get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._handles[name].get_slice(name)[start:stop]


class _GGUFReader:
    """Tensors of a GGUF file by name, dequantised to float32 on read.

    With ``quantized``, Q4_1 tensors are read as their codes and scales instead (a dict,
    rows first; see :func:`jaxlora.quant.q4_1_children`).
    """

    def __init__(self, reader, quantized: bool = False):
        self._quantized = quantized
        self._tensors = {t.name: t for t in reader.tensors}
        # ggml lists dimensions fastest-first; numpy (and the torch layout) is the reverse.
        self.shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}

    def read(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        if self._quantized and tensor.tensor_type == GGMLQuantizationType.Q4_1:
            return q4_1_children(np.asarray(tensor.data), self.shapes[name])
        x = dequantize(tensor.data, tensor.tensor_type).reshape(self.shapes[name])
        return _own(x, tensor.data)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (numpy order), dequantised to float32."""
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        rows = np.asarray(tensor.data).reshape(self.shapes[name][0], -1)[start:stop]
        shape = (stop - start, *self.shapes[name][1:])
        return _own(dequantize(rows, tensor.tensor_type).reshape(shape), tensor.data)


def _own(x: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """``x``, copied if it is a view of the file's memory map (gguf's F32 tensors are).

    On CPU ``jax.device_put`` may alias an aligned host array instead of copying it, so a
    view kept in the tree (a norm scale, say) would keep the whole map, and every page the
    load touched, resident for as long as the parameters live.
    """
    return x.copy() if np.may_share_memory(x, mapped) else x


# ---------------------------------------------------------------------- plan and build


def _check(
    plan: list[_Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    strict: bool,
    ignore: Callable[[str], bool],
    what: str,
) -> None:
    wanted = {t.source: t for t in plan}
    missing = sorted(set(wanted) - set(shapes))
    extra = sorted(n for n in set(shapes) - set(wanted) if not ignore(n)) if strict else []
    wrong = sorted(
        f"{n}: file has {shapes[n]}, expected {wanted[n].shape}"
        for n in set(wanted) & set(shapes)
        if tuple(shapes[n]) != wanted[n].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra} (pass strict=False to ignore them)")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ValueError(f"{what} does not match the model config: " + "; ".join(problems))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _build(
    plan: list[_Tensor],
    reader,
    *,
    dtype: Any,
    stack_layers: bool,
    quantizer: _Quantizer | None = None,
) -> dict[str, Any]:
    """Reads, transforms and places every planned tensor; stacks per-layer ones if asked.

    With a ``quantizer``, each tensor it selects is quantized right after it is read, and
    only its codes and scales are kept.
    """

    def load(t: _Tensor) -> Any:
        if quantizer is not None and quantizer.by_rows(t):
            return _quantize_by_rows(reader, t, quantizer, dtype)
        x = reader.read(t.source)
        if isinstance(x, dict):  # quantized blocks: each array transforms like the weight
            x = {k: t.transform(v) if t.transform else v for k, v in x.items()}
            # kernels are transposed to (in, out), so their blocks run along axis -2
            axis = -2 if t.path[-1] == "kernel" else -1
            return QuantizedKernel(
                **x, kind="q4_1", axis=axis, block=32, dtype_name=np.dtype(dtype).name
            )
        x = (t.transform(x) if t.transform else x).astype(dtype, copy=False)
        return x if quantizer is None else quantizer(t.path, x)

    tree: dict[str, Any] = {}
    groups: dict[tuple[str, ...], dict[int, _Tensor]] = {}
    for t in plan:
        if stack_layers and t.path[0] == "layers":
            groups.setdefault(t.path[2:], {})[int(t.path[1])] = t
        else:
            _set(tree, t.path, jax.device_put(load(t)))
    for rest, layers in groups.items():
        # One group (e.g. every layer's q_proj) at a time keeps the host copy to 1/7 or so
        # of the weights, instead of holding all per-layer arrays until the end.
        first = load(layers[0])
        if isinstance(first, QuantizedKernel):  # small: stack the codes and scales at once
            nodes = [first, *(load(layers[i]) for i in range(1, len(layers)))]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *nodes)
            _set(tree, ("layers", *rest), jax.device_put(stacked))
            continue
        stacked = np.empty((len(layers), *first.shape), dtype=first.dtype)
        stacked[0] = first
        for i in range(1, len(layers)):
            stacked[i] = load(layers[i])
        _set(tree, ("layers", *rest), jax.device_put(stacked))
        del first, stacked
    return tree


# ------------------------------------------------------------------------------- Llama


_LLAMA_LAYER = {  # jaxlora name: (HF name, GGUF name)
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", "attn_q.weight"),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", "attn_k.weight"),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", "attn_v.weight"),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_norm", "scale"): ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "ffn_norm.weight"),
}


def _unpermute_rows(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Inverse of llama.cpp's conversion-time q/k row permutation, then the JAX transpose.

    llama.cpp rotates adjacent pairs (2j, 2j+1) of each head; Hugging Face rotates (j,
    j + head_dim/2). Its converter reorders each head's output rows from the latter layout
    to the former, viewing them as (2, head_dim/2) and swapping the two axes. Undoing it
    views them as (head_dim/2, 2) and swaps back.
    """

    def unpermute(w: np.ndarray) -> np.ndarray:
        rows, cols = w.shape
        w = w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2)
        return w.reshape(rows, cols).T

    return unpermute


def _llama_plan(config: LlamaConfig, fmt: str) -> list[_Tensor]:
    """The tensors a ``fmt`` ("hf" or "gguf") Llama checkpoint holds for ``config``."""
    c = config
    d, q_out, kv_out = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    torch_shapes = {  # (out, in) as both formats store linear weights
        "q_proj": (q_out, d),
        "k_proj": (kv_out, d),
        "v_proj": (kv_out, d),
        "o_proj": (d, q_out),
        "gate_proj": (c.intermediate_size, d),
        "up_proj": (c.intermediate_size, d),
        "down_proj": (d, c.intermediate_size),
        "input_norm": (d,),
        "post_attn_norm": (d,),
    }
    gguf = fmt == "gguf"
    plan = [
        _Tensor(
            "token_embd.weight" if gguf else "embed_tokens.weight",
            (c.vocab_size, d),
            ("embed", "embedding"),
        ),
        _Tensor("output_norm.weight" if gguf else "norm.weight", (d,), ("final_norm", "scale")),
    ]
    if not c.tie_embeddings:
        plan.append(
            _Tensor(
                "output.weight" if gguf else "lm_head.weight",
                (c.vocab_size, d),
                ("lm_head", "kernel"),
                _transpose,
            )
        )
    for i in range(c.num_layers):
        for rest, (hf_name, gguf_name) in _LLAMA_LAYER.items():
            source = f"blk.{i}.{gguf_name}" if gguf else f"layers.{i}.{hf_name}"
            transform = _transpose if rest[-1] == "kernel" else None
            if gguf and rest[1] == "q_proj":
                transform = _unpermute_rows(c.num_heads)
            elif gguf and rest[1] == "k_proj":
                transform = _unpermute_rows(c.num_kv_heads)
            plan.append(
                _Tensor(source, torch_shapes[rest[-2]], ("layers", str(i), *rest), transform)
            )
    return plan


def _with_prefix(
    plan: list[_Tensor], shapes: Mapping[str, Any], prefix: str, unprefixed: Callable[[str], bool]
) -> list[_Tensor]:
    """Prefixes planned names when the file was saved from a model with a head.

    ``LlamaForCausalLM`` stores ``model.layers...`` beside ``lm_head.weight``; ``LlamaModel``
    stores ``layers...``. Likewise ``bert.`` for BERT task models.
    """
    if not any(n.startswith(prefix) for n in shapes):
        return plan
    return [
        t if unprefixed(t.source) else dataclasses.replace(t, source=prefix + t.source)
        for t in plan
    ]


def _safetensors_files(path: PathLike) -> tuple[Path, list[Path]]:
    """Resolves a checkpoint directory (or a single ``.safetensors`` file) to its files."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return path, [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return path, [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _read_hf_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; pass config= explicitly")
    return json.loads(file.read_text())


def _open_safetensors(path: PathLike, config, config_cls, overrides: Mapping[str, Any]):
    """The config (given, else from ``config.json``, with overrides) and a tensor reader."""
    directory, files = _safetensors_files(path)
    if config is None:
        config = config_cls.from_hf_config(_read_hf_config(directory))
    return dataclasses.replace(config, **overrides), _SafetensorsReader(files)


def load_llama_safetensors(
    path: PathLike,
    *,
    config: LlamaConfig | None = None,
    dtype: Any = np.float32,
    strict: bool = True,
    quantize: str | None = None,
    double_quant: bool | None = None,
    quantize_embedding: bool = False,
    **overrides: Any,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Hugging Face Llama checkpoint (``save_pretrained`` layout).

    With ``quantize`` the base comes back quantized (QLoRA), tensor by tensor as it is
    read: the same tree as ``jaxlora.quantize(params, targets="all-linear", kind=quantize,
    double_quant=...)`` of the float load, without ever holding the float model.

    Args:
      path: a checkpoint directory (``config.json`` plus ``model.safetensors`` or a sharded
        index) or one ``.safetensors`` file.
      config: the model config; read from ``config.json`` beside the weights when None.
      dtype: dtype of the returned parameters.
      strict: raise on tensors the model does not use (rotary ``inv_freq`` buffers, and a
        redundant ``lm_head.weight`` when embeddings are tied, are always tolerated).
      quantize: ``"nf4"``, ``"int8"`` or ``"q4_1"`` (see :func:`jaxlora.quant.quantize`)
        to quantize every linear kernel but an untied ``lm_head`` while loading.
      double_quant: NF4's double quantization of the block scales (default: on for NF4).
      quantize_embedding: also quantize ``embed/embedding``, in blocks along its hidden
        axis; under :func:`jaxlora.adapt` a lookup then gathers rows of codes and
        dequantizes only those, and a tied output projection dequantizes it per use.
      **overrides: config fields to set, e.g. ``scan_layers=True``.

    Returns:
      ``(config, params)``.

    Raises:
      ValueError: if tensors are missing, unexpected or mis-shaped (all named).
      FileNotFoundError: if the files are not there.
    """
    config, reader = _open_safetensors(path, config, LlamaConfig, overrides)
    plan = _with_prefix(
        _llama_plan(config, "hf"), reader.shapes, "model.", lambda n: n.startswith("lm_head.")
    )
    ignore = lambda n: (
        n.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and n == "lm_head.weight")
    )
    _check(plan, reader.shapes, strict=strict, ignore=ignore, what=f"checkpoint {path}")
    quantizer = _quantizer(quantize, double_quant, quantize_embedding)
    return config, _build(
        plan, reader, dtype=dtype, stack_layers=config.scan_layers, quantizer=quantizer
    )


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06. The shortest decimal
    # that round-trips through float32 is the value the model's author wrote.
    return float(str(np.float32(value)))


def llama_config_from_gguf(reader, **overrides: Any) -> LlamaConfig:
    """Reads a Llama config from GGUF metadata (``llama.*`` keys).

    Args:
      reader: a ``gguf.GGUFReader``.
      **overrides: config fields to set on top.

    Returns:
      The config. Embeddings count as tied when the file has no ``output.weight``.

    Raises:
      ValueError: if the file is not a Llama-architecture model.
    """
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a GGUF with general.architecture 'llama', got {arch!r}")
    g = lambda key, default=None: _gguf_field(reader, f"llama.{key}", default)
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    fields = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        rope_theta=_float32(g("rope.freq_base", 10000.0)),
        rms_norm_eps=_float32(g("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 2048)),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def load_llama_gguf(
    path: PathLike,
    *,
    dtype: Any = np.float32,
    strict: bool = True,
    quantized: bool = False,
    quantize: str | None = None,
    double_quant: bool | None = None,
    quantize_embedding: bool = False,
    **overrides: Any,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a llama.cpp GGUF Llama model, dequantised, with q/k rows un-permuted.

    The config comes from the GGUF metadata. Every quantisation type ``gguf`` can
    dequantise is supported (F32, F16, Q4_0, Q4_1, Q8_0, K-quants, ...). With
    ``quantized=True``, Q4_1 tensors stay quantized: each becomes a
    :class:`jaxlora.quant.QuantizedKernel` (``kind="q4_1"``) holding the file's own codes
    and scales (repacked, q/k rows un-permuted), a frozen base for QLoRA-style training
    that dequantizes to exactly the values of the float route. With ``quantize="nf4"``
    (or ``"int8"``, ``"q4_1"``) every linear kernel is instead re-quantized from its float
    values as soon as it is read (QLoRA from a GGUF file, without holding the float model):
    the same tree as ``jaxlora.quantize(params, targets="all-linear", kind=quantize,
    double_quant=...)`` of the float load.

    Args:
      path: the ``.gguf`` file.
      dtype: dtype of the returned parameters (the logical dtype of quantized kernels).
      strict: raise on tensors the model does not use (``rope_freqs`` is always tolerated).
      quantized: keep Q4_1 tensors quantized instead of dequantising them.
      quantize: ``"nf4"``, ``"int8"`` or ``"q4_1"``: quantize every linear kernel but an
        untied ``lm_head`` while loading (not with ``quantized``).
      double_quant: NF4's double quantization of the block scales (default: on for NF4).
      quantize_embedding: also quantize ``embed/embedding`` (with ``quantize``), in blocks
        along its hidden axis; under :func:`jaxlora.adapt` a lookup then gathers rows of
        codes and dequantizes only those, and the tied output projection dequantizes it
        per use.
      **overrides: config fields to set, e.g. ``scan_layers=True``.

    Returns:
      ``(config, params)``.

    Raises:
      ValueError: if the file is not a Llama model, or tensors are missing, unexpected or
        mis-shaped (all named), or for contradicting quantization arguments.

    Examples:
      QLoRA's base straight from the file (NF4, double-quantized scales)::

          config, qparams = load_llama_gguf(path, scan_layers=True, quantize="nf4")
    """
    from gguf import GGUFReader

    quantizer = _quantizer(quantize, double_quant, quantize_embedding)
    if quantized and quantizer is not None:
        raise ValueError(
            f"load_llama_gguf: quantized=True keeps the file's Q4_1 codes; quantize="
            f"{quantize!r} re-quantizes from float: pass one of them"
        )
    gguf_reader = GGUFReader(str(path))
    config = llama_config_from_gguf(gguf_reader, **overrides)
    reader = _GGUFReader(gguf_reader, quantized=quantized)
    plan = _llama_plan(config, "gguf")
    ignore = lambda n: n == "rope_freqs.weight"
    _check(plan, reader.shapes, strict=strict, ignore=ignore, what=f"GGUF file {path}")
    return config, _build(
        plan, reader, dtype=dtype, stack_layers=config.scan_layers, quantizer=quantizer
    )


# -------------------------------------------------------------------------------- BERT


_BERT_LAYER = {  # jaxlora path under layers/{i}: HF name under encoder.layer.{i}
    ("attn", "query"): "attention.self.query",
    ("attn", "key"): "attention.self.key",
    ("attn", "value"): "attention.self.value",
    ("attn", "output"): "attention.output.dense",
    ("attn_norm",): "attention.output.LayerNorm",
    ("mlp", "intermediate"): "intermediate.dense",
    ("mlp", "output"): "output.dense",
    ("mlp_norm",): "output.LayerNorm",
}


def _bert_plan(config: BertConfig) -> list[_Tensor]:
    c = config
    d, f = c.hidden_size, c.intermediate_size

    def dense(source: str, path: tuple[str, ...], d_in: int, d_out: int) -> list[_Tensor]:
        return [
            _Tensor(f"{source}.weight", (d_out, d_in), (*path, "kernel"), _transpose),
            _Tensor(f"{source}.bias", (d_out,), (*path, "bias")),
        ]

    def norm(source: str, path: tuple[str, ...]) -> list[_Tensor]:
        return [
            _Tensor(f"{source}.weight", (d,), (*path, "scale")),
            _Tensor(f"{source}.bias", (d,), (*path, "bias")),
        ]

    plan = [
        _Tensor(
            "embeddings.word_embeddings.weight",
            (c.vocab_size, d),
            ("embeddings", "word", "embedding"),
        ),
        _Tensor(
            "embeddings.position_embeddings.weight",
            (c.max_position_embeddings, d),
            ("embeddings", "position", "embedding"),
        ),
        _Tensor(
            "embeddings.token_type_embeddings.weight",
            (c.type_vocab_size, d),
            ("embeddings", "token_type", "embedding"),
        ),
        *norm("embeddings.LayerNorm", ("embeddings", "norm")),
    ]
    for i in range(c.num_layers):
        for rest, name in _BERT_LAYER.items():
            source, path = f"encoder.layer.{i}.{name}", ("layers", str(i), *rest)
            if rest[-1].endswith("norm"):
                plan += norm(source, path)
            else:
                d_in = f if rest == ("mlp", "output") else d
                d_out = f if rest == ("mlp", "intermediate") else d
                plan += dense(source, path, d_in, d_out)
    if c.pooler:
        plan += dense("pooler.dense", ("pooler",), d, d)
    return plan


def load_bert_safetensors(
    path: PathLike,
    *,
    config: BertConfig | None = None,
    dtype: Any = np.float32,
    strict: bool = True,
    **overrides: Any,
) -> tuple[BertConfig, dict[str, Any]]:
    """Loads a Hugging Face BERT checkpoint (e.g. all-MiniLM-L6-v2's ``model.safetensors``).

    Args:
      path: a checkpoint directory (``config.json`` plus ``model.safetensors``) or one
        ``.safetensors`` file.
      config: the model config; read from ``config.json`` beside the weights when None.
      dtype: dtype of the returned parameters.
      strict: raise on tensors the model does not use. The ``position_ids`` buffer, and the
        pooler when ``config.pooler`` is False, are always tolerated.
      **overrides: config fields to set, e.g. ``pooler=True``.

    Returns:
      ``(config, params)``.

    Raises:
      ValueError: if tensors are missing, unexpected or mis-shaped (all named).
      FileNotFoundError: if the files are not there.
    """
    config, reader = _open_safetensors(path, config, BertConfig, overrides)
    plan = _with_prefix(_bert_plan(config), reader.shapes, "bert.", lambda n: False)
    ignore = lambda n: (
        n.endswith("embeddings.position_ids")
        or (not config.pooler and re.search(r"(^|\.)pooler\.dense\.", n) is not None)
    )
    _check(plan, reader.shapes, strict=strict, ignore=ignore, what=f"checkpoint {path}")
    return config, _build(plan, reader, dtype=dtype, stack_layers=False)


def to_hf_state_dict(
    params: Mapping[str, Any], config: LlamaConfig | BertConfig
) -> dict[str, np.ndarray]:
    """The inverse of the safetensors loaders: Hugging Face names, torch ``(out, in)`` layout.

    Llama trees map to ``LlamaForCausalLM`` names (``model.layers.0...``, ``lm_head.weight``
    unless tied), BERT trees to ``BertModel`` names. Scanned layers are unstacked. The
    result can be passed to ``safetensors.numpy.save_file`` or, via ``torch.from_numpy``,
    to ``load_state_dict``.

    Args:
      params: a Llama or BERT parameter tree.
      config: its config.

    Returns:
      A dict of host numpy arrays (copies).
    """
    if isinstance(config, LlamaConfig):
        plan = _llama_plan(config, "hf")
        stacked = config.scan_layers
        name = lambda n: n if n.startswith("lm_head.") else "model." + n
    else:
        plan, stacked, name = _bert_plan(config), False, lambda n: n
    out = {}
    for t in plan:
        path = t.path
        if stacked and path[0] == "layers":
            path = ("layers", *path[2:])
        leaf = params
        for key in path:
            leaf = leaf[key]
        x = np.asarray(leaf[int(t.path[1])] if stacked and t.path[0] == "layers" else leaf)
        # Copies, writable and C-ordered: views of device buffers would be read-only.
        out[name(t.source)] = np.array(x.T if t.transform is _transpose else x, order="C")
    return out


# -------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: PathLike):
    """Loads a ``tokenizers.Tokenizer`` from a ``tokenizer.json``, without padding.

    Padding and truncation are switched off because ``jaxlora.data`` pads to a fixed
    length itself (MiniLM's file pads every batch to its longest member).

    Args:
      path: the ``tokenizer.json`` file or the directory holding it.

    Returns:
      The tokenizer.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added.
_CONTROL, _USER_DEFINED = 3, 4


def load_gguf_tokenizer(path: PathLike):
    """Builds a byte-level BPE ``tokenizers.Tokenizer`` from a GGUF's embedded vocabulary.

    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, as SmolLM2 and Llama 3) with
    the GPT-2 split regex, plus single-digit splitting for the pre-tokenizers that use it
    (``smollm``, ``starcoder``, ``refact``).

    Args:
      path: the ``.gguf`` file.

    Returns:
      The tokenizer (no BOS is added: SmolLM2 declares ``add_bos_token = False``).

    Raises:
      ValueError: for another tokenizer model (e.g. SentencePiece ``llama``).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(str(path))
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}"
        )
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _gguf_field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    return tokenizer
