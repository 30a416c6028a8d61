"""E1 — topic classification: all-MiniLM-L6-v2 + a linear head on six fortune topics.

Every method trains the same head in full beside its adapters (PEFT's ``modules_to_save``);
``linear_probe`` trains only the head, ``untrained`` is the random head before training.

    python -m experiments.run --config e1_topics --variant local   # 2-core CPU, minutes
    python -m experiments.run --config e1_topics --variant full    # GPU/TPU host
"""

from __future__ import annotations

from experiments.config import ExperimentConfig, MethodConfig, adapter_methods

TARGETS = "all-linear"  # every encoder kernel; the head is excluded by the preset


def methods(rank: int, vera_rank: int) -> tuple[MethodConfig, ...]:
    return (
        MethodConfig("untrained"),
        MethodConfig("linear_probe", learning_rate=1e-2),
        MethodConfig("full", learning_rate=5e-5),
        *adapter_methods(rank=rank, vera_rank=vera_rank, targets=TARGETS),
    )


def get_config(variant: str = "local") -> ExperimentConfig:
    if variant == "local":
        return ExperimentConfig(
            name="e1_topics",
            task="classification",
            # VeRA's paper rank (256) costs as much as the base matmuls at d=384 on a CPU;
            # 64 keeps it fast and still trains ~14x fewer parameters than LoRA r=8
            methods=methods(rank=8, vera_rank=64),
            steps=100,
            batch_size=16,
            max_length=48,
            warmup_steps=10,
        )
    if variant == "full":
        return ExperimentConfig(
            name="e1_topics_full",
            task="classification",
            methods=methods(rank=16, vera_rank=256),
            steps=2000,
            batch_size=64,
            max_length=128,
            eval_every=200,
            warmup_steps=100,
        )
    if variant == "tiny":  # the end-to-end test: seconds, not minutes
        return ExperimentConfig(
            name="e1_topics_tiny",
            task="classification",
            methods=(
                MethodConfig("untrained"),
                # Delta-LoRA moves (and donates) the base: the next method must not see it
                MethodConfig(
                    "delta_lora",
                    kwargs={
                        "rank": 2,
                        "targets": r".*attn/query/kernel",
                        "lam": 0.5,
                        "start_step": 1,
                    },
                ),
                MethodConfig("lora", kwargs={"rank": 2, "targets": r".*attn/query/kernel"}),
            ),
            steps=4,
            batch_size=4,
            max_length=16,
            warmup_steps=1,
            max_train_examples=64,
            max_eval_examples=16,
        )
    raise ValueError(f"e1_topics: unknown variant {variant!r}; use local, full or tiny")
