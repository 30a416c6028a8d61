"""E2 — causal LM: SmolLM2-135M-Instruct (from its GGUF) on chatterbot Q/A dialogues.

The loss is on the answer tokens only; the table reports held-out loss before and after,
and greedy answers to a few prompts before and after.

    python -m experiments.run --config e2_causal_lm --variant local   # CPU, ~15 min
    python -m experiments.run --config e2_causal_lm --variant full    # GPU/TPU host
    python -m experiments.run --config e2_causal_lm --variant qlora   # CPU, NF4 base

``qlora`` is ``local``'s LoRA on an NF4 base (QLoRA: blocks of 64, double-quantized scales,
the base kept packed and dequantized per layer inside the step), to compare with ``local``'s
float-base LoRA, the same protocol on the float32 base::

    python -m experiments.run --config e2_causal_lm --variant local --methods lora

Delta-LoRA, which moves its base kernels, and full fine-tuning are left out: neither
trains a frozen quantized base. Measured (2026-12-03, 40 steps, 128 held-out dialogues):
held-out loss 3.119 -> 1.277 on the float32 base, 3.395 -> 1.381 on NF4 (1.081x the
float-base result; the NF4 base starts 8.8 % worse, re-quantized from the file's Q4_1).
"""

from __future__ import annotations

import dataclasses

from experiments.config import ExperimentConfig, MethodConfig, adapter_methods

TARGETS = "all-linear"
PROMPTS = ("What is AI?", "Do you like music?", "Tell me a joke.")


def methods(rank: int, vera_rank: int) -> tuple[MethodConfig, ...]:
    return (
        MethodConfig("full", learning_rate=2e-5),
        *adapter_methods(rank=rank, vera_rank=vera_rank, targets=TARGETS, delta_start=5),
    )


def get_config(variant: str = "local") -> ExperimentConfig:
    if variant == "local":
        return ExperimentConfig(
            name="e2_causal_lm",
            task="causal_lm",
            methods=methods(rank=8, vera_rank=64),
            steps=40,
            batch_size=8,
            max_length=64,
            warmup_steps=5,
            max_eval_examples=128,
            generate_prompts=PROMPTS,
        )
    if variant == "full":
        return ExperimentConfig(
            name="e2_causal_lm_full",
            task="causal_lm",
            methods=methods(rank=16, vera_rank=256),
            steps=1000,
            batch_size=32,
            max_length=128,
            eval_every=100,
            warmup_steps=50,
            generate_prompts=PROMPTS,
        )
    if variant == "qlora":
        lora = next(m for m in methods(rank=8, vera_rank=64) if m.name == "lora")
        return dataclasses.replace(
            get_config("local"),
            name="e2_causal_lm_qlora",
            methods=(lora,),
            base_quantization="nf4",
        )
    if variant == "tiny":  # the end-to-end test (marked slow: SmolLM2 compiles in ~30 s)
        return ExperimentConfig(
            name="e2_causal_lm_tiny",
            task="causal_lm",
            methods=(MethodConfig("lora", kwargs={"rank": 2, "targets": r".*attn/q_proj/kernel"}),),
            steps=2,
            batch_size=2,
            max_length=32,
            warmup_steps=1,
            max_train_examples=8,
            max_eval_examples=4,
            generate_prompts=PROMPTS[:1],
        )
    raise ValueError(f"e2_causal_lm: unknown variant {variant!r}; use local, full, qlora or tiny")
