"""Runs several experiment configs and writes one results table and the plots.

    python -m experiments.compare --configs e1_topics --variant local --out results

Writes ``<out>/results.md``, ``<out>/results.csv``, and per experiment
``<out>/<name>/loss_curves.png`` and ``<out>/<name>/metric_vs_params.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from experiments import config as config_lib
from experiments import run as runner
from experiments.report import table, write_csv
from jaxlora import distributed


def plot(result: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Loss curves and headline metric vs trainable parameters, as PNG files.

    With several seeds the loss curves are the mean over seeds with a min–max band, and
    the metric has ± std error bars. The untrained baseline is a dashed reference line,
    not a point, and the y-range is set by the trained methods: the baseline sits far below
    them and would squash their differences into a sliver.
    """
    metric = result["metric"]
    name = result["config"]["name"]
    seeds = result.get("seeds", 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        losses = np.asarray(r["losses"], float)
        if losses.size == 0:
            continue
        k = max(1, losses.size // 20)  # moving average: single-batch losses are noisy

        def smooth(x, k=k):
            return np.convolve(np.asarray(x, float), np.ones(k) / k, mode="valid")

        steps = np.arange(k, losses.size + 1)
        (line,) = ax.plot(steps, smooth(losses), label=r["method"])
        if seeds > 1 and "losses_min" in r:
            lo, hi = smooth(r["losses_min"]), smooth(r["losses_max"])
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    band = f"; mean of {seeds} seeds, band min–max" if seeds > 1 else ""
    ax.set(
        xlabel="step",
        ylabel=f"training loss (moving average{band})",
        title=f"{name}: training loss",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out_dir / "loss_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # a legend, not text labels: the LoRA-family methods share one parameter count
    markers = "osD^vP*Xh<>"
    trained = []
    for i, r in enumerate(result["rows"]):
        y = r["after"][metric]
        spread = r.get("after_spread", {}).get(metric)
        if not r["trainable_params"]:  # untrained: a reference level, not a point at x=0
            ax.axhline(
                y, color="0.4", linestyle="--", linewidth=1, label=f"{r['method']} ({y:.3f})"
            )
            continue
        err = spread["std"] if spread and seeds > 1 else None
        ax.errorbar(
            r["trainable_params"],
            y,
            yerr=err,
            fmt=markers[i % len(markers)],
            markersize=6,
            capsize=3,
            label=r["method"],
        )
        lo = spread["min"] if spread else y
        hi = spread["max"] if spread else y
        trained += [lo - (err or 0), hi + (err or 0)]
    if trained:
        lo, hi = min(trained), max(trained)
        pad = max(0.15 * (hi - lo), 0.005)
        ax.set_ylim(lo - pad, hi + pad)
        for r in result["rows"]:
            y = r["after"][metric]
            if not r["trainable_params"] and not lo - pad <= y <= hi + pad:
                where = "below" if y < lo else "above"
                ax.annotate(
                    f"{r['method']}: {y:.3f} ({where} this range)",
                    xy=(0.01, 0.01 if y < lo else 0.97),
                    xycoords="axes fraction",
                    va="bottom" if y < lo else "top",
                    fontsize=8,
                    color="0.3",
                )
    ax.set_xscale("log")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    bars = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    ax.set(
        xlabel="trainable parameters (log scale)",
        ylabel=f"held-out {metric}{bars}",
        title=f"{name}: {metric} vs trainable parameters",
    )
    fig.tight_layout()
    scatter = out_dir / "metric_vs_params.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)
    return [curves, scatter]


def collect(config, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One experiment's result from runs of disjoint subsets of its methods (e.g. run side by
    side: ``python -m experiments.run --methods a,b --seeds N --out DIR``), rows in the
    config's order, times and memory relative to full fine-tuning recomputed.

    Raises:
      ValueError: If the parts ran different settings or seeds, or repeat a method.
    """

    def settings(r):
        return {k: v for k, v in r["config"].items() if k != "methods"}

    first = parts[0]
    for p in parts[1:]:
        if settings(p) != settings(first) or p.get("seeds") != first.get("seeds"):
            raise ValueError(f"{config.name}: the results to collect ran different settings")
    rows = [r for p in parts for r in p["rows"]]
    names = [r["method"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{config.name}: methods repeated across the results: {names}")
    order = {m.display: i for i, m in enumerate(config.methods)}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    rows = [
        {k: v for k, v in r.items() if k not in ("time_vs_full", "temp_mem_vs_full")} for r in rows
    ]
    runner.relative_to_full(rows)
    # each part's config lists every method of the config; keep those it ran
    methods = [
        m
        for p in parts
        for m in p["config"]["methods"]
        if (m.get("label") or m["name"]) in {r["method"] for r in p["rows"]}
    ]
    methods.sort(key=lambda m: order.get(m.get("label") or m["name"], len(order)))
    return {**first, "config": {**first["config"], "methods": methods}, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run experiment configs; write table and plots.")
    ap.add_argument("--configs", default="e1_topics", help="comma-separated config modules")
    ap.add_argument("--variant", default="local")
    ap.add_argument("--out", default="results")
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per method (seeds seed, seed+1, ...); the table shows mean ± std and min–max",
    )
    ap.add_argument(
        "--collect",
        default=None,
        help="comma-separated output directories of runs of disjoint method subsets of the "
        "(one) config: tabulate and plot them together instead of running",
    )
    args = ap.parse_args(argv)
    distributed.initialize()  # a no-op for one process; joins the pod/cluster otherwise
    out = pathlib.Path(args.out)
    configs = [config_lib.load(n, args.variant) for n in args.configs.split(",")]
    for c in configs:  # every config is checked before the first one trains
        runner.validate(c)
    results = []
    if args.collect:
        (c,) = configs
        parts = [
            json.loads((pathlib.Path(d) / c.name / "results.json").read_text())
            for d in args.collect.split(",")
        ]
        result = collect(c, parts)
        (out / c.name).mkdir(parents=True, exist_ok=True)
        (out / c.name / "results.json").write_text(json.dumps(result, indent=1, default=float))
        plot(result, out / c.name)
        results.append(result)
    for c in configs if not args.collect else ():
        result = runner.run(c, out, seeds=args.seeds)
        plot(result, out / c.name)
        results.append(result)
    md = table(results)
    (out / "results.md").write_text(md)
    write_csv(results, out / "results.csv")
    print("\n" + md)
    compiles = sum(r["compiles"] for res in results for r in res["rows"])
    evals = sum(res["eval_compiles"] for res in results)
    print(f"compiled {compiles} train steps (one per method and bucket) and {evals} evaluations")
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, plots under {out}/<experiment>/")


if __name__ == "__main__":
    main()
