"""The Hugging Face PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT keys each tensor by the torch module it adapts (``base_model.model.model.layers.0.
self_attn.q_proj.lora_A.weight``), in torch's ``(out, in)`` convention; jaxlora keys adapters
by the JAX key path of the kernel, so both directions take a *module map* from kernel path to
module name (:func:`jaxlora.interop.hf_module_names`); a stacked kernel maps to one module
per layer. A classifier head trained in full (``jl.full`` leaves) travels as PEFT's
``modules_to_save`` (:mod:`jaxlora.interop.heads`), and a map made for the bare backbone
serves a tree that wraps it through ``prefix=``.

This module is the generic half: reading and checking the config, matching tensors to
modules and modules to kernels, stacking layers, writing atomically. What the tensors *are*
belongs to the methods: each registers a :class:`PeftFormat` for its PEFT type
(:func:`register_format`), which turns its adapter nodes into tensors and a config, and
back. Every write goes to a temporary directory that replaces the destination only once
complete, so a failed export leaves what was there untouched.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from jaxlora.adapters import FULL_KEY, Adapter, adapter_nodes, full_leaves
from jaxlora.interop import files
from jaxlora.interop.heads import (
    absent_paths,
    export_heads,
    import_heads,
    is_head_tensor,
    rooted,
    unrooted_hint,
)
from jaxlora.keypaths import flatten, nest
from jaxlora.targets import KernelLayout, Target, TargetsLike, select

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "Kernels",
    "PeftFormat",
    "export_peft",
    "import_peft",
    "majority",
    "module_names_of",
    "pattern_value",
    "per_layer",
    "register_format",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""Prefix of every per-module key in a PEFT state dict (the wrapped model's names follow)."""

ModuleNames = Mapping[str, str | Sequence[str]]

_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
}


class PeftFormat(Protocol):
    """How one PEFT type maps to adapter nodes; a method implements it and registers it.

    Attributes:
      peft_type: PEFT's ``peft_type`` (``"LORA"``, ``"VERA"``).
      suffixes: The per-module tensor key suffixes (``"lora_A.weight"``, ...).
      global_keys: Tensor keys that belong to no module (VeRA's shared projections).
    """

    peft_type: str
    suffixes: tuple[str, ...]
    global_keys: tuple[str, ...]

    def claims(self, node: Adapter) -> bool:
        """Whether this format can export ``node``."""
        ...

    def export(
        self, adapters: Any, nodes: dict[str, Adapter], module_names: ModuleNames, **options
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(tensors, config)`` of these nodes (the common config fields are added after)."""
        ...

    def build(self, config: dict[str, Any], kernels: Kernels, dtype: Any) -> dict[str, Any]:
        """The adapters tree from the checked config and the tensors grouped by kernel."""
        ...


_FORMATS: dict[str, PeftFormat] = {}


def register_format(fmt: PeftFormat) -> PeftFormat:
    """Registers a method's :class:`PeftFormat` under its ``peft_type``."""
    _FORMATS[fmt.peft_type] = fmt
    return fmt


# ------------------------------------------------------------------- helpers for formats


def module_names_of(module_names: ModuleNames, path: str, count: int) -> tuple[str, ...]:
    """The torch module names of kernel ``path``, which stacks ``count`` layers."""
    if path not in module_names:
        raise KeyError(
            f"no Hugging Face module name for kernel {path!r}; the module map covers "
            f"{sorted(module_names)[:6]}...{unrooted_hint([path], module_names)}"
        )
    names = module_names[path]
    names = (names,) if isinstance(names, str) else tuple(names)
    if len(names) != count:
        raise ValueError(
            f"kernel {path!r} stacks {count} layers but the module map gives {len(names)} "
            "module names for it"
        )
    return names


def per_layer(x: Any, n_stack: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Splits ``(stack..., *rest)`` into one host array per stacked layer, as ``shape``."""
    x = np.asarray(x)
    return list(x.reshape(-1, *shape)) if n_stack else [x.reshape(shape)]


def majority(values: list[Any]) -> Any:
    """The most common of ``values``."""
    return collections.Counter(values).most_common(1)[0][0]


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: a key applies to a module whose name
    ends with a match of it (after a dot, or as the whole name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class Kernels:
    """The imported tensors grouped by kernel: what a format's ``build`` reads."""

    def __init__(self, tensors, by_path, per_module, layouts):
        self.tensors = tensors
        """Every tensor of the file, by key (for global keys)."""
        self.paths = sorted(by_path)
        """The adapted kernels' paths."""
        self.layouts: dict[str, KernelLayout] = layouts
        self._by_path = by_path
        self._per_module = per_module

    def first_module(self, path: str) -> str:
        """The module name of the kernel's first layer (for per-module config patterns)."""
        return sorted(self._by_path[path])[0][1]

    def stacked(self, path: str, suffix: str, shape: tuple[int, ...], transpose: bool, dtype):
        """The ``suffix`` tensors of every layer of ``path``, each checked to be ``shape``
        (after transposing torch's layout), stacked as ``(stack..., *shape)``."""
        lay = self.layouts[path]
        layers = []
        for _, module in sorted(self._by_path[path]):
            if suffix not in self._per_module[module]:
                raise ValueError(f"import_peft: {module!r} lacks its {suffix!r} tensor")
            x = self._per_module[module][suffix]
            x = x.T if transpose else x
            if x.shape != shape:
                raise ValueError(
                    f"import_peft: {module}.{suffix} is {x.shape} (as JAX), expected {shape} "
                    f"for kernel {path!r} of shape {lay.shape}"
                )
            layers.append(x)
        return jnp.asarray(np.stack(layers).reshape(*lay.stack_shape, *shape), dtype)


# --------------------------------------------------------------------------------- export


def _format_of(nodes: dict[str, Adapter]) -> PeftFormat:
    kinds = {type(n) for n in nodes.values()}
    for fmt in _FORMATS.values():
        if all(fmt.claims(n) for n in nodes.values()):
            return fmt
    raise ValueError(
        f"export_peft: unsupported or mixed adapter types {sorted(k.__name__ for k in kinds)}"
        f"; PEFT export covers the types {sorted(_FORMATS)} (LoRA, LoRA-FA, rsLoRA, DoRA, "
        "VeRA), one type per adapter"
    )


def export_peft(
    directory: str | os.PathLike,
    adapters: Any,
    module_names: ModuleNames,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    use_rslora: bool = False,
    prefix: str | None = None,
    params: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes adapters in the Hugging Face PEFT format.

    Supports LoRA and LoRA-FA (as ``LORA``), rsLoRA (``use_rslora=True``: the same numbers,
    ``lora_alpha`` written as ``scale·√r``), DoRA (``LORA`` with ``use_dora``) and VeRA
    (``VERA`` with ``save_projection``: the shared matrices are written, so PEFT need not
    regenerate them from a torch seed). Fully trained leaves (``jl.full``: a classifier
    head) are written as PEFT's ``modules_to_save``: each whole torch module under its own
    name (``base_model.model.classifier.weight``), listed in the config. The result loads
    with ``peft.PeftModel.from_pretrained(model, directory)``.

    Args:
      directory: The output directory (``adapter_config.json`` + ``adapter_model.safetensors``).
      adapters: An adapters tree of one of the supported methods.
      module_names: Kernel path -> module name in the torch model (see
        :func:`jaxlora.interop.hf_module_names`); a stacked kernel maps to one name per layer.
        A fully trained leaf ``m/x`` takes the module named by ``m/kernel`` or ``m``
        (``{"head": "classifier"}``); its tensor is ``weight`` (a transposed ``kernel``, a
        ``scale``, an ``embedding``) or ``bias``. PEFT saves and loads whole modules: train
        every leaf of a head in full (``jl.full(targets="head/.*")``), or pass ``params``.
      base_model_name_or_path: Recorded in the config (PEFT loads the base from it when
        asked to).
      task_type: PEFT's task type (``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``, ...);
        ``None`` loads onto any model.
      use_rslora: Write a LoRA scale as rsLoRA's ``alpha/√r`` instead of ``alpha/r``.
      prefix: The sub-tree of ``adapters`` that ``module_names`` is keyed relative to, when
        the backbone sits inside a wrapping tree (``"encoder"`` for
        ``{"encoder": backbone, "head": head}``); keys that already name a path of the tree
        (the head) are used as they are.
      params: The base params. Only read for a module some of whose leaves are trained in
        full: its other leaves (a frozen bias) are written from them, so PEFT finds the
        whole module.
      overwrite: Replace an existing ``directory`` (only after the new one is complete).

    Returns:
      The directory.

    Raises:
      ValueError: For mixed or unsupported methods, a fully trained leaf with no torch
        counterpart, a module map that does not fit, or a ``prefix`` that matches nothing.
      KeyError: If a kernel or a fully trained leaf has no module name.
      FileExistsError: If ``directory`` exists and ``overwrite`` is false.

    Examples:
      >>> import tempfile, json, jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, alpha=4, targets=".*").init(jax.random.key(0), params)
      >>> out = jl.export_peft(tempfile.mkdtemp() + "/a", adapters, {"dense/kernel": "fc"})
      >>> config = json.loads((out / "adapter_config.json").read_text())
      >>> config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]
      ('LORA', 2, 4.0, ['fc'])

      A backbone under ``"encoder"`` with a head trained in full beside it:

      >>> params = {"encoder": params, "head": {"kernel": jnp.ones((3, 2))}}
      >>> method = jl.compose(jl.lora(rank=2, targets="encoder/.*"), jl.full(targets="head/.*"))
      >>> adapters = method.init(jax.random.key(0), params)
      >>> names = {"dense/kernel": "fc", "head": "classifier"}
      >>> out = jl.export_peft(tempfile.mkdtemp() + "/b", adapters, names, prefix="encoder")
      >>> json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
      ['classifier']
    """
    nodes = adapter_nodes(adapters)
    full = full_leaves(adapters)
    if not nodes:
        raise ValueError(
            "export_peft: the adapters tree has no adapter nodes"
            + (f" (only fully trained leaves {sorted(full)})" if full else "")
        )
    module_names = rooted(module_names, prefix, [*nodes, *full])
    fmt = _format_of(nodes)
    tensors, config = fmt.export(adapters, nodes, module_names, use_rslora=use_rslora)
    head_tensors, heads = export_heads(full, module_names, PREFIX, params)
    tensors.update(head_tensors)
    config.update(
        peft_type=fmt.peft_type,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
        bias="none",
        fan_in_fan_out=False,
        modules_to_save=heads or None,
        revision=None,
    )
    with files.atomic_directory(directory, overwrite) as tmp:
        files.save_safetensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()


# --------------------------------------------------------------------------------- import


def _read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e


def _checked_format(config: dict[str, Any]) -> PeftFormat:
    """The registered format of ``config``'s PEFT type; refuses options it cannot represent."""
    kind = config.get("peft_type")
    if kind not in _FORMATS:
        raise ValueError(
            f"import_peft supports PEFT types {' and '.join(sorted(_FORMATS))}, got {kind!r}"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(f"import_peft: bias={config['bias']!r} is not supported (only 'none')")
    for field, ok in _UNSUPPORTED.items():
        if config.get(field, ok) not in (ok, [], {}):
            raise ValueError(f"import_peft: {field}={config[field]!r} is not supported")
    return _FORMATS[kind]


def _module_index(module_names: ModuleNames) -> dict[str, tuple[str, int, int]]:
    """Module name -> (kernel path, index in its stack, stack size)."""
    where = {}
    for path, names in module_names.items():
        names = (names,) if isinstance(names, str) else tuple(names)
        for i, name in enumerate(names):
            where[name] = (path, i, len(names))
    return where


def _by_module(tensors, fmt: PeftFormat, where, file: Path) -> dict[str, dict[str, Any]]:
    """``{module: {suffix: tensor}}``; a tensor of no known module is an error."""
    per_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unknown = []
    for key, value in tensors.items():
        if key in fmt.global_keys:
            continue
        suffix = next((s for s in fmt.suffixes if key.endswith("." + s)), None)
        module = key[len(PREFIX) : -len(suffix) - 1] if suffix and key.startswith(PREFIX) else None
        if module is None or module not in where:
            unknown.append(key)
            continue
        per_module[module][suffix] = value
    if unknown:
        raise ValueError(
            f"import_peft: {len(unknown)} tensors in {file} do not belong to a module of the "
            f"map: {unknown[:4]}"
        )
    return per_module


def _by_kernel(per_module, where) -> dict[str, list[tuple[int, str]]]:
    """``{kernel path: [(layer index, module), ...]}``, every stacked layer present."""
    by_path: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for module in per_module:
        path, i, _ = where[module]
        by_path[path].append((i, module))
    incomplete = [p for p, got in by_path.items() if len(got) != where[got[0][1]][2]]
    if incomplete:
        raise ValueError(
            f"import_peft: only some layers of the stacked kernels {incomplete} are adapted; "
            "a stacked kernel's adapter covers all its layers"
        )
    return by_path


def import_peft(
    directory: str | os.PathLike,
    params: Any,
    module_names: ModuleNames,
    *,
    targets: TargetsLike | None = None,
    prefix: str | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Reads a PEFT LoRA (incl. rsLoRA, DoRA) or VeRA adapter into a jaxlora adapters tree.

    The tensors of PEFT's ``modules_to_save`` (a classifier head) come back as fully trained
    leaves (``adapters["__full__"]``, as ``jl.full`` makes them), so ``merge`` and ``adapt``
    use them in place of the base leaves, and training goes on from them.

    Args:
      directory: A directory written by PEFT's ``save_pretrained`` (or :func:`export_peft`).
      params: The base params the adapter belongs to (only shapes and dtypes are read).
      module_names: Kernel path -> torch module name (see
        :func:`jaxlora.interop.hf_module_names`); a ``modules_to_save`` module is found
        under the path the map gives it (``{"head": "classifier"}``, as for
        :func:`export_peft`), and its ``weight`` is that module's ``kernel`` (transposed),
        ``scale`` or ``embedding``, whichever ``params`` holds.
      targets: How to split the kernels into input/output/stack axes, when the defaults
        (last axis out, the one before in, leading axes stacked) do not fit.
      prefix: The sub-tree of ``params`` that ``module_names`` is keyed relative to (see
        :func:`export_peft`).
      dtype: dtype of the adapter arrays (fully trained leaves take their base leaf's).

    Returns:
      An adapters tree: ``LoraAdapter`` (or ``DoraAdapter``) nodes, or ``VeraAdapter`` nodes
      with the shared matrices under ``adapters["__shared__"]["vera"]``, plus the
      ``modules_to_save`` leaves under ``adapters["__full__"]``. Imported VeRA matrices are
      stored in the tree (the key beside them does not regenerate them, so a checkpoint
      stores the matrices).

    Raises:
      ValueError: For another PEFT type, unsupported options (biases, ``fan_in_fan_out``,
        ...), tensors for modules the map does not know, wrong shapes, a ``prefix`` that
        matches nothing, or a corrupt file.
      FileNotFoundError: If the files are missing.
    """
    directory = Path(directory)
    config = _read_config(directory)
    tensors = files.load_safetensors(directory / WEIGHTS_NAME)
    fmt = _checked_format(config)
    paths = list(flatten(params))
    module_names = rooted(module_names, prefix, paths)
    saved = config.get("modules_to_save") or []
    heads = {k: v for k, v in tensors.items() if is_head_tensor(k, saved, PREFIX)}
    tensors = {k: v for k, v in tensors.items() if k not in heads}
    where = _module_index(module_names)
    per_module = _by_module(tensors, fmt, where, directory / WEIGHTS_NAME)
    by_path = _by_kernel(per_module, where)
    absent = absent_paths(sorted(by_path), paths)
    if absent:
        raise ValueError(f"import_peft: {absent}")
    specs = targets
    if specs is None:
        # a kernel the map names layer by layer is stacked on its leading axis
        layered = {p for p, names in module_names.items() if not isinstance(names, str)}
        specs = [
            Target(re.escape(p), stack_axes=(0,) if p in layered else None) for p in sorted(by_path)
        ]
    layouts = select(params, specs)
    missing = sorted(set(by_path) - set(layouts))
    if missing:
        raise ValueError(f"import_peft: targets do not select the adapted kernels {missing}")
    adapters = fmt.build(config, Kernels(tensors, by_path, per_module, layouts), dtype)
    if heads:
        adapters[FULL_KEY] = nest(import_heads(heads, params, module_names, PREFIX))
    return adapters
