"""What the workloads share: the adapter cases, their jaxlora step, and PEFT's configs.

Both workloads train the same methods with the same hyper-parameters (rank 8, alpha 16,
AdamW), so the method table, the recipe-driven train step and the PEFT config live here
once; a workload supplies its targets, parameters, loss and batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

RANK, ALPHA = 8, 16.0
LR, WEIGHT_DECAY = 1e-4, 0.01
ADAPTER_CASES = ("lora_attn", "lora_all", "lora_fa", "vera", "dora", "delta_lora")


def recipe_args(case: str, *, attention: str, all_linear: str, vera_rank: int):
    """``(recipe name, keyword arguments)`` of an adapter case."""
    lora = dict(rank=RANK, alpha=ALPHA)
    return {
        "lora_attn": ("lora", dict(lora, targets=attention)),
        "lora_all": ("lora", dict(lora, targets=all_linear)),
        "lora_fa": ("lora_fa", dict(lora, targets=all_linear)),
        "vera": ("vera", dict(rank=vera_rank, targets=all_linear)),
        "dora": ("dora", dict(lora, targets=all_linear)),
        "delta_lora": ("delta_lora", dict(lora, targets=all_linear, lam=0.5, start_step=2)),
    }[case]


def adapter_step(
    name: str,
    kwargs: dict[str, Any],
    params: Any,
    loss_fn: Callable[..., Any],
    batches: Sequence[Any],
    *,
    head: str | None = None,
) -> tuple[Callable[[int], float], dict[str, Any]]:
    """``(step, info)``: the recipe's adapters (and a fully trained ``head``), its optimizer
    and ``jl.train_step``; ``step(i)`` trains on ``batches[i % len(batches)]``."""
    import jax
    import optax

    import jaxlora as jl

    recipe = jl.recipe(name, **kwargs)
    if head is not None:
        method = jl.compose(recipe.method, jl.full(targets=head))
        recipe = dataclasses.replace(recipe, method=method)
    params, adapters = recipe.prepare(jax.random.key(1), params)
    tx = recipe.optimizer(optax.adamw, learning_rate=LR, weight_decay=WEIGHT_DECAY)
    step = jl.train_step(loss_fn, tx)
    state = [params, adapters, tx.init(adapters)]

    def run(i: int) -> float:
        state[0], state[1], state[2], metrics = step(*state, batches[i % len(batches)])
        return float(metrics["loss"])

    return run, {"trainable": jl.num_trainable(adapters)}


def peft_model(model: Any, case: str, *, attention: Sequence[str], all_linear: Sequence[str],
               vera_rank: int) -> Any:  # fmt: skip
    """``model`` wrapped by PEFT for ``case`` (``peft_lora_attn``, ``peft_lora_all``,
    ``peft_vera``, ``peft_dora``), dropout off as on the jaxlora side."""
    import warnings

    import peft

    modules = list(attention if case == "peft_lora_attn" else all_linear)
    if case == "peft_vera":
        config = peft.VeraConfig(r=vera_rank, target_modules=modules, vera_dropout=0.0)
    else:
        config = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=modules,
            lora_dropout=0.0,
            use_dora=case == "peft_dora",
        )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated attributes; harmless, and the peer's to fix
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)
