"""Workload: all-MiniLM-L6-v2 + mean pool + a linear head on real fortune-topic batches.

The E1 model, trained the way a user trains it: the pretrained encoder from the asset
package, a fresh 6-way head, batch 32 of real fortunes tokenised and padded to 64 tokens
(the same fixed padding for both frameworks), AdamW. Every case trains the head in full
beside its adapters (PEFT's ``modules_to_save``).

jaxlora cases: ``full`` (plain ``jax.value_and_grad`` over every parameter, AdamW on all),
``input_only`` (forward + activation backward, no weight gradient: the floor),
``lora_attn`` / ``lora_all`` (rank 8, alpha 16 on the 24 attention / all 36 linear kernels),
``lora_fa``, ``vera`` (rank 64), ``dora``, ``delta_lora`` (all-linear). PyTorch cases
(``transformers.BertModel`` with the same weights, eager, sdpa attention, torch.optim.AdamW):
``torch_full``, ``peft_lora_attn``, ``peft_lora_all``, ``peft_vera``, ``peft_dora``.

Each case runs in its own process (``python -m benchmarks.worker minilm CASE``); see
:mod:`benchmarks.harness`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import _cases
from benchmarks._cases import LR, WEIGHT_DECAY

BATCH, SEQ, N_BATCHES = 32, 64, 8
VERA_RANK = 64
ALL_LINEAR = r"encoder/layers/.*/kernel"
ATTENTION = r"encoder/layers/.*/attn/.*/kernel"
PEFT_ATTENTION = ("query", "key", "value", "attention.output.dense")
PEFT_ALL = ("query", "key", "value", "dense")  # BertModel's 36 encoder linears (no pooler)

JAX_CASES = ("full", "input_only", "lora_attn", "lora_all", "lora_fa", "vera", "dora", "delta_lora")
TORCH_CASES = ("torch_full", "peft_lora_attn", "peft_lora_all", "peft_vera", "peft_dora")
CASES = JAX_CASES + TORCH_CASES


@functools.cache
def batches() -> tuple[dict[str, np.ndarray], ...]:
    """``N_BATCHES`` real training batches (token ids, mask, topic labels)."""
    from jaxlora import assets, data
    from jaxlora.models import loaders

    tok = loaders.load_tokenizer(assets.minilm_dir() / "tokenizer.json")
    train, _ = data.fortune_topics(seed=0)
    enc = data.encode_classification(train[: BATCH * N_BATCHES], tok, max_length=SEQ)
    return tuple(
        {k: v[i * BATCH : (i + 1) * BATCH] for k, v in enc.items()} for i in range(N_BATCHES)
    )


def real_tokens() -> float:
    """Mean number of non-padding tokens per batch (padding is computed but not counted)."""
    return float(np.mean([b["attention_mask"].sum() for b in batches()]))


def n_classes() -> int:
    from jaxlora import data

    return len(data.TOPICS)


# --------------------------------------------------------------------------- jaxlora


def jax_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    """``(step, info)``: ``step(i)`` runs one train step on batch ``i % N_BATCHES``."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlora import assets
    from jaxlora.models import bert, loaders

    config, encoder = loaders.load_bert_safetensors(assets.minilm_dir())
    key = jax.random.key(0)
    head = {
        "kernel": 0.02 * jax.random.normal(key, (config.hidden_size, n_classes())),
        "bias": jnp.zeros((n_classes(),)),
    }
    params = {"encoder": jax.tree_util.tree_map(jnp.asarray, encoder), "head": head}

    def loss_fn(p, b):
        hidden = bert.apply(p["encoder"], b["input_ids"], b["attention_mask"], config=config)
        logits = bert.mean_pool(hidden, b["attention_mask"]) @ p["head"]["kernel"]
        logp = jax.nn.log_softmax(logits + p["head"]["bias"])
        return -jnp.mean(jnp.take_along_axis(logp, b["labels"][:, None], axis=-1))

    device_batches = [jax.device_put(b) for b in batches()]
    info: dict[str, Any] = {}
    if case in ("full", "input_only"):
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

        def full_step(p, s, b):
            loss, g = jax.value_and_grad(loss_fn)(p, b)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        def input_only_step(p, s, b):
            # the floor: the same loss differentiated w.r.t. the embedding norm's scale only,
            # i.e. forward + activation backward with no weight gradient
            def f(scale):
                emb = {**p["encoder"]["embeddings"], "norm": {**norm, "scale": scale}}
                return loss_fn({**p, "encoder": {**p["encoder"], "embeddings": emb}}, b)

            norm = p["encoder"]["embeddings"]["norm"]
            loss, g = jax.value_and_grad(f)(norm["scale"])
            return p, s, loss + 0.0 * g[0]

        if case == "full":
            jitted = jax.jit(full_step, donate_argnums=(0, 1))
            state = [params, tx.init(params)]
            info["trainable"] = sum(x.size for x in jax.tree_util.tree_leaves(params))
        else:
            jitted = jax.jit(input_only_step)
            state = [params, ()]
        info["compiled"] = jitted.lower(*state, device_batches[0]).compile()

        def run(i: int) -> float:
            state[0], state[1], loss = jitted(state[0], state[1], device_batches[i % N_BATCHES])
            return float(loss)

        return run, info

    name, kw = _cases.recipe_args(
        case, attention=ATTENTION, all_linear=ALL_LINEAR, vera_rank=VERA_RANK
    )
    # the head trains in full beside the adapters, as in the E1 experiment
    return _cases.adapter_step(name, kw, params, loss_fn, device_batches, head="head/.*")


# --------------------------------------------------------------------------- PyTorch


def torch_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    """``(step, info)`` for a PyTorch / PEFT case, on the same weights and batches."""
    import os

    import torch
    import transformers

    from jaxlora import assets

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    # dropout off, like the jaxlora model: both sides compute the same function
    encoder = transformers.BertModel.from_pretrained(
        str(assets.minilm_dir()),
        attn_implementation="sdpa",
        add_pooling_layer=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if case != "torch_full":
        encoder = _cases.peft_model(
            encoder, case, attention=PEFT_ATTENTION, all_linear=PEFT_ALL, vera_rank=VERA_RANK
        )
    head = torch.nn.Linear(encoder.config.hidden_size, n_classes())
    trainable = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    encoder.train()
    tensors = [
        {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in b.items()} for b in batches()
    ]

    def run(i: int) -> float:
        b = tensors[i % N_BATCHES]
        mask = b["attention_mask"]
        hidden = encoder(input_ids=b["input_ids"], attention_mask=mask).last_hidden_state
        m = mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        loss = torch.nn.functional.cross_entropy(head(pooled), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return run, {"trainable": sum(p.numel() for p in trainable)}


def make_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    if case in JAX_CASES:
        return jax_case(case)
    if case in TORCH_CASES:
        return torch_case(case)
    raise ValueError(f"minilm: unknown case {case!r}; known: {list(CASES)}")
