"""What a checkpoint leaves out of the adapters tree, and how it is put back.

* **Shared state, compacted.** State shared by all layers (``adapters["__shared__"]``) is
  stored :meth:`~jaxlora.adapters.SharedState.compact` whenever its own
  :meth:`~jaxlora.adapters.SharedState.reproducible` says the round trip is exact (VeRA:
  the PRNG key instead of the random matrices), and expanded again on restore. The method
  owns the rule; this module only calls the hooks.
* **Frozen per-layer arrays, fingerprinted** (``store_frozen=False``): only their SHA-256 is
  stored, and restore takes them from a concrete target made with the run's key, refusing
  one whose arrays differ.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from jaxlora.adapters import (
    FROZEN,
    SHARED_KEY,
    SharedState,
    labels,
    replace_shared,
    shared_state,
)
from jaxlora.checkpoint.describe import short
from jaxlora.checkpoint.errors import CheckpointError
from jaxlora.keypaths import path_tuple

__all__ = [
    "COMPACT",
    "FULL",
    "check_frozen",
    "compact_shared",
    "expand_shared",
    "fill_frozen",
    "fingerprint",
    "shared_storage",
    "split_frozen",
    "split_frozen_like",
]

COMPACT, FULL = "compact", "full"
"""How each shared-state entry was stored."""


def shared_storage(adapters: Any) -> dict[str, str]:
    """``{name: "compact" | "full"}`` for the shared-state entries of a concrete tree."""
    return {
        name: COMPACT if isinstance(value, SharedState) and value.reproducible() else FULL
        for name, value in shared_state(adapters).items()
    }


def compact_shared(tree: Any, storage: dict[str, str]) -> Any:
    """``tree`` (adapters, their shapes or their shardings) with the entries stored compact
    replaced by their compact form."""
    names = [n for n, how in storage.items() if how == COMPACT]
    return replace_shared(tree, {n: shared_state(tree)[n].compact() for n in names})


def expand_shared(adapters: Any, storage: dict[str, str], shardings: Any = None) -> Any:
    """Inverse of :func:`compact_shared` on restored arrays, placed in ``shardings``' shared
    entries when given (the regenerated arrays are otherwise wherever they were computed)."""
    out = {}
    for name, how in storage.items():
        if how != COMPACT:
            continue
        value = shared_state(adapters)[name].expand()
        if shardings is not None:
            value = jax.tree_util.tree_map(jax.device_put, value, shared_state(shardings)[name])
        out[name] = value
    return replace_shared(adapters, out)


def _is_frozen_leaf(kp: Any, label: str) -> bool:
    # shared state has its own storage rule (above)
    return label == FROZEN and path_tuple(kp[:1], unbox=False) != (SHARED_KEY,)


def split_frozen(adapters: Any) -> tuple[Any, dict[str, Any]]:
    """``(adapters with None at frozen per-layer arrays, {joined path: frozen array})``."""
    frozen: dict[str, Any] = {}

    def pick(kp, x, lb):
        if _is_frozen_leaf(kp, lb):
            frozen["/".join(path_tuple(kp, unbox=False))] = x
            return None
        return x

    return jax.tree_util.tree_map_with_path(pick, adapters, labels(adapters)), frozen


def split_frozen_like(tree: Any, adapters: Any) -> Any:
    """:func:`split_frozen`'s ``None`` pattern, applied to a tree shaped like ``adapters``
    (e.g. its shardings)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, lb: None if _is_frozen_leaf(kp, lb) else x,
        tree,
        labels(adapters),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def fingerprint(x: Any) -> str:
    """SHA-256 of a concrete, fully addressable array."""
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


def check_frozen(frozen: dict[str, Any], saved_sha: dict[str, str], step: int) -> None:
    """Raises unless the target's frozen arrays are exactly those the checkpoint omitted."""
    if sorted(frozen) != sorted(saved_sha):
        raise CheckpointError(
            f"the frozen arrays of the target ({short(sorted(frozen))}) are not those "
            f"the checkpoint omitted ({short(sorted(saved_sha))})"
        )
    differ = sorted(p for p, x in frozen.items() if fingerprint(x) != saved_sha[p])
    if differ:
        raise CheckpointError(
            f"checkpoint step {step} was saved without its frozen arrays, and the "
            f"target's differ from the run's at {short(differ)}: create the target "
            "with method.init and the key the run was initialised with"
        )


def fill_frozen(restored: Any, target: Any, shardings: Any = None) -> Any:
    """The restored tree with its omitted (verified) frozen arrays taken from ``target``, in
    ``shardings`` when given."""

    def fill(got, want, sharding=None):
        if got is not None:
            return got
        return want if sharding is None else jax.device_put(want, sharding)

    rest = () if shardings is None else (shardings,)
    return jax.tree_util.tree_map(fill, restored, target, *rest, is_leaf=lambda x: x is None)
