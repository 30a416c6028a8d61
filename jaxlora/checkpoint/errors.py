"""The one error type of :mod:`jaxlora.checkpoint`."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the given target, or cannot be read."""
