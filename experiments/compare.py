"""Runs several experiment configs and writes one results table and the plots.

    python -m experiments.compare --configs e1_topics --variant local --out results

Writes ``<out>/results.md``, ``<out>/results.csv``, and per experiment
``<out>/<name>/loss_curves.png`` and ``<out>/<name>/metric_vs_params.png``.
"""

from __future__ import annotations

import argparse
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
    """Loss curves and headline metric vs trainable parameters, as PNG files."""
    metric = result["metric"]
    name = result["config"]["name"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        losses = np.asarray(r["losses"], float)
        if losses.size == 0:
            continue
        k = max(1, losses.size // 20)  # moving average: single-batch losses are noisy
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, losses.size + 1), smooth, label=r["method"])
    ax.set(xlabel="step", ylabel="training loss (moving average)", title=f"{name}: training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out_dir / "loss_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # a legend, not text labels: the LoRA-family methods share one parameter count
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(result["rows"]):
        n = max(r["trainable_params"], 1)
        ax.scatter(n, r["after"][metric], marker=markers[i % len(markers)], s=40, label=r["method"])
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set(
        xlabel="trainable parameters (log)",
        ylabel=f"held-out {metric}",
        title=f"{name}: {metric} vs trainable parameters",
    )
    fig.tight_layout()
    scatter = out_dir / "metric_vs_params.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)
    return [curves, scatter]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run experiment configs; write table and plots.")
    ap.add_argument("--configs", default="e1_topics", help="comma-separated config modules")
    ap.add_argument("--variant", default="local")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    distributed.initialize()  # a no-op for one process; joins the pod/cluster otherwise
    out = pathlib.Path(args.out)
    configs = [config_lib.load(n, args.variant) for n in args.configs.split(",")]
    for c in configs:  # every config is checked before the first one trains
        runner.validate(c)
    results = []
    for c in configs:
        result = runner.run(c, out)
        plot(result, out / c.name)
        results.append(result)
    md = table(results)
    (out / "results.md").write_text(md)
    write_csv(results, out / "results.csv")
    print("\n" + md)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, plots under {out}/<experiment>/")


if __name__ == "__main__":
    main()
