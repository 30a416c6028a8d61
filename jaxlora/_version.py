"""The installed jaxlora version, recorded in the files jaxlora writes."""

from __future__ import annotations

from importlib import metadata

__all__ = ["version"]


def version() -> str:
    """The installed distribution's version, or ``"unknown"`` when run from a source tree."""
    try:
        return metadata.version("jaxlora")
    except metadata.PackageNotFoundError:
        return "unknown"
