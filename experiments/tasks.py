"""Tasks: a real pretrained model, its data, a loss and an evaluation, for any method.

A :class:`Task` holds the base parameters (including any new head), the training and
evaluation arrays, ``loss_fn(params, batch)`` written for plain parameters, and
``eval_fn(params, batch) -> sums`` whose sums over evaluation batches give the metrics. The
launcher runs both through ``jaxlora.adapt``, so nothing here knows about adapters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import ExperimentConfig
from jaxlora import assets, data
from jaxlora.models import bert, llama, loaders
from jaxlora.quant import quantize


@dataclasses.dataclass
class Task:
    """A model + data + objective, independent of the fine-tuning method."""

    params: Any
    """Base parameters, including a freshly initialised head if the task adds one."""
    head: str | None
    """Regex of the head's leaves (trained in full by every method), or None."""
    loss_fn: Callable[[Any, dict[str, Any]], jax.Array]
    """``loss_fn(params, batch)``: mean training loss."""
    eval_fn: Callable[[Any, dict[str, Any]], dict[str, jax.Array]]
    """``eval_fn(params, batch)``: metric sums over the batch's valid examples."""
    finish: Callable[[dict[str, float]], dict[str, float]]
    """Turns summed eval outputs into metrics (``accuracy``, ``loss``...)."""
    metric: str
    """The headline metric of the results table."""
    higher_is_better: bool
    """Whether a larger headline metric is better."""
    train: dict[str, np.ndarray]
    """Training arrays."""
    eval: dict[str, np.ndarray]
    """Held-out arrays."""
    tokens_per_example: int
    """Sequence length, for throughput."""
    sample: Callable[[Any], list[str]] | None = None
    """``sample(merged_params)`` -> generated texts (causal LM only)."""


def partition_rules(preset: str):
    """The base params' partition rules for ``preset`` (``dp`` replicates everything)."""
    from jax.sharding import PartitionSpec as P

    if preset == "dp":
        return ((".*", P()),)
    return llama.partition_rules(preset)


def _cap(arrays: dict[str, np.ndarray], n: int | None) -> dict[str, np.ndarray]:
    return arrays if n is None else {k: v[:n] for k, v in arrays.items()}


def topic_classification(config: ExperimentConfig) -> Task:
    """all-MiniLM-L6-v2 + a linear head on the fortune topics (mean-pooled embeddings)."""
    model_dir = assets.minilm_dir()
    bert_config, encoder = loaders.load_bert_safetensors(model_dir)
    tokenizer = loaders.load_tokenizer(model_dir / "tokenizer.json")
    train, val = data.fortune_topics(seed=config.seed)
    enc = functools.partial(
        data.encode_classification, tokenizer=tokenizer, max_length=config.max_length
    )
    n_classes = len(data.TOPICS)
    key = jax.random.key(config.seed)
    head = {
        "kernel": 0.02 * jax.random.normal(key, (bert_config.hidden_size, n_classes)),
        "bias": jnp.zeros((n_classes,)),
    }
    params = {"encoder": jax.tree_util.tree_map(jnp.asarray, encoder), "head": head}

    def logits(p, batch):
        hidden = bert.apply(
            p["encoder"], batch["input_ids"], batch["attention_mask"], config=bert_config
        )
        pooled = bert.mean_pool(hidden, batch["attention_mask"])
        return pooled @ p["head"]["kernel"] + p["head"]["bias"]

    def loss_fn(p, batch):
        logp = jax.nn.log_softmax(logits(p, batch))
        return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1))

    def eval_fn(p, batch):
        lg = logits(p, batch)
        valid = batch["valid"].astype(jnp.float32)
        logp = jax.nn.log_softmax(lg)
        nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(lg, -1) == batch["labels"]).astype(jnp.float32)
        return {
            "correct": jnp.sum(correct * valid),
            "nll": jnp.sum(nll * valid),
            "count": jnp.sum(valid),
        }

    def finish(s):
        return {"accuracy": s["correct"] / s["count"], "loss": s["nll"] / s["count"]}

    return Task(
        params=params,
        head=r"head/.*",
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        finish=finish,
        metric="accuracy",
        higher_is_better=True,
        train=_cap(enc(train), config.max_train_examples),
        eval=_cap(enc(val), config.max_eval_examples),
        tokens_per_example=config.max_length,
    )


def causal_lm(config: ExperimentConfig) -> Task:
    """SmolLM2-135M-Instruct (from GGUF) on chatterbot question/answer dialogues."""
    gguf = assets.smollm2_gguf()
    quantized = config.base_quantization == "q4_1"
    model_config, params = loaders.load_llama_gguf(gguf, quantized=quantized)
    tokenizer = loaders.load_gguf_tokenizer(gguf)
    pairs = data.load_dialogues()
    train, val = data.train_validation_split(pairs, validation_fraction=0.2, seed=config.seed)
    enc = functools.partial(
        data.encode_dialogues, tokenizer=tokenizer, max_length=config.max_length
    )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if config.base_quantization == "nf4":
        params = quantize(params, targets="all-linear", kind="nf4", double_quant=True)
    elif config.base_quantization not in (None, "q4_1"):
        raise ValueError(
            f"{config.name}: base_quantization must be None, 'nf4' or 'q4_1', "
            f"got {config.base_quantization!r}"
        )

    def loss_fn(p, batch):
        lg = llama.apply(p, batch["input_ids"], batch["attention_mask"], config=model_config)
        return llama.causal_lm_loss(lg, batch["input_ids"], batch["loss_mask"])

    def eval_fn(p, batch):
        mask = batch["loss_mask"] * batch["valid"][:, None]
        lg = llama.apply(p, batch["input_ids"], batch["attention_mask"], config=model_config)
        tokens = jnp.sum(mask[:, 1:])
        return {
            "nll": llama.causal_lm_loss(lg, batch["input_ids"], mask) * tokens,
            "tokens": tokens,
        }

    def finish(s):
        return {"loss": s["nll"] / s["tokens"]}

    # an answer ends at the end-of-turn token; without it greedy decoding runs on into
    # invented further turns
    end_of_turn = tokenizer.token_to_id("<|im_end|>")

    def sample(merged):
        out = []
        for prompt in config.generate_prompts:
            ids = tokenizer.encode(data.CHATML[0].format(prompt=prompt)).ids
            gen = llama.generate(merged, model_config, ids, 32, eos_id=end_of_turn)
            text = tokenizer.decode(gen[len(ids) :].tolist(), skip_special_tokens=True)
            out.append(text.strip())
        return out

    return Task(
        params=params,
        head=None,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        finish=finish,
        metric="loss",
        higher_is_better=False,
        train=_cap(enc(train), config.max_train_examples),
        eval=_cap(enc(val), config.max_eval_examples),
        tokens_per_example=config.max_length,
        sample=sample,
    )


RULE_PRESETS: dict[str, tuple[str, ...]] = {
    "classification": ("dp",),
    "causal_lm": ("dp", "fsdp", "tp", "fsdp_tp"),
}
"""Partition-rule presets per task (BERT has no sharded preset yet), checked up front."""

TASKS: dict[str, Callable[[ExperimentConfig], Task]] = {
    "classification": topic_classification,
    "causal_lm": causal_lm,
}

ASSETS: dict[str, tuple[str, ...]] = {
    "classification": ("minilm", "fortunes"),
    "causal_lm": ("smollm2", "chatterbot"),
}
"""The assets (``jaxlora.assets`` names) each task reads, checked before any training."""
