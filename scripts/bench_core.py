"""Train-step cost of LoRA through ``jl.adapt`` vs full fine-tuning, measured side by side.

For one Llama-style decoder and one batch it builds, jits and measures:

* ``full``: full fine-tuning (gradient of every parameter, Adam on all of them);
* ``input-only``: the same loss differentiated w.r.t. the first norm scale only, i.e.
  forward + activation backward and no weight gradients: the floor any adapter method
  approaches (DESIGN.md §3);
* ``lora-merged``: LoRA differentiated through ``loss(merge(params, adapters))``, the naive
  form, which makes XLA compute every targeted kernel's full weight gradient;
* ``lora``: LoRA through ``jl.adapt`` (``jl.train_step``), attention and all-linear targets.

It prints XLA flops, temp memory and median step time, each as a ratio to full fine-tuning
measured in the same run. Usage::

    python scripts/bench_core.py            # 16.8M-param model (4 x 512), batch 4 x 128
    python scripts/bench_core.py --quick    # a small model, for CI-sized runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora as jl
from jaxlora.models import llama
from jaxlora.profiling import compiled_cost

ATTENTION = r".*attn/(q|k|v|o)_proj/kernel"

FULL_CONFIG = llama.LlamaConfig(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1376,
    num_layers=4,
    num_heads=8,
    num_kv_heads=8,
)
QUICK_CONFIG = llama.LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
)


def full_finetune_step(loss, tx):
    """The yardstick: the gradient of every parameter and ``tx`` applied to all of them."""

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


@dataclasses.dataclass
class Case:
    name: str
    step: Callable[..., Any]
    args: tuple[Any, ...]


def llama_loss(config: llama.LlamaConfig):
    """Next-token loss of the Llama model on ``batch["ids"]``, for plain parameters."""

    def loss(params, batch):
        logits = llama.apply(params, batch["ids"], config=config)
        return llama.causal_lm_loss(logits, batch["ids"])

    return loss


def build_cases(
    config: llama.LlamaConfig, batch: int, seq: int, rank: int = 8, names=None
) -> list[Case]:
    """The train steps compared by this benchmark, with example arguments.

    ``names`` (optional) keeps only the cases with those names.
    """
    params = llama.init_params(jax.random.key(0), config)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    data = {"ids": ids}
    loss = llama_loss(config)
    adam = optax.adam(1e-4)
    full_step = full_finetune_step(loss, adam)

    norm_path = ("layers", "input_norm") if config.scan_layers else ("layers", "0", "input_norm")

    def input_only(params, batch):
        def f(scale):
            p = jax.tree_util.tree_map(lambda x: x, params)
            node = p
            for k in norm_path:
                node = node[k]
            node["scale"] = scale
            return loss(p, batch)

        node = params
        for k in norm_path:
            node = node[k]
        return jax.value_and_grad(f)(node["scale"])

    cases = [
        Case("full", jax.jit(full_step, donate_argnums=(0, 1)), (params, adam.init(params), data)),
        Case("input-only", jax.jit(input_only), (params, data)),
    ]
    for label, targets in [("attention", ATTENTION), ("all-linear", "all-linear")]:
        # kernel axes from use: scanned layers are (L, d_in, d_out), which shapes alone leave open
        method = jl.lora(rank=rank, alpha=16, targets=targets)
        ad = method.init(jax.random.key(2), params, like=(loss, data))
        tx = jl.optimizer(adam)

        def merged_step(params, adapters, opt_state, batch, tx=tx):
            value, grads = jax.value_and_grad(lambda a: loss(jl.merge(params, a), batch))(adapters)
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, value

        st = tx.init(ad)
        cases.append(
            Case(
                f"lora-merged {label}",
                jax.jit(merged_step, donate_argnums=(1, 2)),
                (params, ad, st, data),
            )
        )
        cases.append(Case(f"lora {label}", jl.train_step(loss, tx), (params, ad, st, data)))
    return [c for c in cases if names is None or c.name in names]


def flop_ratios(config: llama.LlamaConfig, batch: int, seq: int, names=None) -> dict[str, float]:
    """XLA flops of every case divided by full fine-tuning's (deterministic; no timing)."""
    names = None if names is None else {"full", *names}
    cases = build_cases(config, batch, seq, names=names)
    costs = {c.name: compiled_cost(c.step, *c.args).flops for c in cases}
    return {k: v / costs["full"] for k, v in costs.items()}


def _time(case: Case, steps: int) -> list[float]:
    args = list(case.args)
    donated = case.name == "full" or case.name.startswith(("lora", "lora-merged"))

    def run(args):
        out = case.step(*args)
        jax.block_until_ready(out)
        if donated and case.name == "full":
            return [out[0], out[1], args[2]]
        if donated:
            return [args[0], out[0], out[1], args[3]]
        return args

    # fresh copies: the steps donate their inputs
    args = jax.tree_util.tree_map(jnp.copy, args)
    args = run(args)  # compile + warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        args = run(args)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--scan", action="store_true", help="scan over stacked layers")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    config = QUICK_CONFIG if args.quick else FULL_CONFIG
    config = dataclasses.replace(config, scan_layers=args.scan)
    batch, seq = (2, 64) if args.quick else (4, 128)
    steps = args.steps or (5 if args.quick else 10)
    cases = build_cases(config, batch, seq)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(cases[0].args[0]))
    print(
        f"model: {n_params / 1e6:.1f}M params, {config.num_layers} x {config.hidden_size}, "
        f"batch {batch} x {seq}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"{steps} timed steps per case"
    )
    rows = []
    for case in cases:
        cost = compiled_cost(case.step, *case.args)
        times = _time(case, steps)
        rows.append(
            {
                "case": case.name,
                "flops": cost.flops,
                "temp_bytes": cost.temp_bytes,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
            }
        )
    base = rows[0]
    print(
        "\n| step | flops / full | temp mem / full | time / full (median) | median ms "
        "| min–max ms |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['case']} | {r['flops'] / base['flops']:.3f} "
            f"| {r['temp_bytes'] / max(base['temp_bytes'], 1):.3f} "
            f"| {r['median_s'] / base['median_s']:.3f} | {1e3 * r['median_s']:.1f} "
            f"| {1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": dataclasses.asdict(config), "batch": batch, "seq": seq, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
