"""The results table of one or more experiment runs, as Markdown and CSV.

Shared by the runner (``python -m experiments.run`` prints one run's table) and the
comparison command (``python -m experiments.compare`` writes several, with plots).
"""

from __future__ import annotations

import csv
import pathlib
from typing import Any

__all__ = ["COLUMNS", "table", "write_csv"]

COLUMNS = [
    ("experiment", "experiment"),
    ("method", "method"),
    ("trainable", "trainable params"),
    ("method_params", "adapter params"),
    ("before", "{metric} before"),
    ("after", "{metric} after"),
    ("time_vs_full", "step time / full FT"),
    ("temp_mem_vs_full", "XLA temp mem / full FT"),
    ("median_ms", "median step ms"),
    ("trainable_kib", "trainable KiB"),
    ("checkpoint_kib", "adapter checkpoint KiB"),
]


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    metric = result["metric"]
    out = []
    for r in result["rows"]:
        out.append(
            {
                "experiment": result["config"]["name"],
                "method": r["method"],
                "metric": metric,
                "trainable": r["trainable_params"],
                "method_params": r["method_params"],
                "before": r["before"][metric],
                "after": r["after"][metric],
                "time_vs_full": r.get("time_vs_full"),
                "temp_mem_vs_full": r.get("temp_mem_vs_full"),
                "median_ms": None if r.get("median_step_s") is None else 1e3 * r["median_step_s"],
                "trainable_kib": r["trainable_bytes"] / 1024,
                "checkpoint_kib": None
                if r.get("checkpoint_bytes") is None
                else r["checkpoint_bytes"] / 1024,
            }
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(results: list[dict[str, Any]]) -> str:
    """The markdown results table of one or more experiments."""
    lines = []
    for result in results:
        metric = result["metric"]
        heads = [h.format(metric=metric) for _, h in COLUMNS]
        lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for row in _rows(result):
            lines.append("| " + " | ".join(_fmt(row[k]) for k, _ in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(results: list[dict[str, Any]], path: pathlib.Path) -> None:
    keys = ["metric"] + [k for k, _ in COLUMNS]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for result in results:
            for row in _rows(result):
                w.writerow({k: row[k] for k in keys})
