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
from jaxlora.quant import dequantize, quantize


@dataclasses.dataclass
class Task:
    """A model + data + objective, independent of the fine-tuning method."""

    params: Any
    """Base parameters, including a freshly initialised head if the task adds one."""
    head: str | None
    """Regex of the head's leaves (trained in full by every method), or None."""
    loss_fn: Callable[..., jax.Array]
    """``loss_fn(params, batch, key=None)``: the training loss, averaged over the batch's
    ``valid`` examples; ``key`` drives the model's dropout (None: no dropout)."""
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
    """The longest sequence length (``max_length``); a batch's own is its bucket's."""
    sample: Callable[[Any], list[str]] | None = None
    """``sample(merged_params)`` -> generated texts (causal LM only)."""


def partition_rules(preset: str):
    """The base params' partition rules for ``preset`` (``dp`` replicates everything)."""
    from jax.sharding import PartitionSpec as P

    if preset == "dp":
        return ((".*", P()),)
    return llama.partition_rules(preset)


def _take(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}


def _subsets(
    arrays: dict[str, np.ndarray], n: int | None, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A random subset of ``n`` examples (in data order) and the examples left out.

    The loaders return examples grouped by class, so a prefix would be one class only; a
    seeded permutation keeps about every class's share.
    """
    total = len(next(iter(arrays.values())))
    if n is None or n >= total:
        return arrays, _take(arrays, np.zeros(0, np.int64))
    order = np.random.default_rng([seed, 7]).permutation(total)
    return _take(arrays, np.sort(order[:n])), _take(arrays, np.sort(order[n:]))


def _splits(
    config: ExperimentConfig, train: dict[str, np.ndarray], val: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The training set and the evaluation set the config asks for (``eval_split``)."""
    train, left_out = _subsets(train, config.max_train_examples, config.seed)
    if config.eval_split == "validation":
        held_out = val
    elif config.eval_split == "dev":
        held_out = left_out
        if not len(held_out["labels" if "labels" in held_out else "input_ids"]):
            raise ValueError(
                f"{config.name}: eval_split='dev' needs training examples left out by "
                "max_train_examples, and it leaves none"
            )
    else:
        raise ValueError(
            f"{config.name}: eval_split must be 'validation' or 'dev', got {config.eval_split!r}"
        )
    return train, _subsets(held_out, config.max_eval_examples, config.seed + 1)[0]


def _weighted_mean(per_example: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """The mean over the batch's ``valid`` examples (all of them when it has none)."""
    if "valid" not in batch:
        return jnp.mean(per_example)
    w = batch["valid"].astype(per_example.dtype)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


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

    def logits(p, batch, key=None):
        hidden = bert.apply(
            p["encoder"],
            batch["input_ids"],
            batch["attention_mask"],
            config=bert_config,
            dropout_rng=key,
        )
        pooled = bert.mean_pool(hidden, batch["attention_mask"])
        return pooled @ p["head"]["kernel"] + p["head"]["bias"]

    def loss_fn(p, batch, key=None):
        logp = jax.nn.log_softmax(logits(p, batch, key))
        nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
        return _weighted_mean(nll, batch)

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

    train, held_out = _splits(config, enc(train), enc(val))
    return Task(
        params=params,
        head=r"head/.*",
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        finish=finish,
        metric="accuracy",
        higher_is_better=True,
        train=train,
        eval=held_out,
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

    def loss_fn(p, batch, key=None):
        lg = llama.apply(
            p, batch["input_ids"], batch["attention_mask"], config=model_config, dropout_rng=key
        )
        mask = batch["loss_mask"]
        if "valid" in batch:  # a short bucketed batch's filler rows carry no loss
            mask = mask * batch["valid"][:, None]
        return llama.causal_lm_loss(lg, batch["input_ids"], mask)

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

    train, held_out = _splits(config, enc(train), enc(val))

    # an answer ends at the end-of-turn token; without it greedy decoding runs on into
    # invented further turns
    end_of_turn = tokenizer.token_to_id("<|im_end|>")

    def sample(merged):
        merged = dequantize(merged)  # generate runs flax modules: a float base
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
        train=train,
        eval=held_out,
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
