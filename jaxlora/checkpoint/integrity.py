"""Checksums of every stored array, verified on restore.

orbax's files carry no checksum of their own: a flipped byte in a data file restores as a
wrong value without any error. So each step's metadata records a CRC-32 of every array's
bytes (C order, the array's own dtype), keyed by the array's joined key path, and restore
recomputes it on what was read and refuses an array whose bytes differ, naming its path.

CRC-32 (``zlib``, hardware-accelerated where zlib is) detects every error burst up to 32
bits and all but 2⁻³² of the rest; it guards against media and transfer corruption, not
against deliberate tampering. It costs one pass over each array on the host at save and
at restore, measured in ``scripts/checkpoint_checksums.py``. Arrays that this process
holds only parts of (multi-host shardings) are recorded as ``None`` and not verified here.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

from jaxlora.checkpoint.errors import CorruptCheckpointError

__all__ = ["ALGORITHM", "checksum", "checksums", "verify"]

ALGORITHM = "crc32"
"""The checksum recorded in a step's metadata (``meta["checksum_algorithm"]``)."""


def checksum(x: Any) -> str | None:
    """CRC-32 of an array's bytes as 8 hex digits, or ``None`` if this process cannot read
    all of it.

    Examples:
      >>> import numpy as np
      >>> checksum(np.zeros(4, np.float32)), checksum(np.ones(4, np.float32))
      ('ecbb4b55', 'e8681456')
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    data = np.ascontiguousarray(np.asarray(x))
    return f"{zlib.crc32(data.reshape(-1).view(np.uint8)):08x}"


def checksums(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, str | None]:
    """``{joined path: checksum}`` of every leaf."""
    return {"/".join(p): checksum(x) for p, x in zip(paths, leaves, strict=True)}


def verify(
    where: str, paths: list[tuple[str, ...]], leaves: list[Any], saved: dict[str, str | None]
) -> None:
    """Raises :class:`CorruptCheckpointError` naming every array whose checksum differs.

    Args:
      where: Names the item in the message (``"checkpoint step 3 in /run, opt_state"``).
      paths: The leaves' key paths.
      leaves: The arrays as read.
      saved: The checksums recorded at save time.
    """
    bad = []
    for p, x in zip(paths, leaves, strict=True):
        joined = "/".join(p)
        want = saved.get(joined)
        if want is None:
            continue
        got = checksum(x)
        if got is not None and got != want:
            bad.append(f"{joined} (crc32 {got}, saved {want})")
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch, the stored bytes of {', '.join(bad[:4])}{more} "
            "changed after they were written (disk or transfer corruption)"
        )
