"""A small learning-rate sweep: each method at a few multiples of its configured rate.

    python -m experiments.sweep --config e1_topics --variant local [--factors 0.333,1,3]

Every method of the config (except ``untrained``) is trained with the config's protocol at
``factor × learning_rate`` for each factor, one seed, and evaluated on a *dev* set: training
examples that ``max_train_examples`` leaves out (``eval_split="dev"``), so the choice never
sees the validation set the results table reports. Writes ``<out>/<experiment>/sweep.json``
and ``sweep.md`` (every rate's dev metric and final training loss) and prints the chosen
rate per method, ready to paste into the config with the sweep's numbers as a comment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

from experiments import config as config_lib
from experiments import run as runner
from experiments.config import ExperimentConfig
from jaxlora import distributed

DEFAULT_FACTORS = (1 / 3, 1.0, 3.0)
"""Multiples of each method's configured rate that the sweep tries."""


def sweep_config(
    config: ExperimentConfig,
    factors=DEFAULT_FACTORS,
    *,
    methods: list[str] | None = None,
    dev_examples: int | None = 576,
) -> ExperimentConfig:
    """The config whose methods are every (method, rate) pair, evaluated on the dev set.

    Raises:
      ValueError: If the config trains on every example (no dev set is left), or a named
        method is not in it.
    """
    if config.max_train_examples is None:
        raise ValueError(
            f"{config.name}: the sweep evaluates on training examples left out by "
            "max_train_examples; set it"
        )
    chosen = [m for m in config.methods if m.name != "untrained"]
    if methods is not None:
        missing = sorted(set(methods) - {m.display for m in chosen})
        if missing:
            raise ValueError(
                f"{config.name}: methods {missing} not among {[m.display for m in chosen]}"
            )
        chosen = [m for m in chosen if m.display in methods]
    variants = tuple(
        dataclasses.replace(m, learning_rate=f * m.learning_rate, label=f"{m.display}@{f:.3g}")
        for m in chosen
        for f in factors
    )
    return dataclasses.replace(
        config,
        name=f"{config.name}_sweep",
        methods=variants,
        eval_split="dev",
        max_eval_examples=dev_examples,
    )


def choose(result: dict[str, Any], config: ExperimentConfig, factors) -> dict[str, Any]:
    """Per method: every rate tried with its dev metric and final loss, and the best rate."""
    metric, higher = result["metric"], result["higher_is_better"]
    rows = {r["method"]: r for r in result["rows"]}
    out: dict[str, Any] = {}
    for m in config.methods:
        base = m.display.rsplit("@", 1)[0]
        r = rows[m.display]
        tried = out.setdefault(base, {"tried": []})["tried"]
        tried.append(
            {
                "learning_rate": m.learning_rate,
                metric: r["after"][metric],
                "final_loss": sum(r["losses"][-10:]) / max(len(r["losses"][-10:]), 1),
            }
        )
    for entry in out.values():
        best = (max if higher else min)(entry["tried"], key=lambda t: t[metric])
        entry["chosen"] = best["learning_rate"]
        lrs = [t["learning_rate"] for t in entry["tried"]]
        entry["at_edge"] = best["learning_rate"] in (min(lrs), max(lrs))
    return out


def markdown(choices: dict[str, Any], metric: str) -> str:
    lines = [
        f"| method | learning rate | dev {metric} | final train loss (last 10 steps) | chosen |",
        "|---|---|---|---|---|",
    ]
    for name, entry in choices.items():
        for t in entry["tried"]:
            mark = "**yes**" if t["learning_rate"] == entry["chosen"] else ""
            lines.append(
                f"| {name} | {t['learning_rate']:.3g} | {t[metric]:.3f} | "
                f"{t['final_loss']:.3f} | {mark} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Sweep each method's learning rate on a dev set.")
    ap.add_argument("--config", default="e1_topics")
    ap.add_argument("--variant", default="local")
    ap.add_argument("--factors", default=",".join(f"{f:.6g}" for f in DEFAULT_FACTORS))
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--out", default="results/sweep")
    args = ap.parse_args(argv)
    distributed.initialize()
    factors = tuple(float(f) for f in args.factors.split(","))
    base = config_lib.load(args.config, args.variant)
    methods = None if args.methods is None else args.methods.split(",")
    config = sweep_config(base, factors, methods=methods)
    out = pathlib.Path(args.out)
    result = runner.run(config, out)
    choices = choose(result, config, factors)
    md = markdown(choices, result["metric"])
    out_dir = out / config.name
    (out_dir / "sweep.json").write_text(json.dumps(choices, indent=1))
    (out_dir / "sweep.md").write_text(md)
    print("\n" + md)
    print("chosen:", {k: float(f"{v['chosen']:.3g}") for k, v in choices.items()})
    edge = [k for k, v in choices.items() if v["at_edge"]]
    if edge:
        print(f"at the edge of the grid (a wider sweep may do better): {edge}")


if __name__ == "__main__":
    main()
