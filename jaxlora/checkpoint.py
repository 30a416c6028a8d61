"""Checkpoints of a training run: adapters, optimizer state, step, RNG key, data position.

:class:`CheckpointManager` wraps orbax's ``CheckpointManager`` (retention, async writes,
atomic step directories, multi-host) and adds what a fine-tuning run needs on top:

* **Adapter-only.** The frozen base is never written. The one exception is a method that
  moves the base (Delta-LoRA): pass ``base=params`` and only the *targeted kernels* are
  stored, in full. That is the price of an exact resume: ``W_t = W_0 + λ(A_tB_t − A_KB_K)``
  holds in exact arithmetic only, so a ``W_0``-relative delta or the factors at step ``K``
  would restore ``W_t`` to within rounding, not bit-for-bit. The cost is the size of the
  targeted kernels (for SmolLM2 with all-linear targets, ≈ 90% of the model).
* **Plain trees on disk.** Every pytree is written as a nested dict of arrays keyed by its
  key path (``layers/0/attn/q_proj/kernel/a``), so the files do not depend on pytree node
  classes. The static configuration that lives in the adapters' treedef (method class,
  layout, rank, scale) is recorded as JSON beside it, together with the shape and dtype of
  every array, and a restore whose target disagrees is refused with the differences named.
* **VeRA key-only.** VeRA's shared random matrices are stored as the PRNG key they are
  drawn from whenever regenerating them from it reproduces them bit-for-bit (checked at
  save time), so a VeRA checkpoint is its per-layer vectors plus a few bytes.
* **Any mesh.** Arrays are restored into the shardings of the target tree (or ones passed
  explicitly), whatever mesh wrote them.
* **Small arrays packed.** orbax spends a few KB per array; arrays up to
  :data:`PACK_LIMIT` bytes are packed into one buffer per dtype, so hundreds of small
  vectors cost their bytes, not their count. An adapter-only checkpoint of SmolLM2 is
  ≤ 1.05× its trainable bytes (``scripts/checkpoint_sizes.py``).

orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by a crash or a kill leaves the earlier steps intact and restorable.

Examples:
  >>> import tempfile, jax, jax.numpy as jnp, optax, jaxlora as jl
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> method = jl.lora(rank=2, targets=".*kernel")
  >>> adapters = method.init(jax.random.key(0), params)
  >>> tx = jl.optimizer(optax.adam(1e-3))
  >>> with jl.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
  ...     mgr.save(10, adapters=adapters, opt_state=tx.init(adapters), data_position=640)
  ...     mgr.wait()
  ...     target = jax.eval_shape(method.init, jax.random.key(0), params)
  ...     state = mgr.restore(adapters=target, opt_state=jax.eval_shape(tx.init, target))
  True
  >>> state.step, state.data_position
  (10, 640)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.adapters import FROZEN, SHARED_KEY, adapter_nodes, full_leaves, labels
from jaxlora.targets import KernelLayout, path_str
from jaxlora.vera import NAME as VERA
from jaxlora.vera import restore_shared, strip_shared

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "TrainState",
    "array_bytes",
    "checkpoint_bytes",
    "describe_adapters",
]

FORMAT_VERSION = 1
"""Version of the layout written by :class:`CheckpointManager`; newer ones are refused."""

_ADAPTERS, _OPT_STATE, _BASE, _META = "adapters", "opt_state", "base", "meta"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the given target, or cannot be read."""


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What :meth:`CheckpointManager.restore` returns."""

    step: int
    """The step the checkpoint was saved at."""
    adapters: Any
    """The adapters tree (VeRA's shared matrices regenerated if they were stored as a key)."""
    opt_state: Any
    """The optimizer state, or ``None`` if none was saved or asked for."""
    rng: Any
    """The RNG key (typed if a typed key was saved), or ``None``."""
    data_position: int
    """Where the data stream was (e.g. the number of examples consumed)."""
    base: Any
    """The ``base`` passed to restore with the checkpoint's moved kernels put in (Delta-LoRA),
    or ``None`` when no base was passed."""
    metrics: dict[str, float] | None
    """The metrics saved with the step."""


def _version() -> str:
    try:
        return importlib_metadata.version("jaxlora")
    except importlib_metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


# ------------------------------------------------------------------ trees <-> plain dicts


def _segment(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_segment(k) for k in kp) for kp, _ in flat]
    return paths, [x for _, x in flat], treedef


def _nested(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = leaf
    return out


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


_PACKED = "__packed__"
PACK_LIMIT = 1 << 18
"""Arrays up to this many bytes are packed into one buffer per dtype (see :func:`_pack`)."""


def _pack(
    paths: list[tuple[str, ...]], leaves: list[Any]
) -> tuple[dict[str, Any], dict[str, list[list[Any]]]]:
    """Nested dict for orbax, with small arrays packed into one flat buffer per dtype.

    orbax spends a few KB of index and metadata per array, which would more than double a
    VeRA checkpoint (hundreds of vectors of a few hundred floats each). Packing copies the
    small arrays to the host (they are small; arrays another process holds parts of are
    left alone) and keeps each one's offset, so restoring them is an exact slice.
    """
    plain_paths, plain_leaves = [], []
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for path, x in zip(paths, leaves, strict=True):
        nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        local = not isinstance(x, jax.Array) or x.is_fully_addressable
        if nbytes <= PACK_LIMIT and local:
            groups.setdefault(np.dtype(x.dtype).name, []).append(("/".join(path), np.asarray(x)))
        else:
            plain_paths.append(path)
            plain_leaves.append(x)
    nested = _nested(plain_paths, plain_leaves)
    if _PACKED in nested:
        raise CheckpointError(f"a tree with a top-level key {_PACKED!r} cannot be saved")
    layout: dict[str, list[list[Any]]] = {}
    buffers = {}
    for dtype, members in groups.items():
        offset, rows = 0, []
        for joined, x in members:
            rows.append([joined, offset])
            offset += x.size
        layout[dtype] = rows
        buffers[dtype] = np.concatenate([x.ravel() for _, x in members])
    if buffers:
        nested[_PACKED] = buffers
    return nested, layout


def _manifest(paths: list[tuple[str, ...]], leaves: list[Any]) -> list[list[Any]]:
    return [
        ["/".join(p), list(np.shape(x)), np.dtype(x.dtype).name]
        for p, x in zip(paths, leaves, strict=True)
    ]


# -------------------------------------------------------------------------- description


def _jsonable(value: Any) -> Any:
    if isinstance(value, KernelLayout):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def _static(node: Any, data_fields: tuple[str, ...]) -> dict[str, Any]:
    return {
        f.name: _jsonable(getattr(node, f.name))
        for f in dataclasses.fields(node)
        if f.name not in data_fields
    }


def describe_adapters(adapters: Any) -> dict[str, Any]:
    """The static configuration of an adapters tree, as JSON-ready data.

    This is what a checkpoint records to refuse a mismatched restore: for every adapted
    kernel its node class (the method) and static fields (layout, rank, scale), the paths
    of fully trained leaves, and the configuration of shared state (VeRA's rank and sizes).

    Args:
      adapters: An adapters tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``{"nodes": {path: {"class": ..., **static}}, "full": [...], "shared": {...}}``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> d = describe_adapters(jl.lora(rank=2, targets=".*").init(jax.random.key(0), params))
      >>> d["nodes"]["dense/kernel"]["class"], d["nodes"]["dense/kernel"]["rank"]
      ('LoraAdapter', 2)
    """
    nodes = {
        path: {"class": type(node).__name__, **_static(node, type(node).ARRAYS)}
        for path, node in sorted(adapter_nodes(adapters).items())
    }
    shared = {}
    for name, value in adapters.get(SHARED_KEY, {}).items():
        if dataclasses.is_dataclass(value):
            data = tuple(k for k in ("a", "b", "key") if hasattr(value, k))
            shared[name] = {"class": type(value).__name__, **_static(value, data)}
        else:
            shared[name] = {"class": type(value).__name__}
    return {"nodes": nodes, "full": sorted(full_leaves(adapters)), "shared": shared}


def _compare_descriptions(saved: dict[str, Any], target: dict[str, Any]) -> list[str]:
    problems = []
    s_nodes, t_nodes = saved["nodes"], target["nodes"]
    only_saved = sorted(set(s_nodes) - set(t_nodes))
    only_target = sorted(set(t_nodes) - set(s_nodes))
    if only_saved or only_target:
        problems.append(
            "the target sets differ: adapted only in the checkpoint "
            f"{_short(only_saved)}, only in the target {_short(only_target)}"
        )
    for path in sorted(set(s_nodes) & set(t_nodes)):
        s, t = s_nodes[path], t_nodes[path]
        if s["class"] != t["class"]:
            problems.append(
                f"{path!r}: the checkpoint holds a {s['class']} (another method), the target "
                f"a {t['class']}"
            )
            continue
        for field in sorted(set(s) | set(t)):
            if s.get(field) != t.get(field):
                problems.append(
                    f"{path!r}: {field} is {s.get(field)!r} in the checkpoint but "
                    f"{t.get(field)!r} in the target"
                )
    if saved["full"] != target["full"]:
        problems.append(
            f"fully trained leaves differ: checkpoint {_short(saved['full'])}, "
            f"target {_short(target['full'])}"
        )
    if saved["shared"] != target["shared"]:
        problems.append(
            f"shared state differs: checkpoint {saved['shared']}, target {target['shared']}"
        )
    return problems


def _short(items: list[str], n: int = 4) -> str:
    if len(items) <= n:
        return str(items)
    return f"{items[:n]} and {len(items) - n} more"


# ------------------------------------------------------------------------------- VeRA


def _vera_regenerable(adapters: Any) -> bool:
    """Whether VeRA's shared matrices are exactly what their stored key regenerates."""
    sh = adapters[SHARED_KEY][VERA]
    if sh.stripped:
        return True
    again = restore_shared(strip_shared(adapters))[SHARED_KEY][VERA]
    return bool(jnp.array_equal(again.a, sh.a)) and bool(jnp.array_equal(again.b, sh.b))


def _has_vera(adapters: Any) -> bool:
    return isinstance(adapters, dict) and VERA in adapters.get(SHARED_KEY, {})


# ----------------------------------------------------------------------- frozen arrays


def _split_frozen(adapters: Any) -> tuple[Any, dict[str, Any]]:
    """``(adapters with None at frozen per-layer arrays, {path: frozen array})``.

    Shared state (VeRA's key and matrices) is left in place: it has its own storage rule.
    """
    lab = labels(adapters)
    frozen: dict[str, Any] = {}

    def pick(kp, x, lb):
        if lb == FROZEN and _segment(kp[0]) != SHARED_KEY:
            frozen["/".join(_segment(k) for k in kp)] = x
            return None
        return x

    return jax.tree_util.tree_map_with_path(pick, adapters, lab), frozen


def _split_frozen_like(tree: Any, adapters: Any) -> tuple[Any, None]:
    """:func:`_split_frozen`'s None pattern, applied to a tree shaped like ``adapters``."""
    lab = labels(adapters)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, lb: None if lb == FROZEN and _segment(kp[0]) != SHARED_KEY else x,
        tree,
        lab,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    ), None


def _fingerprint(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        raise CheckpointError(
            "this checkpoint does not store the adapters' frozen arrays (store_frozen=False): "
            "pass concrete target adapters from method.init with the run's key, not shapes"
        )
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError(
            "store_frozen=False needs frozen arrays this process can read in full; in a "
            "multi-process run keep store_frozen=True"
        )
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


# ------------------------------------------------------------------------------ manager


def _replicated() -> NamedSharding:
    # Replicated over every device of every process: valid as a global sharding in a
    # multi-host run too, where a single-device sharding would not be.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return NamedSharding(mesh, P())


def _rng_json(rng: Any) -> dict[str, Any] | None:
    if rng is None:
        return None
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(rng) if typed else rng
    return {
        "typed": bool(typed),
        "impl": str(jax.random.key_impl(rng)) if typed else None,
        "data": np.asarray(data).tolist(),
        "dtype": np.dtype(np.asarray(data).dtype).name,
    }


def _rng_from_json(saved: dict[str, Any] | None) -> Any:
    if saved is None:
        return None
    data = jnp.asarray(np.asarray(saved["data"], dtype=saved["dtype"]))
    return jax.random.wrap_key_data(data, impl=saved["impl"]) if saved["typed"] else data


def _metrics_json(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


class CheckpointManager:
    """Saves and restores training runs of adapters (orbax ``CheckpointManager`` inside).

    Args:
      directory: Where the step directories live (created if needed).
      max_to_keep: Keep the latest ``max_to_keep`` steps (``None``: keep all).
      best_metric: Name of a metric passed to :meth:`save`; the ``keep_best`` steps that
        are best by it are kept too, whatever their age.
      best_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      keep_best: How many best steps to keep (with ``best_metric``).
      async_save: Write in a background thread: :meth:`save` returns once the arrays are
        copied off the devices (so they may be donated to the next step at once) and
        :meth:`wait` blocks until the files are complete.
      method: Optional method name (or anything with a ``name``, such as a
        :class:`jaxlora.Method`), recorded and checked at restore.
      store_frozen: Store frozen per-layer arrays (LoRA-FA's random ``A``). With ``False``
        only their SHA-256 is stored, and restore takes them from the target adapters,
        which must then be concrete, made by ``method.init`` with the run's key (a
        mismatch is refused). That halves a LoRA-FA checkpoint. VeRA's shared matrices
        are always stored as their key when it regenerates them.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.lora(rank=2, targets=".*").init(jax.random.key(0), params)
      >>> mgr = jl.CheckpointManager(tempfile.mkdtemp(), max_to_keep=None,
      ...                            best_metric="loss", keep_best=1)
      >>> for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
      ...     _ = mgr.save(step, adapters=adapters, metrics={"loss": loss})
      >>> mgr.wait(); mgr.all_steps(), mgr.best_step()
      ([1, 2, 3], 2)
      >>> mgr.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
        method: Any = None,
        store_frozen: bool = True,
    ):
        import orbax.checkpoint as ocp

        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.method = getattr(method, "name", method)
        self.store_frozen = store_frozen
        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if best_metric is not None:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # temporary directories of saves that were killed are removed on start
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- housekeeping

    def all_steps(self) -> list[int]:
        """The steps with a complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best complete step by ``best_metric`` (``None`` without one or no metrics)."""
        if self.best_metric is None:
            return None
        scored = []
        for step in self.all_steps():
            m = self.metadata(step).get("metrics") or {}
            if self.best_metric in m:
                scored.append((m[self.best_metric], step))
        if not scored:
            return None
        return (min if self.best_mode == "min" else max)(scored)[1]

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a step (the latest by default): description, manifests, ...

        Raises:
          CheckpointError: If there is no such step or its metadata cannot be read.
        """
        step = self._resolve_step(step)
        ocp = self._ocp
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: cannot "
                f"read its metadata ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(meta, dict) or meta.get("format") is None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was not written by "
                "jaxlora.CheckpointManager (its metadata has no format version)"
            )
        if meta["format"] > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint step {step} has format {meta['format']}, newer than this jaxlora "
                f"({_version()}) reads ({FORMAT_VERSION}); upgrade jaxlora"
            )
        return meta

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory}; it has {steps}"
            )
        return step

    # -- save

    def save(
        self,
        step: int,
        *,
        adapters: Any,
        opt_state: Any = None,
        rng: Any = None,
        data_position: int = 0,
        base: Any = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Writes one step (asynchronously unless ``async_save=False``).

        Args:
          step: The training step (an int; each step is written once).
          adapters: The adapters tree.
          opt_state: The optimizer state, or ``None``.
          rng: The run's PRNG key (typed or raw), or ``None``.
          data_position: Where the data stream is, to resume it.
          base: Only for methods that move the base (Delta-LoRA): the current base params,
            of which the targeted kernels are stored (in full; see the module docstring).
          metrics: Scalars recorded with the step; ``best_metric`` must be among them.

        Returns:
          ``True`` (the step was saved or queued).

        Raises:
          CheckpointError: If the step exists already, or ``best_metric`` is missing.
        """
        ocp = self._ocp
        step = int(step)
        if step in self.all_steps():
            raise CheckpointError(
                f"step {step} is already saved in {self.directory}; refusing to overwrite it"
            )
        metrics = _metrics_json(metrics)
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            raise CheckpointError(
                f"the manager keeps the best steps by {self.best_metric!r}: pass "
                f"metrics={{{self.best_metric!r}: ...}} to save()"
            )
        vera_storage = None
        if _has_vera(adapters):
            vera_storage = "key" if _vera_regenerable(adapters) else "matrices"
            if vera_storage == "key":
                adapters = strip_shared(adapters)
        frozen_sha = None
        if not self.store_frozen:
            adapters, frozen = _split_frozen(adapters)
            frozen_sha = {path: _fingerprint(x) for path, x in frozen.items()}
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "jaxlora_version": _version(),
            "method": self.method,
            "step": step,
            "data_position": int(data_position),
            "rng": _rng_json(rng),
            "metrics": metrics,
            "adapters": describe_adapters(adapters),
            "vera_storage": vera_storage,
            "frozen_sha256": frozen_sha,
            "manifests": {},
            "packed": {},
        }
        items: dict[str, Any] = {}
        trees = {_ADAPTERS: adapters, _OPT_STATE: opt_state}
        if base is not None:
            trees[_BASE] = self._base_kernels(base, adapters)
        for name, tree in trees.items():
            if tree is None:
                continue
            paths, leaves, _ = _leaf_paths(tree)
            meta["manifests"][name] = _manifest(paths, leaves)
            if leaves:  # orbax cannot write an empty tree (e.g. plain SGD's state)
                nested, meta["packed"][name] = _pack(paths, leaves)
                items[name] = ocp.args.StandardSave(nested)
        items[_META] = ocp.args.JsonSave(meta)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:  # raced another writer
            raise CheckpointError(f"step {step} is already saved in {self.directory}") from e
        return True

    @staticmethod
    def _base_kernels(base: Any, adapters: Any) -> dict[str, Any]:
        wanted = set(adapter_nodes(adapters))
        flat = jax.tree_util.tree_flatten_with_path(base)[0]
        kernels = {path_str(kp): x for kp, x in flat if path_str(kp) in wanted}
        missing = sorted(wanted - set(kernels))
        if missing:
            raise CheckpointError(f"base lacks the targeted kernels {_short(missing)}")
        return kernels

    # -- restore

    def restore(
        self,
        step: int | None = None,
        *,
        adapters: Any,
        opt_state: Any = None,
        base: Any = None,
        adapter_shardings: Any = None,
        opt_state_shardings: Any = None,
    ) -> TrainState:
        """Restores a step into the structure, dtypes and shardings of the given targets.

        Args:
          step: The step; the latest by default.
          adapters: The target adapters tree, concrete or abstract; usually
            ``jax.eval_shape(method.init, key, params)``. Its static configuration (method,
            targets, rank, scale, layout) must equal the checkpoint's.
          opt_state: The target optimizer state (e.g. ``jax.eval_shape(tx.init,
            adapters)``), or ``None`` to skip it.
          base: The base params (as loaded, ``W_0``) when the checkpoint holds moved kernels
            (Delta-LoRA); they are returned with those kernels replaced. Required then.
          adapter_shardings: A tree of ``jax.sharding.Sharding`` like ``adapters``;
            defaults to each target leaf's own ``.sharding``, else replicated.
          opt_state_shardings: Likewise for ``opt_state``.

        Returns:
          A :class:`TrainState`.

        Raises:
          CheckpointError: If there is no such step, the files are corrupt or truncated, or
            the target does not match the checkpoint (another method, rank, target set,
            shape or optimizer); the message lists the differences.
        """
        ocp = self._ocp
        step = self._resolve_step(step)
        meta = self.metadata(step)
        self._check_method(meta, step)
        target_desc_tree = adapters
        if meta.get("vera_storage") == "key":
            target_desc_tree = strip_shared(adapters)
        problems = _compare_descriptions(meta["adapters"], describe_adapters(target_desc_tree))
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the target "
                "adapters:\n  " + "\n  ".join(problems)
            )
        manifests = meta["manifests"]
        if meta.get("vera_storage") == "key" and adapter_shardings is not None:
            shared_shardings = adapter_shardings[SHARED_KEY][VERA]
            adapter_shardings = strip_shared(adapter_shardings)
        else:
            shared_shardings = None
        plans: dict[str, tuple[Any, list[tuple[str, ...]], list[Any]]] = {}
        frozen_sha = meta.get("frozen_sha256")
        stored_tree, stored_shardings = target_desc_tree, adapter_shardings
        if frozen_sha is not None:
            stored_tree, frozen = _split_frozen(target_desc_tree)
            if adapter_shardings is not None:
                stored_shardings, _ = _split_frozen_like(adapter_shardings, target_desc_tree)
            if sorted(frozen) != sorted(frozen_sha):
                raise CheckpointError(
                    f"the frozen arrays of the target ({_short(sorted(frozen))}) are not those "
                    f"the checkpoint omitted ({_short(sorted(frozen_sha))})"
                )
            differ = sorted(p for p, x in frozen.items() if _fingerprint(x) != frozen_sha[p])
            if differ:
                raise CheckpointError(
                    f"checkpoint step {step} was saved without its frozen arrays, and the "
                    f"target's differ from the run's at {_short(differ)}: create the target "
                    "with method.init and the key the run was initialised with"
                )
        plans[_ADAPTERS] = self._plan(_ADAPTERS, stored_tree, stored_shardings, manifests)
        if opt_state is not None:
            if _OPT_STATE not in manifests:
                raise CheckpointError(f"checkpoint step {step} holds no optimizer state")
            plans[_OPT_STATE] = self._plan(_OPT_STATE, opt_state, opt_state_shardings, manifests)
        if _BASE in manifests:
            if base is None:
                raise CheckpointError(
                    f"checkpoint step {step} holds moved base kernels (Delta-LoRA): pass the "
                    "original base params as base= so they can be put back in"
                )
            kernels = self._base_kernels(base, target_desc_tree)
            plans[_BASE] = self._plan(_BASE, kernels, None, manifests)
        packed = meta.get("packed", {})
        items = {}
        offsets: dict[str, dict[str, tuple[str, int]]] = {}
        for name, (_, paths, abstract) in plans.items():
            if not paths:
                continue
            layout = packed.get(name, {})
            offsets[name] = {j: (dt, off) for dt, rows in layout.items() for j, off in rows}
            keep = [i for i, p in enumerate(paths) if "/".join(p) not in offsets[name]]
            nested = _nested([paths[i] for i in keep], [abstract[i] for i in keep])
            if layout:
                sizes = {dt: 0 for dt in layout}
                for i, p in enumerate(paths):
                    hit = offsets[name].get("/".join(p))
                    if hit is not None:
                        end = hit[1] + math.prod(abstract[i].shape)
                        sizes[hit[0]] = max(sizes[hit[0]], end)
                # read on every process, then sliced into the targets' shardings
                nested[_PACKED] = {
                    dt: jax.ShapeDtypeStruct((n,), dt, sharding=_replicated())
                    for dt, n in sizes.items()
                }
            items[name] = ocp.args.StandardRestore(nested)
        try:
            restored = (
                self._manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: "
                f"{type(e).__name__}: {e}"
            ) from e
        out = {}
        for name, (treedef, paths, abstract) in plans.items():
            leaves = []
            host = {}
            for p, a in zip(paths, abstract):
                hit = offsets.get(name, {}).get("/".join(p))
                if hit is None:
                    leaves.append(_lookup(restored[name], p))
                    continue
                dt, off = hit
                if dt not in host:
                    host[dt] = np.asarray(restored[name][_PACKED][dt])
                chunk = host[dt][off : off + math.prod(a.shape)].reshape(a.shape)
                leaves.append(jax.device_put(chunk, a.sharding))
            out[name] = jax.tree_util.tree_unflatten(treedef, leaves)
        new_adapters = out[_ADAPTERS]
        if frozen_sha is not None:
            # the omitted (verified) frozen arrays come from the target, in its shardings
            # unless others were asked for
            def fill(restored, target, sharding=None):
                if restored is not None:
                    return restored
                return target if sharding is None else jax.device_put(target, sharding)

            rest = () if adapter_shardings is None else (adapter_shardings,)
            new_adapters = jax.tree_util.tree_map(
                fill, new_adapters, target_desc_tree, *rest, is_leaf=lambda x: x is None
            )
        if meta.get("vera_storage") == "key":
            new_adapters = restore_shared(new_adapters)
            if shared_shardings is not None:
                sh = new_adapters[SHARED_KEY][VERA]
                sh = dataclasses.replace(
                    sh,
                    a=jax.device_put(sh.a, shared_shardings.a),
                    b=jax.device_put(sh.b, shared_shardings.b),
                )
                new_adapters = {
                    **new_adapters,
                    SHARED_KEY: {**new_adapters[SHARED_KEY], VERA: sh},
                }
        new_base = None
        if base is not None:
            moved = out.get(_BASE, {})
            new_base = jax.tree_util.tree_map_with_path(
                lambda kp, x: moved.get(path_str(kp), x), base
            )
        return TrainState(
            step=step,
            adapters=new_adapters,
            opt_state=out.get(_OPT_STATE),
            rng=_rng_from_json(meta.get("rng")),
            data_position=int(meta["data_position"]),
            base=new_base,
            metrics=meta.get("metrics"),
        )

    def _check_method(self, meta: dict[str, Any], step: int) -> None:
        saved = meta.get("method")
        if self.method is not None and saved is not None and saved != self.method:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written by method "
                f"{saved!r}, but this manager is for {self.method!r}"
            )

    @staticmethod
    def _plan(
        name: str, target: Any, shardings: Any, manifests: dict[str, Any]
    ) -> tuple[Any, list[tuple[str, ...]], list[Any]]:
        paths, leaves, treedef = _leaf_paths(target)
        want = _manifest(paths, leaves)
        have = manifests.get(name, [])
        if want != have:
            w = {p: (s, d) for p, s, d in want}
            h = {p: (s, d) for p, s, d in have}
            diff = [
                f"{p}: checkpoint {h.get(p, 'absent')}, target {w.get(p, 'absent')}"
                for p in sorted(set(w) | set(h))
                if w.get(p) != h.get(p)
            ]
            what = {_OPT_STATE: "optimizer state (another optimizer?)"}.get(name, name)
            raise CheckpointError(
                f"the {what} in the checkpoint does not match the target: "
                + "; ".join(diff[:6])
                + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            )
        if shardings is None:
            shard_leaves = [getattr(x, "sharding", None) for x in leaves]
        else:
            shard_leaves = jax.tree_util.tree_leaves(
                shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
            )
            if len(shard_leaves) != len(leaves):
                raise CheckpointError(
                    f"{name} shardings have {len(shard_leaves)} leaves, the target {len(leaves)}"
                )
        default = None
        abstract = []
        for x, s in zip(leaves, shard_leaves, strict=True):
            if s is None:
                default = default or _replicated()
                s = default
            abstract.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s))
        return treedef, paths, abstract


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``directory`` (a step or a whole run).

    Examples:
      >>> import tempfile
      >>> checkpoint_bytes(tempfile.mkdtemp())
      0
    """
    return sum(
        f.stat().st_size for f in Path(directory).rglob("*") if f.is_file() and not f.is_symlink()
    )


def array_bytes(tree: Any) -> int:
    """Total bytes of the arrays of a pytree (``math.prod(shape) * itemsize``).

    Examples:
      >>> import jax.numpy as jnp
      >>> array_bytes({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4, jnp.int8)})
      28
    """
    return sum(
        math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
    )
