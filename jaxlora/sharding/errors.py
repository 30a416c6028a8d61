"""The one error type of :mod:`jaxlora.sharding`."""

from __future__ import annotations

__all__ = ["ShardingError"]


class ShardingError(ValueError):
    """A rule set that leaves a leaf unmatched, or a spec or mesh that cannot shard it."""
