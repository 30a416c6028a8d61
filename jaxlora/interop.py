"""Interoperability with Hugging Face: the PEFT adapter format and merged full weights.

PEFT stores an adapter as ``adapter_config.json`` plus ``adapter_model.safetensors`` whose
keys name the adapted torch modules (``base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight``) and whose tensors are in torch's ``(out, in)`` convention. jaxlora keys
adapters by the JAX key path of the kernel instead, so both directions take a *module map*
from kernel path to module name; :func:`hf_module_names` builds it for jaxlora's Llama
(``LlamaForCausalLM`` names) and BERT (``BertModel`` names), including scanned layers, whose
stacked kernel maps to one module per layer.

Layouts (``W`` is ``(d_in, d_out)`` here, ``(out, in)`` in torch):

======================  ===========================  ==============================
jaxlora                 PEFT key suffix              torch shape
======================  ===========================  ==============================
LoRA/DoRA ``A``         ``lora_A.weight``            ``(r, in)``  = ``Aᵀ``
LoRA/DoRA ``B``         ``lora_B.weight``            ``(out, r)`` = ``Bᵀ``
DoRA ``m``              ``lora_magnitude_vector``    ``(out,)``
VeRA ``d``, ``b``       ``vera_lambda_d``/``_b``     ``(r,)``, ``(out,)``
VeRA ``A_s``, ``B_s``   ``base_model.vera_A``/``_B`` ``(r, max_in)``, ``(max_out, r)``
======================  ===========================  ==============================

PEFT's scaling is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``); jaxlora nodes store the
scale itself, so export writes ``lora_alpha = scale·r`` (or ``scale·√r``), with
``rank_pattern``/``alpha_pattern`` entries for kernels whose rank or scale differs from the
most common one. Every write goes to a temporary directory that replaces the destination
only once complete, so a failed export leaves what was there untouched.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._version import version as _version
from jaxlora.adapters import SHARED_KEY, adapter_nodes, full_leaves, merge
from jaxlora.dora import DoraAdapter
from jaxlora.keypaths import nest
from jaxlora.lora import LoraAdapter
from jaxlora.targets import Target, TargetsLike, select
from jaxlora.vera import NAME as VERA
from jaxlora.vera import VeraAdapter, VeraShared

if TYPE_CHECKING:  # the models (and flax) load only when a model is exported
    from jaxlora.models.bert import BertConfig
    from jaxlora.models.llama import LlamaConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "export_merged",
    "export_peft",
    "hf_module_names",
    "import_peft",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""Prefix of every per-module key in a PEFT state dict (the wrapped model's names follow)."""

ModuleNames = Mapping[str, str | Sequence[str]]


# ------------------------------------------------------------------------- module maps


def hf_module_names(config: LlamaConfig | BertConfig) -> dict[str, str | tuple[str, ...]]:
    """Kernel path -> Hugging Face module name, for jaxlora's Llama and BERT.

    Llama kernels map to ``LlamaForCausalLM`` module names (``model.layers.0.self_attn.
    q_proj``, ``lm_head``), BERT kernels to ``BertModel`` names (``encoder.layer.0.attention.
    self.query``). With ``scan_layers`` a stacked kernel maps to the tuple of its layers'
    modules, in stack order.

    Args:
      config: A :class:`~jaxlora.models.llama.LlamaConfig` or
        :class:`~jaxlora.models.bert.BertConfig`.

    Returns:
      The module map.

    Examples:
      >>> from jaxlora.models.llama import LlamaConfig
      >>> c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2,
      ...                 num_heads=2, num_kv_heads=1)
      >>> hf_module_names(c)["layers/1/attn/q_proj/kernel"]
      'model.layers.1.self_attn.q_proj'
      >>> import dataclasses
      >>> hf_module_names(dataclasses.replace(c, scan_layers=True))["layers/mlp/up_proj/kernel"]
      ('model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj')
    """
    # The loaders' plans already pair every tensor's HF name with its jaxlora path; kernels
    # are the transposed entries. Reusing them keeps one name table per model.
    from jaxlora.models import loaders
    from jaxlora.models.bert import BertConfig
    from jaxlora.models.llama import LlamaConfig

    if isinstance(config, LlamaConfig):
        plan = loaders._llama_plan(config, "hf")
        stacked = config.scan_layers
        full = lambda n: n if n.startswith("lm_head.") else "model." + n
    elif isinstance(config, BertConfig):
        plan, stacked, full = loaders._bert_plan(config), False, lambda n: n
    else:
        raise TypeError(f"expected a LlamaConfig or BertConfig, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for t in plan:
        if t.transform is None or t.path[-1] != "kernel":
            continue  # embeddings, norms and biases are not linear modules
        module = full(t.source).removesuffix(".weight")
        if stacked and t.path[0] == "layers":
            out.setdefault("/".join(("layers", *t.path[2:])), []).append(module)
        else:
            out["/".join(t.path)] = module
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _modules(module_names: ModuleNames, path: str, count: int) -> tuple[str, ...]:
    if path not in module_names:
        raise KeyError(
            f"no Hugging Face module name for kernel {path!r}; the module map covers "
            f"{sorted(module_names)[:6]}..."
        )
    names = module_names[path]
    names = (names,) if isinstance(names, str) else tuple(names)
    if len(names) != count:
        raise ValueError(
            f"kernel {path!r} stacks {count} layers but the module map gives {len(names)} "
            "module names for it"
        )
    return names


# ---------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def _atomic_directory(directory: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``directory`` once the block succeeds."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # beside the destination, so the final rename never crosses file systems
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _save_safetensors(tensors: dict[str, np.ndarray], file: Path) -> None:
    from safetensors.numpy import save_file

    # PEFT rejects unknown config fields, so the writer is recorded in the file's metadata
    metadata = {"format": "pt", "written_by": f"jaxlora {_version()}"}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata)


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from e


# --------------------------------------------------------------------------- PEFT export


def _per_layer(x: Any, n_stack: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Splits ``(stack..., *rest)`` into one host array per stacked layer, as ``shape``."""
    x = np.asarray(x)
    return list(x.reshape(-1, *shape)) if n_stack else [x.reshape(shape)]


def _majority(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def export_peft(
    directory: str | os.PathLike,
    adapters: Any,
    module_names: ModuleNames,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    use_rslora: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes adapters in the Hugging Face PEFT format.

    Supports LoRA and LoRA-FA (as ``LORA``), rsLoRA (``use_rslora=True``: the same numbers,
    ``lora_alpha`` written as ``scale·√r``), DoRA (``LORA`` with ``use_dora``) and VeRA
    (``VERA`` with ``save_projection``: the shared matrices are written, so PEFT need not
    regenerate them from a torch seed). The result loads with
    ``peft.PeftModel.from_pretrained(model, directory)``.

    Args:
      directory: The output directory (``adapter_config.json`` + ``adapter_model.safetensors``).
      adapters: An adapters tree of one of the supported methods.
      module_names: Kernel path -> module name in the torch model (see
        :func:`hf_module_names`); a stacked kernel maps to one name per layer.
      base_model_name_or_path: Recorded in the config (PEFT loads the base from it when
        asked to).
      task_type: PEFT's task type (``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``, ...);
        ``None`` loads onto any model.
      use_rslora: Write a LoRA scale as rsLoRA's ``alpha/√r`` instead of ``alpha/r``.
      overwrite: Replace an existing ``directory`` (only after the new one is complete).

    Returns:
      The directory.

    Raises:
      ValueError: For mixed or unsupported methods (fully trained leaves, PEFT's
        ``modules_to_save``, are not exported), or a module map that does not fit.
      KeyError: If a kernel has no module name.
      FileExistsError: If ``directory`` exists and ``overwrite`` is false.

    Examples:
      >>> import tempfile, json, jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, alpha=4, targets=".*").init(jax.random.key(0), params)
      >>> out = jl.export_peft(tempfile.mkdtemp() + "/a", adapters, {"dense/kernel": "fc"})
      >>> config = json.loads((out / "adapter_config.json").read_text())
      >>> config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]
      ('LORA', 2, 4.0, ['fc'])
    """
    nodes = adapter_nodes(adapters)
    if full_leaves(adapters):
        raise ValueError(
            "export_peft: fully trained leaves (jl.full, PEFT's modules_to_save) are not "
            f"supported: {sorted(full_leaves(adapters))}"
        )
    if not nodes:
        raise ValueError("export_peft: the adapters tree has no adapter nodes")
    kinds = {type(n) for n in nodes.values()}
    if all(issubclass(k, VeraAdapter) for k in kinds):
        tensors, config = _export_vera(adapters, nodes, module_names)
    elif all(issubclass(k, LoraAdapter | DoraAdapter) for k in kinds):
        dora = {issubclass(k, DoraAdapter) for k in kinds}
        if len(dora) != 1:
            raise ValueError("export_peft: PEFT cannot mix DoRA and plain LoRA in one adapter")
        tensors, config = _export_lora(nodes, module_names, use_rslora, dora.pop())
    else:
        raise ValueError(
            f"export_peft: unsupported or mixed adapter types {sorted(k.__name__ for k in kinds)}"
            "; PEFT export covers LoRA, LoRA-FA, rsLoRA, DoRA and VeRA"
        )
    config.update(
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
        bias="none",
        fan_in_fan_out=False,
        modules_to_save=None,
        revision=None,
    )
    with _atomic_directory(directory, overwrite) as tmp:
        _save_safetensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()


def _export_lora(nodes, module_names, use_rslora: bool, dora: bool):
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, node in sorted(nodes.items()):
        lay = node.layout
        ns = len(lay.stack_axes)
        names = _modules(module_names, path, lay.num_stacked)
        a = _per_layer(node.a, ns, (lay.d_in, node.rank))
        b = _per_layer(node.b, ns, (node.rank, lay.d_out))
        m = _per_layer(node.m, ns, (lay.d_out,)) if dora else [None] * len(names)
        alpha = float(node.scale) * (math.sqrt(node.rank) if use_rslora else node.rank)
        for name, ai, bi, mi in zip(names, a, b, m, strict=True):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = ai.T
            tensors[f"{PREFIX}{name}.lora_B.weight"] = bi.T
            if mi is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = mi
            ranks[name], alphas[name] = node.rank, alpha
    r, alpha = _majority(list(ranks.values())), _majority(list(alphas.values()))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "use_dora": dora,
        "target_modules": sorted(ranks),
        # exact module names, escaped: PEFT matches these keys as regexes on name suffixes
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "lora_bias": False,
        "init_lora_weights": True,
    }
    return tensors, config


def _export_vera(adapters, nodes, module_names):
    shared = adapters.get(SHARED_KEY, {}).get(VERA)
    if shared is None or shared.stripped:
        raise ValueError(
            "export_peft: VeRA needs its shared matrices; pass the full tree (or "
            "jaxlora.vera.restore_shared(adapters))"
        )
    tensors: dict[str, np.ndarray] = {
        "base_model.vera_A": np.asarray(shared.a).T,
        "base_model.vera_B": np.asarray(shared.b).T,
    }
    targets = []
    for path, node in sorted(nodes.items()):
        lay = node.layout
        if node.rank != shared.rank:
            raise ValueError(
                f"export_peft: VeRA adapter at {path!r} has rank {node.rank} but the shared "
                f"matrices {shared.rank}; PEFT has one rank for all layers"
            )
        ns = len(lay.stack_axes)
        names = _modules(module_names, path, lay.num_stacked)
        d = _per_layer(node.d, ns, (node.rank,))
        b = _per_layer(node.b, ns, (lay.d_out,))
        for name, di, bi in zip(names, d, b, strict=True):
            tensors[f"{PREFIX}{name}.vera_lambda_d"] = di
            tensors[f"{PREFIX}{name}.vera_lambda_b"] = bi
            targets.append(name)
    config = {
        "peft_type": "VERA",
        "r": shared.rank,
        "target_modules": sorted(targets),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "init_weights": True,
    }
    return tensors, config


# --------------------------------------------------------------------------- PEFT import


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern key applies to a module whose name ends with a match of it
    # (after a dot, or as the whole name).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_UNSUPPORTED_LORA = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "modules_to_save": None,
    "trainable_token_indices": None,
}


def import_peft(
    directory: str | os.PathLike,
    params: Any,
    module_names: ModuleNames,
    *,
    targets: TargetsLike | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Reads a PEFT LoRA (incl. rsLoRA, DoRA) or VeRA adapter into a jaxlora adapters tree.

    Args:
      directory: A directory written by PEFT's ``save_pretrained`` (or :func:`export_peft`).
      params: The base params the adapter belongs to (only shapes and dtypes are read).
      module_names: Kernel path -> torch module name (see :func:`hf_module_names`).
      targets: How to split the kernels into input/output/stack axes, when the defaults
        (last axis out, the one before in, leading axes stacked) do not fit.
      dtype: dtype of the adapter arrays.

    Returns:
      An adapters tree: ``LoraAdapter`` (or ``DoraAdapter``) nodes, or ``VeraAdapter`` nodes
      with the shared matrices under ``adapters["__shared__"]["vera"]``. Imported VeRA
      matrices are stored in the tree (the key beside them does not regenerate them, so
      do not :func:`~jaxlora.vera.strip_shared` them; :class:`jaxlora.CheckpointManager`
      detects this and stores the matrices).

    Raises:
      ValueError: For another PEFT type, unsupported options (biases, ``fan_in_fan_out``,
        ``modules_to_save``...), tensors for modules the map does not know, wrong shapes,
        or a corrupt file.
      FileNotFoundError: If the files are missing.
    """
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    tensors = _load_safetensors(directory / WEIGHTS_NAME)
    kind = config.get("peft_type")
    if kind not in ("LORA", "VERA"):
        raise ValueError(f"import_peft supports PEFT types LORA and VERA, got {kind!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"import_peft: bias={config['bias']!r} is not supported (only 'none')")
    for field, ok in _UNSUPPORTED_LORA.items():
        if config.get(field, ok) not in (ok, [], {}):
            raise ValueError(f"import_peft: {field}={config[field]!r} is not supported")

    # module name -> (kernel path, index in its stack)
    where = {}
    for path, names in module_names.items():
        names = (names,) if isinstance(names, str) else tuple(names)
        for i, name in enumerate(names):
            where[name] = (path, i, len(names))
    suffixes = (
        ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
        if kind == "LORA"
        else ("vera_lambda_d", "vera_lambda_b")
    )
    per_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unknown = []
    for key, value in tensors.items():
        if kind == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        module = key[len(PREFIX) : -len(suffix) - 1] if suffix and key.startswith(PREFIX) else None
        if module is None or module not in where:
            unknown.append(key)
            continue
        per_module[module][suffix] = value
    if unknown:
        raise ValueError(
            f"import_peft: {len(unknown)} tensors in {directory / WEIGHTS_NAME} do not belong to "
            f"a module of the map: {unknown[:4]}"
        )
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

    def stacked(path: str, suffix: str, shape: tuple[int, ...], transpose: bool) -> jax.Array:
        lay = layouts[path]
        layers = []
        for _, module in sorted(by_path[path]):
            if suffix not in per_module[module]:
                raise ValueError(f"import_peft: {module!r} lacks its {suffix!r} tensor")
            x = per_module[module][suffix]
            x = x.T if transpose else x
            if x.shape != shape:
                raise ValueError(
                    f"import_peft: {module}.{suffix} is {x.shape} (as JAX), expected {shape} "
                    f"for kernel {path!r} of shape {lay.shape}"
                )
            layers.append(x)
        return jnp.asarray(np.stack(layers).reshape(*lay.stack_shape, *shape), dtype)

    nodes = {}
    if kind == "LORA":
        dora = bool(config.get("use_dora", False))
        rslora = bool(config.get("use_rslora", False))
        for path in sorted(by_path):
            lay = layouts[path]
            module = sorted(by_path[path])[0][1]
            r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
            alpha = float(
                _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            )
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            a = stacked(path, "lora_A.weight", (lay.d_in, r), True)
            b = stacked(path, "lora_B.weight", (r, lay.d_out), True)
            a = a.reshape(*lay.stack_shape, *lay.in_shape, r)
            b = b.reshape(*lay.stack_shape, r, *lay.out_shape)
            if dora:
                m = stacked(path, "lora_magnitude_vector", (lay.d_out,), False)
                m = m.reshape(*lay.stack_shape, *lay.out_shape)
                nodes[path] = DoraAdapter(layout=lay, rank=r, scale=scale, a=a, b=b, m=m)
            else:
                nodes[path] = LoraAdapter(layout=lay, rank=r, scale=scale, a=a, b=b)
        return nest(nodes)

    r = int(config["r"])
    if "base_model.vera_A" not in tensors or "base_model.vera_B" not in tensors:
        raise ValueError(
            "import_peft: the VeRA adapter was saved without its projections "
            "(save_projection=False); PEFT regenerates them with torch's generator, which "
            "JAX cannot reproduce"
        )
    a_s = jnp.asarray(tensors["base_model.vera_A"].T, dtype)
    b_s = jnp.asarray(tensors["base_model.vera_B"].T, dtype)
    for path in sorted(by_path):
        lay = layouts[path]
        if lay.d_in > a_s.shape[0] or lay.d_out > b_s.shape[1]:
            raise ValueError(
                f"import_peft: kernel {path!r} ({lay.d_in}->{lay.d_out}) is larger than the "
                f"shared VeRA projections ({a_s.shape[0]}->{b_s.shape[1]})"
            )
        d = stacked(path, "vera_lambda_d", (r,), False)
        b = stacked(path, "vera_lambda_b", (lay.d_out,), False)
        nodes[path] = VeraAdapter(
            layout=lay, rank=r, d=d, b=b.reshape(*lay.stack_shape, *lay.out_shape)
        )
    tree = nest(nodes)
    key = jax.random.key(int(config.get("projection_prng_key", 0)))
    tree[SHARED_KEY] = {
        VERA: VeraShared(
            a=a_s,
            b=b_s,
            key=jax.random.key_data(key),
            impl=str(jax.random.key_impl(key)),
            rank=r,
            max_in=int(a_s.shape[0]),
            max_out=int(b_s.shape[1]),
            dtype=jnp.dtype(dtype).name,
        )
    }
    return tree


# ------------------------------------------------------------------------ merged export


def export_merged(
    directory: str | os.PathLike,
    params: Any,
    adapters: Any,
    config: LlamaConfig | BertConfig,
    *,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes the merged model (``W + ΔW``) as a Hugging Face checkpoint.

    ``model.safetensors`` (torch layout and names, via
    :func:`jaxlora.models.loaders.to_hf_state_dict`) and ``config.json``, loadable with
    ``transformers.LlamaForCausalLM.from_pretrained`` / ``BertModel.from_pretrained``.

    Args:
      directory: The output directory.
      params: The base params.
      adapters: The adapters to merge in (any method; VeRA with its shared matrices).
      config: The model's config.
      dtype: Cast the weights to this dtype (default: keep the params' dtype).
      overwrite: Replace an existing ``directory`` (only after the new one is complete).

    Returns:
      The directory.

    Raises:
      FileExistsError: If ``directory`` exists and ``overwrite`` is false.
    """
    from jaxlora.models.loaders import to_hf_state_dict

    merged = jax.jit(merge)(params, adapters)
    state = to_hf_state_dict(merged, config)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    hf_config = dict(config.to_hf_config())
    hf_config.setdefault(
        "dtype", np.dtype(next(iter(state.values())).dtype).name if state else "float32"
    )
    with _atomic_directory(directory, overwrite) as tmp:
        _save_safetensors(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()
