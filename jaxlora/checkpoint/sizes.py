"""Sizes of checkpoints on disk and of the arrays they hold."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["array_bytes", "checkpoint_bytes"]


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
