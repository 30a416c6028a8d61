"""The error types of :mod:`jaxlora.checkpoint`."""

from __future__ import annotations

__all__ = ["CheckpointError", "CorruptCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the given target, or cannot be read."""


class CorruptCheckpointError(CheckpointError):
    """A step whose files cannot be read or whose arrays fail their checksum: the step is
    damaged (unlike a target that does not match it), so an earlier step may still be
    intact (``restore(fallback=True)``)."""
