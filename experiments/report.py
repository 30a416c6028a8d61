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
    ("after_range", "min–max over seeds"),
    ("vs_full", "Δ vs full FT"),
    ("time_vs_full", "step time / full FT"),
    ("temp_mem_vs_full", "XLA temp mem / full FT"),
    ("median_ms", "median step ms"),
    ("trainable_kib", "trainable KiB"),
    ("checkpoint_kib", "adapter checkpoint KiB"),
]
"""Table columns: (key, heading). With several seeds, ``after`` is ``mean ± std`` (sample
standard deviation over the seeds), ``after_range`` their min–max, and ``vs_full`` the
difference of means to full fine-tuning, starred where the two min–max ranges do not
overlap (a difference larger than the seed-to-seed spread)."""


def _spread(r: dict[str, Any], metric: str) -> dict[str, float] | None:
    spread = r.get("after_spread", {}).get(metric)
    return spread if spread and len(r.get("seeds", ())) > 1 else None


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    metric = result["metric"]
    full = next((r for r in result["rows"] if r["method"] == "full"), None)
    out = []
    for r in result["rows"]:
        spread = _spread(r, metric)
        after = r["after"][metric]
        vs_full = None
        if full is not None and r is not full and r.get("trainable_params"):
            vs_full = after - full["after"][metric]
            fs = _spread(full, metric)
            if spread and fs:
                disjoint = spread["min"] > fs["max"] or spread["max"] < fs["min"]
                vs_full = f"{vs_full:+.3f}{' *' if disjoint else ''}"
        out.append(
            {
                "experiment": result["config"]["name"],
                "method": r["method"],
                "metric": metric,
                "trainable": r["trainable_params"],
                "method_params": r["method_params"],
                "before": r["before"][metric],
                "after": f"{after:.3f} ± {spread['std']:.3f}" if spread else after,
                "after_mean": after,
                "after_std": spread["std"] if spread else None,
                "after_range": f"{spread['min']:.3f}–{spread['max']:.3f}" if spread else None,
                "vs_full": vs_full,
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
    """The markdown results table of one or more experiments.

    With several seeds a note under each table says what the ± and the star mean.
    """
    lines = []
    for result in results:
        metric = result["metric"]
        heads = [h.format(metric=metric) for _, h in COLUMNS]
        lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for row in _rows(result):
            lines.append("| " + " | ".join(_fmt(row[k]) for k, _ in COLUMNS) + " |")
        seeds = result.get("seeds", 1)
        if seeds > 1:
            lines.append(
                f"\n{metric} after: mean ± sample std over {seeds} seeds; * : the min–max "
                "ranges of the method and full FT do not overlap."
            )
        lines.append("")
    return "\n".join(lines)


def write_csv(results: list[dict[str, Any]], path: pathlib.Path) -> None:
    keys = ["metric"] + [k for k, _ in COLUMNS] + ["after_mean", "after_std"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for result in results:
            for row in _rows(result):
                w.writerow({k: row[k] for k in keys})
