"""Checks of hyper-parameters where they enter, so a bad value is named at once rather than
surfacing as NaN losses many steps later."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite"]


def finite(owner: str, name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``owner``'s ``name`` if it is not a
    finite real number (NaN, ±inf, a string, a bool).

    Examples:
      >>> finite("lora", "alpha", 16)
      16.0
      >>> finite("lora", "alpha", float("nan"))
      Traceback (most recent call last):
        ...
      ValueError: lora: alpha must be a finite number, got alpha=nan
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if isinstance(value, bool | str) or not math.isfinite(out):
        raise ValueError(f"{owner}: {name} must be a finite number, got {name}={value!r}")
    return out
