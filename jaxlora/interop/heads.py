"""Fully trained leaves as PEFT's ``modules_to_save``, and module maps under a sub-tree.

PEFT trains a classifier head (or any whole module) alongside the adapter by wrapping the
torch module and saving its entire ``state_dict`` under the module's own name
(``base_model.model.classifier.weight``), listed in ``adapter_config.json``'s
``modules_to_save``. jaxlora's counterpart is a ``jl.full`` leaf: a trained copy of one base
leaf. A full leaf ``m/x`` belongs to the module that the module map names by ``m/kernel``
(how :func:`jaxlora.interop.hf_module_names` names a linear module) or by ``m`` itself (a
head, a norm); its tensor is torch's ``weight`` (a transposed ``kernel``, a ``scale``, an
``embedding``) or ``bias``. On import the direction is read off the params: a torch
``weight`` becomes whichever of ``kernel``/``scale``/``embedding`` the module holds there.

A module map built for the bare backbone also serves a tree that wraps it
(``{"encoder": backbone, "head": ...}``): :func:`rooted` re-keys it under the sub-tree.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora.keypaths import flatten

__all__ = ["absent_paths", "export_heads", "import_heads", "is_head_tensor", "rooted"]

ModuleNames = Mapping[str, str | Sequence[str]]

# jaxlora leaf name -> (torch tensor name, whether torch stores it transposed)
_TORCH_NAMES = {
    "kernel": ("weight", True),
    "scale": ("weight", False),
    "embedding": ("weight", False),
    "bias": ("bias", False),
}


def rooted(module_names: ModuleNames, prefix: str | None, paths: Sequence[str]) -> ModuleNames:
    """``module_names`` re-keyed under the sub-tree ``prefix``, checked against the tree.

    A key that already names a path of the tree (or a module above some of its leaves,
    like a head beside the backbone: ``"head": "classifier"``) is kept as it is; every
    other key is taken as relative to ``prefix``.

    Args:
      module_names: The module map, keyed relative to ``prefix`` (heads may be keyed by
        their path in the whole tree).
      prefix: The sub-tree the map's keys are relative to (``"encoder"``); None or ``""``
        is the tree itself.
      paths: The leaf (or kernel) paths of the tree being exported or imported.

    Raises:
      ValueError: If no path lies under ``prefix``.

    Examples:
      >>> rooted({"dense/kernel": "fc", "head": "classifier"}, "encoder",
      ...        ["encoder/dense/kernel", "head/kernel", "head/bias"])
      {'encoder/dense/kernel': 'fc', 'head': 'classifier'}
    """
    if not prefix:
        return module_names
    prefix = prefix.strip("/")
    if not any(p.startswith(prefix + "/") for p in paths):
        tops = sorted({p.split("/")[0] for p in paths})
        raise ValueError(
            f"prefix {prefix!r} matches nothing: no path of the tree lies under "
            f"{prefix + '/'!r}; its top-level keys are {tops}"
        )
    in_tree = _ancestors(paths)
    return {(k if k in in_tree else f"{prefix}/{k}"): v for k, v in module_names.items()}


def _ancestors(paths: Sequence[str]) -> set[str]:
    """Every path in ``paths`` and every path above one (a quantized kernel's own leaves
    lie under the kernel's path)."""
    out = set()
    for p in paths:
        parts = p.split("/")
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def absent_paths(wanted: Sequence[str], paths: Sequence[str]) -> str:
    """An error message for the ``wanted`` paths that are not in the tree, or ``""``."""
    in_tree = _ancestors(paths)
    absent = sorted(w for w in wanted if w not in in_tree)
    if not absent:
        return ""
    for w in absent:
        for p in sorted(in_tree):
            if p.endswith("/" + w):
                sub = p[: -len(w) - 1]
                return (
                    f"the module map's paths {absent[:3]} are not in params, which hold them "
                    f"under {sub!r}: pass prefix={sub!r}"
                )
    return f"the module map's paths {absent[:3]} are not in params"


def unrooted_hint(paths: Sequence[str], module_names: ModuleNames) -> str:
    """A hint for an unnamed path: the prefix that would make the map fit, if there is one."""
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[i:]) in module_names:
                sub = "/".join(parts[:i])
                return f"; the map's keys fit under {sub!r}: pass prefix={sub!r}"
    return ""


def _module_of(path: str, module_names: ModuleNames) -> tuple[str, str | Sequence[str], str]:
    """``(jax module path, torch module name(s), jax leaf name)`` of full leaf ``path``."""
    module, _, leaf = path.rpartition("/")
    for key in (f"{module}/kernel", module):
        if module and key in module_names:
            return module, module_names[key], leaf
    raise KeyError(
        f"export_peft: no torch module name for the fully trained leaf {path!r}: the module "
        f"map has neither {module + '/kernel'!r} nor {module!r}; add the module's name in the "
        f'torch model (e.g. {{{module!r}: "classifier"}}){unrooted_hint([path], module_names)}'
    )


def _torch_name(path: str, leaf: str) -> tuple[str, bool]:
    if leaf not in _TORCH_NAMES:
        raise ValueError(
            f"export_peft: the fully trained leaf {path!r} has no torch counterpart: a leaf "
            f"named {leaf!r} is none of {sorted(_TORCH_NAMES)}"
        )
    return _TORCH_NAMES[leaf]


def _to_torch(path: str, x: np.ndarray, transpose: bool) -> np.ndarray:
    if not transpose:
        return x
    if x.ndim != 2:
        raise ValueError(
            f"export_peft: the fully trained kernel {path!r} is {list(x.shape)}, which has no "
            "torch Linear layout (a layer's kernel is (in, out))"
        )
    return x.T


def _with_frozen_siblings(full: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """``full`` plus the other leaves of each of its modules, from ``params``: PEFT saves and
    loads a ``modules_to_save`` module whole (a head's frozen bias included)."""
    leaves = dict(full)
    if params is None:
        return leaves
    modules = {p.rpartition("/")[0] for p in full}
    for path, w in flatten(params).items():
        if path.rpartition("/")[0] in modules and path not in leaves:
            leaves[path] = w
    return leaves


def export_heads(
    full: Mapping[str, Any], module_names: ModuleNames, prefix: str, params: Any = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tensors of fully trained leaves, keyed as PEFT saves ``modules_to_save``.

    Args:
      full: Fully trained leaves by path (``jaxlora.adapters.full_leaves``).
      module_names: The module map (see the module docstring).
      prefix: PEFT's key prefix (``"base_model.model."``).
      params: The base params, if given: a module's leaves that are not trained in full
        are written from them, so the module is whole.

    Returns:
      ``(tensors, modules)``: the tensors in torch layout, and the torch module names for
      ``modules_to_save``, sorted.

    Raises:
      KeyError: For a leaf whose module the map does not name.
      ValueError: For a leaf with no torch counterpart, or a stacked leaf whose module map
        entry gives another number of layers.
    """
    tensors: dict[str, np.ndarray] = {}
    for path, value in _with_frozen_siblings(full, params).items():
        module, names, leaf = _module_of(path, module_names)
        torch_leaf, transpose = _torch_name(path, leaf)
        x = np.asarray(value)
        if isinstance(names, str):
            names, layers = (names,), [x]
        else:  # a scanned stack: one torch module per layer, on the leading axis
            names = tuple(names)
            if x.ndim == 0 or x.shape[0] != len(names):
                raise ValueError(
                    f"export_peft: fully trained leaf {path!r} is {list(x.shape)} but the module "
                    f"map gives {len(names)} layers for {module!r}"
                )
            layers = list(x)
        for name, layer in zip(names, layers, strict=True):
            tensors[f"{prefix}{name}.{torch_leaf}"] = _to_torch(path, layer, transpose)
    modules = sorted({k[len(prefix) :].rpartition(".")[0] for k in tensors})
    return tensors, modules


def is_head_tensor(key: str, modules_to_save: Sequence[str], prefix: str) -> bool:
    """Whether ``key`` is a tensor of a ``modules_to_save`` module, or of a sub-module of
    one (PEFT's rule: the wrapped module's name ends with an entry)."""
    if not key.startswith(prefix):
        return False
    parts = key[len(prefix) :].split(".")[:-1]
    ancestors = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(a.endswith(m) for a in ancestors for m in modules_to_save)


def _reverse(module_names: ModuleNames) -> dict[str, tuple[str, int, int]]:
    """torch module name -> (jax module path, layer index, layer count)."""
    out = {}
    for key, names in module_names.items():
        module = key.removesuffix("/kernel") if key.endswith("/kernel") else key
        names = (names,) if isinstance(names, str) else tuple(names)
        for i, name in enumerate(names):
            out[name] = (module, i, len(names))
    return out


def import_heads(
    tensors: Mapping[str, np.ndarray], params: Any, module_names: ModuleNames, prefix: str
) -> dict[str, Any]:
    """Fully trained leaves by path, from ``modules_to_save`` tensors.

    Each leaf takes the dtype of the base leaf it replaces (a full leaf must match it).

    Args:
      tensors: The head tensors, keyed as PEFT saves them.
      params: The base params (shapes and dtypes are read).
      module_names: The module map.
      prefix: PEFT's key prefix.

    Returns:
      ``{path: array}`` of the fully trained leaves.

    Raises:
      ValueError: For a tensor of a module the map does not know, a tensor name the jax
        module has no leaf for, a wrong shape, or a stack with layers missing.
    """
    flat = flatten(params)
    where = _reverse(module_names)
    layers: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
    counts: dict[str, int] = {}
    for key, value in tensors.items():
        torch_module, _, torch_leaf = key[len(prefix) :].rpartition(".")
        if torch_module not in where:
            raise ValueError(
                f"import_peft: the modules_to_save tensor {key!r} belongs to the torch module "
                f"{torch_module!r}, which the module map does not name; add "
                f'{{"<jax path>": {torch_module!r}}} to it'
            )
        module, i, count = where[torch_module]
        candidates = [
            leaf
            for leaf, (name, _) in _TORCH_NAMES.items()
            if name == torch_leaf and f"{module}/{leaf}" in flat
        ]
        if len(candidates) != 1:
            raise ValueError(
                f"import_peft: the tensor {key!r} fits no single leaf of {module!r} in params "
                f"(looked for {module}/{{kernel,scale,embedding,bias}}, found {candidates})"
            )
        path = f"{module}/{candidates[0]}"
        x = np.asarray(value)
        layers[path][i] = x.T if _TORCH_NAMES[candidates[0]][1] else x
        counts[path] = count
    out = {}
    for path, got in layers.items():
        if len(got) != counts[path]:
            raise ValueError(
                f"import_peft: only {len(got)} of the {counts[path]} layers of the fully "
                f"trained leaf {path!r} are in the file"
            )
        base = flat[path]
        x = got[0] if counts[path] == 1 else np.stack([got[i] for i in range(counts[path])])
        if tuple(x.shape) != tuple(base.shape):
            raise ValueError(
                f"import_peft: the modules_to_save tensors of {path!r} are {list(x.shape)} (as "
                f"JAX), but params hold {list(base.shape)} there"
            )
        out[path] = jnp.asarray(x, base.dtype)
    return out
