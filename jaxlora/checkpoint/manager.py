"""The checkpoint manager: orbax's ``CheckpointManager`` plus what a fine-tuning run needs.

Each step is a composite orbax item: ``adapters``, ``opt_state`` and (for methods that move
the base) ``base`` as plain nested trees (:mod:`jaxlora.checkpoint.layout`), and ``meta``:
JSON with the format version, step, RNG key, data position, metrics, the adapters'
description (:mod:`jaxlora.checkpoint.describe`), how shared state and frozen arrays were
stored (:mod:`jaxlora.checkpoint.storage`), and the manifest of every tree. Saving writes
exactly that; restoring checks the target against it, reads, unpacks, and puts back what
was left out, each a function of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora._version import version
from jaxlora.adapters import adapter_nodes
from jaxlora.checkpoint import integrity, layout, storage
from jaxlora.checkpoint.describe import compare_descriptions, describe_adapters, short
from jaxlora.checkpoint.errors import CheckpointError, CorruptCheckpointError
from jaxlora.checkpoint.lock import WriterLock
from jaxlora.keypaths import flatten, path_str

__all__ = ["FORMAT_VERSION", "CheckpointManager", "TrainState"]

FORMAT_VERSION = 3
"""Version of the layout written by :class:`CheckpointManager`; newer ones are refused.
Version 3 records XXH3 checksums in the metadata (version 2 wrote CRC-32s, in a
``checksums`` item or in the metadata); version 2 names how each shared-state entry was
stored (``shared_storage``); version 1 recorded VeRA's alone (``vera_storage``). Every
earlier version is still read."""

_ADAPTERS, _OPT_STATE, _BASE, _META = "adapters", "opt_state", "base", "meta"

TRASH = ".deleted"
"""Retention renames a step into this subdirectory (atomic) before deleting its files, so
a step that is listed is always whole, even if the process is killed mid-delete."""

_log = logging.getLogger("jaxlora.checkpoint")


def _rank(value: Any, worst: float) -> float:
    """A metric as retention ranks it: NaN and ±inf rank worst, never best."""
    value = float(value)
    return value if math.isfinite(value) else worst


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What :meth:`CheckpointManager.restore` returns."""

    step: int
    """The step the checkpoint was saved at."""
    adapters: Any
    """The adapters tree (compactly stored shared state expanded again)."""
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


def _shared_storage(meta: dict[str, Any]) -> dict[str, str]:
    if "shared_storage" in meta:
        return meta["shared_storage"]
    old = meta.get("vera_storage")  # format 1
    return {} if old is None else {"vera": storage.COMPACT if old == "key" else storage.FULL}


def _base_kernels(base: Any, adapters: Any) -> dict[str, Any]:
    """The targeted kernels of ``base``, keyed by path: what a base-moving method stores."""
    wanted = set(adapter_nodes(adapters))
    kernels = {p: x for p, x in flatten(base).items() if p in wanted}
    missing = sorted(wanted - set(kernels))
    if missing:
        raise CheckpointError(f"base lacks the targeted kernels {short(missing)}")
    return kernels


def _shard_leaves(name: str, leaves: list[Any], shardings: Any) -> list[Any]:
    if shardings is None:
        return [getattr(x, "sharding", None) for x in leaves]
    out = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(out) != len(leaves):
        raise CheckpointError(f"{name} shardings have {len(out)} leaves, the target {len(leaves)}")
    return out


class _Plan(NamedTuple):
    """How to read one item: its treedef, leaf paths and abstract (sharded) leaves."""

    treedef: Any
    paths: list[tuple[str, ...]]
    abstract: list[jax.ShapeDtypeStruct]


def _plan(name: str, target: Any, shardings: Any, manifests: dict[str, Any]) -> _Plan:
    """Checks ``target`` against the saved manifest and gives every leaf a sharding."""
    paths, leaves, treedef = layout.leaf_paths(target)
    want, have = layout.manifest(paths, leaves), manifests.get(name, [])
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
    default = None
    abstract = []
    for x, s in zip(leaves, _shard_leaves(name, leaves, shardings), strict=True):
        if s is None:
            default = default or _replicated()
            s = default
        abstract.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s))
    return _Plan(treedef, paths, abstract)


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
        mismatch is refused). That halves a LoRA-FA checkpoint. Shared state is always
        stored compact when its method says that is exact (VeRA: the key only).
      store_base: Store the targeted base kernels passed to :meth:`save` as ``base`` (set
        it to ``recipe.moves_base``: only a method that moves the base needs them).
      checksums: Record a 64-bit XXH3 hash of every array (of every addressable shard, for
        arrays split over processes) in the step's metadata and verify it on restore
        (:mod:`jaxlora.checkpoint.integrity`; about 1 ms per 28 MiB). Steps saved without
        are restored unverified.
      read_only: Only list, inspect and restore: take no writer lock (so a directory that
        another process is writing can be watched) and refuse :meth:`save`.

    A writing manager holds the directory's writer lock (:mod:`jaxlora.checkpoint.lock`)
    until :meth:`close`; a second writer, in this process or another, is refused. A step
    whose ``best_metric`` is NaN or infinite never ranks as best, so it never causes a
    finite step to be deleted.

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
        store_base: bool = True,
        checksums: bool = True,
        read_only: bool = False,
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
        self.store_base = store_base
        self.checksums = checksums
        self.read_only = read_only
        self._lock = None
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # process 0 holds the lock for the whole job
            # before orbax starts: its start-up removes temporary directories, which
            # would be another live writer's saves in progress
            self._lock = WriterLock(self.directory)
            self._lock.acquire()
            self._release = weakref.finalize(self, self._lock.release)
        self._purge_trash()
        worst = math.inf if best_mode == "min" else -math.inf
        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if best_metric is not None:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: _rank(m[best_metric], worst),
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
            todelete_subdir=TRASH,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._release()
            self._lock = None

    def _purge_trash(self) -> None:
        """Deletes the steps retention renamed into :data:`TRASH` (they are listed nowhere,
        so a delete that is interrupted here loses nothing and is finished next time)."""
        trash = self.directory / TRASH
        if self.read_only or jax.process_index() != 0 or not trash.is_dir():
            return
        for entry in trash.iterdir():
            try:
                shutil.rmtree(entry)
            except OSError as e:
                _log.warning("could not delete the retired step %s yet: %s", entry, e)

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
            if self.best_metric in m and math.isfinite(m[self.best_metric]):
                scored.append((m[self.best_metric], step))
        if not scored:
            return None
        return (min if self.best_mode == "min" else max)(scored)[1]

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()
        self._purge_trash()

    def close(self) -> None:
        """Waits for pending saves, releases orbax's resources and the writer lock."""
        try:
            self._manager.close()
            self._purge_trash()
        finally:
            self._release_lock()

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
            raise CorruptCheckpointError(
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
                f"({version()}) reads ({FORMAT_VERSION}); upgrade jaxlora"
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
          base: The current base params. With ``store_base`` (for methods that move the
            base, Delta-LoRA) their targeted kernels are stored, in full (see the package
            docstring); otherwise they are not written, so a loop may pass them always.
          metrics: Scalars recorded with the step; ``best_metric`` must be among them.

        Returns:
          ``True`` (the step was saved or queued).

        Raises:
          CheckpointError: If the step exists already, ``best_metric`` is missing, or the
            manager is read-only.
        """
        step = int(step)
        if self.read_only:
            raise CheckpointError(f"this manager of {self.directory} is read-only: cannot save")
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
        how = storage.shared_storage(adapters)
        adapters = storage.compact_shared(adapters, how)
        frozen_sha = None
        if not self.store_frozen:
            adapters, frozen = storage.split_frozen(adapters)
            frozen_sha = {path: storage.fingerprint(x) for path, x in frozen.items()}
        trees = {_ADAPTERS: adapters, _OPT_STATE: opt_state}
        if base is not None and self.store_base:
            trees[_BASE] = _base_kernels(base, adapters)
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "jaxlora_version": version(),
            "method": self.method,
            "step": step,
            "data_position": int(data_position),
            "rng": _rng_json(rng),
            "metrics": metrics,
            "adapters": describe_adapters(adapters),
            "shared_storage": how,
            "frozen_sha256": frozen_sha,
        }
        self._write(step, trees, meta, metrics)
        return True

    def _write(self, step: int, trees: dict[str, Any], meta: dict[str, Any], metrics) -> None:
        ocp = self._ocp
        meta = {**meta, "manifests": {}, "packed": {}}
        items: dict[str, Any] = {}
        flat = {}
        jobs: list[integrity.Job] = []
        for name, tree in trees.items():
            if tree is None:
                continue
            paths, leaves, _ = layout.leaf_paths(tree)
            meta["manifests"][name] = layout.manifest(paths, leaves)
            if leaves:  # orbax cannot write an empty tree (e.g. plain SGD's state)
                # without checksums only the arrays to pack are needed on the host
                host = layout.to_host(leaves, small_only=not self.checksums)
                flat[name] = paths, leaves, host
                if self.checksums:
                    jobs += integrity.host_jobs(name, paths, leaves, host)
        if self.checksums:
            # hashed now, from host copies taken before save returns (the caller may donate
            # the arrays right after), and written in the metadata, atomic with the step
            meta["checksum_algorithm"] = integrity.ALGORITHM
            meta["checksums"] = integrity.gather_records(integrity.records(jobs))
        for name, (paths, leaves, host) in flat.items():
            nested, meta["packed"][name] = layout.pack(paths, leaves, host)
            items[name] = ocp.args.StandardSave(nested)
        items[_META] = ocp.args.JsonSave(meta)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:  # raced another writer
            raise CheckpointError(f"step {step} is already saved in {self.directory}") from e

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
        fallback: bool = False,
    ) -> TrainState:
        """Restores a step into the structure, dtypes and shardings of the given targets.

        Every array is checked against the checksum recorded when it was saved.

        Args:
          step: The step; the latest by default.
          adapters: The target adapters tree, concrete or abstract; usually
            ``jax.eval_shape(method.init, key, params)``. Its static configuration (method,
            targets, rank, scale, layout) must equal the checkpoint's.
          opt_state: The target optimizer state (e.g. ``jax.eval_shape(tx.init,
            adapters)``), or ``None`` to skip it.
          base: The base params (as loaded, ``W_0``). When the checkpoint holds moved
            kernels (Delta-LoRA) they are required, and returned with those kernels put in;
            otherwise they are returned as given.
          adapter_shardings: A tree of ``jax.sharding.Sharding`` like ``adapters``;
            defaults to each target leaf's own ``.sharding``, else replicated.
          opt_state_shardings: Likewise for ``opt_state``.
          fallback: If ``step`` (the latest by default) is corrupt, walk back to the newest
            earlier step that is intact, warning which steps were skipped and why.

        Returns:
          A :class:`TrainState` (its ``step`` says which step was restored).

        Raises:
          CorruptCheckpointError: If the step's files cannot be read or an array fails its
            checksum (the message names the array); with ``fallback``, if no step is intact.
          CheckpointError: If there is no such step, or the target does not match the
            checkpoint (another method, rank, target set, shape or optimizer); the message
            lists the differences. ``fallback`` never walks past such a mismatch.
        """
        first = self._resolve_step(step)
        targets = dict(
            adapters=adapters,
            opt_state=opt_state,
            base=base,
            adapter_shardings=adapter_shardings,
            opt_state_shardings=opt_state_shardings,
        )
        if not fallback:
            return self._restore(first, **targets)
        skipped = []
        for candidate in [s for s in reversed(self.all_steps()) if s <= first]:
            try:
                restored = self._restore(candidate, **targets)
            except CorruptCheckpointError as e:
                skipped.append(str(e))
                continue
            if skipped:
                warnings.warn(
                    "; ".join(skipped)
                    + f"; restored step {candidate} instead, the newest intact step",
                    stacklevel=2,
                )
            return restored
        raise CorruptCheckpointError(
            f"no intact step in {self.directory} up to step {first}: " + "; ".join(skipped)
        )

    def _restore(
        self, step, *, adapters, opt_state, base, adapter_shardings, opt_state_shardings
    ) -> TrainState:
        """Restores one step (see :meth:`restore`)."""
        meta = self.metadata(step)
        self._check_method(meta, step)
        how = _shared_storage(meta)
        stored = storage.compact_shared(adapters, how)  # the adapters tree as it was written
        problems = compare_descriptions(meta["adapters"], describe_adapters(stored))
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the target "
                "adapters:\n  " + "\n  ".join(problems)
            )
        shardings = None
        if adapter_shardings is not None:
            shardings = storage.compact_shared(adapter_shardings, how)
        plans = self._plans(meta, step, stored, shardings, opt_state, opt_state_shardings, base)
        out = self._read(step, plans, meta)
        new_adapters = out[_ADAPTERS]
        if meta.get("frozen_sha256") is not None:
            new_adapters = storage.fill_frozen(new_adapters, stored, shardings)
        new_adapters = storage.expand_shared(new_adapters, how, adapter_shardings)
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

    def _plans(self, meta, step, stored, shardings, opt_state, opt_state_shardings, base):
        """A :class:`_Plan` for every item to read, each checked against its manifest."""
        manifests = meta["manifests"]
        frozen_sha = meta.get("frozen_sha256")
        kept, kept_shardings = stored, shardings
        if frozen_sha is not None:
            kept, frozen = storage.split_frozen(stored)
            if shardings is not None:
                kept_shardings = storage.split_frozen_like(shardings, stored)
            storage.check_frozen(frozen, frozen_sha, step)
        plans = {_ADAPTERS: _plan(_ADAPTERS, kept, kept_shardings, manifests)}
        if opt_state is not None:
            if _OPT_STATE not in manifests:
                raise CheckpointError(f"checkpoint step {step} holds no optimizer state")
            plans[_OPT_STATE] = _plan(_OPT_STATE, opt_state, opt_state_shardings, manifests)
        if _BASE in manifests:
            if base is None:
                raise CheckpointError(
                    f"checkpoint step {step} holds moved base kernels (Delta-LoRA): pass the "
                    "original base params as base= so they can be put back in"
                )
            plans[_BASE] = _plan(_BASE, _base_kernels(base, stored), None, manifests)
        return plans

    def _read(self, step: int, plans: dict[str, _Plan], meta: dict[str, Any]) -> dict:
        """Reads the planned items, unpacks them and verifies their checksums."""
        ocp = self._ocp
        packed = meta.get("packed", {})
        items = {}
        for name, plan in plans.items():
            if plan.paths:
                target = layout.restore_target(
                    plan.paths, plan.abstract, packed.get(name, {}), _replicated()
                )
                items[name] = ocp.args.StandardRestore(target)
        records = meta.get("checksums") or {}
        if items and meta.get("checksums_item") is not None:  # a format-2 step
            items[integrity.ITEM] = integrity.restore_args()
        try:
            restored = (
                self._manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
            )
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: its "
                f"{', '.join(items)} cannot be read ({type(e).__name__}: {e})"
            ) from e
        verifier = integrity.Verifier(
            f"checkpoint step {step} in {self.directory}",
            restored[integrity.ITEM] if integrity.ITEM in items else records,
            meta.get("checksum_algorithm"),
        )
        out = {}
        for name, plan in plans.items():
            leaves = []
            if plan.paths:
                slots = packed.get(name, {})
                leaves = layout.unpack(
                    restored[name],
                    plan.paths,
                    plan.abstract,
                    slots,
                    # packed arrays are checked on the host buffer as read, in the
                    # background while they are put on devices
                    on_host=lambda members, name=name: verifier.host_buffers(name, members),
                )
                in_slots = layout.packed_slots(slots)
                plain = [(p, x) for p, x in zip(plan.paths, leaves) if "/".join(p) not in in_slots]
                verifier.arrays(name, [p for p, _ in plain], [x for _, x in plain])
            out[name] = jax.tree_util.tree_unflatten(plan.treedef, leaves)
        verifier.finish()
        return out

    def _check_method(self, meta: dict[str, Any], step: int) -> None:
        saved = meta.get("method")
        if self.method is not None and saved is not None and saved != self.method:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written by method "
                f"{saved!r}, but this manager is for {self.method!r}"
            )
