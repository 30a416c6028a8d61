"""Files written atomically, and safetensors read and written with clear errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxlora._version import version

__all__ = ["atomic_directory", "load_safetensors", "save_safetensors"]


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``directory`` once the block succeeds.

    A failure inside the block leaves whatever was at ``directory`` untouched and removes the
    temporary directory.
    """
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


def save_safetensors(tensors: dict[str, np.ndarray], file: Path) -> None:
    """Writes ``tensors`` to ``file``, recording the writer in the file's metadata."""
    from safetensors.numpy import save_file

    # PEFT rejects unknown config fields, so the writer is recorded in the file's metadata
    metadata = {"format": "pt", "written_by": f"jaxlora {version()}"}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata)


def load_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Reads ``file``; a missing file is ``FileNotFoundError``, a damaged one ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from e
