"""Workload: a 16.8M-parameter Llama-style decoder (4 x 512, MLP 1376, vocab 4096), batch 4 x 128.

Random weights (``jaxlora.models.llama.init_params``, key 0) and one random token batch
(key 1), the same for every contestant: the PyTorch side loads them into
``transformers.LlamaForCausalLM`` through ``to_hf_state_dict``, so every case starts from
the same step-0 loss. jaxlora cases: ``full``, ``input_only`` (forward + activation backward,
no weight gradient: the floor an adapter step approaches), ``lora_attn``, ``lora_all``,
``lora_fa``, ``vera`` (rank 16), ``dora``, ``delta_lora`` (all-linear). PyTorch cases:
``torch_full``, ``peft_lora_attn``, ``peft_lora_all``, ``peft_vera``, ``peft_dora``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import _cases
from benchmarks._cases import LR, WEIGHT_DECAY

BATCH, SEQ = 4, 128
VERA_RANK = 16
ATTENTION = r".*/attn/(q|k|v|o)_proj/kernel"
ALL_LINEAR = r"layers/.*/(attn|mlp)/.*_proj/kernel"
PEFT_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_ALL = (*PEFT_ATTENTION, "gate_proj", "up_proj", "down_proj")

JAX_CASES = ("full", "input_only", "lora_attn", "lora_all", "lora_fa", "vera", "dora", "delta_lora")
TORCH_CASES = ("torch_full", "peft_lora_attn", "peft_lora_all", "peft_vera", "peft_dora")
CASES = JAX_CASES + TORCH_CASES


@functools.cache
def config():
    from jaxlora.models import llama

    return llama.LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
    )


@functools.cache
def batches() -> tuple[dict[str, np.ndarray], ...]:
    rng = np.random.default_rng(1)
    return ({"ids": rng.integers(0, config().vocab_size, (BATCH, SEQ), dtype=np.int32)},)


def real_tokens() -> float:
    return float(BATCH * SEQ)


@functools.cache
def base_params():
    import jax

    from jaxlora.models import llama

    return jax.device_get(llama.init_params(jax.random.key(0), config()))


def jax_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlora.models import llama

    cfg = config()
    params = jax.tree_util.tree_map(jnp.asarray, base_params())
    batch = jax.device_put(batches()[0])

    def loss_fn(p, b):
        return llama.causal_lm_loss(llama.apply(p, b["ids"], config=cfg), b["ids"])

    info: dict[str, Any] = {}
    if case in ("full", "input_only"):
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        if case == "full":

            def step_fn(p, s, b):
                loss, g = jax.value_and_grad(loss_fn)(p, b)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s, loss

            state = [params, tx.init(params)]
            info["trainable"] = sum(x.size for x in jax.tree_util.tree_leaves(params))
        else:
            # the floor: the same loss differentiated w.r.t. the first norm's scale only,
            # i.e. forward + activation backward with no weight gradient
            def step_fn(p, s, b):
                def f(scale):
                    layer0 = {**p["layers"]["0"], "input_norm": {"scale": scale}}
                    return loss_fn({**p, "layers": {**p["layers"], "0": layer0}}, b)

                loss, g = jax.value_and_grad(f)(p["layers"]["0"]["input_norm"]["scale"])
                return p, s, loss + 0.0 * g[0]

            state = [params, ()]
        jitted = jax.jit(step_fn, donate_argnums=(1,))
        info["compiled"] = jitted.lower(*state, batch).compile()

        def run(i: int) -> float:
            state[0], state[1], loss = jitted(state[0], state[1], batch)
            return float(loss)

        return run, info

    name, kw = _cases.recipe_args(
        case, attention=ATTENTION, all_linear=ALL_LINEAR, vera_rank=VERA_RANK
    )
    return _cases.adapter_step(name, kw, params, loss_fn, [batch])


def torch_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    import os

    import torch
    import transformers

    from jaxlora.models.loaders import to_hf_state_dict

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    cfg = config()
    hf = transformers.LlamaConfig(**cfg.to_hf_config(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf)
    state = {
        k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in to_hf_state_dict(base_params(), cfg).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise ValueError(f"weight transfer mismatch: missing={missing} unexpected={unexpected}")
    if case != "torch_full":
        model = _cases.peft_model(
            model, case, attention=PEFT_ATTENTION, all_linear=PEFT_ALL, vera_rank=VERA_RANK
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(np.asarray(batches()[0]["ids"], np.int64))

    def run(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss.item()

    return run, {"trainable": sum(p.numel() for p in trainable)}


def make_case(case: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    if case in JAX_CASES:
        return jax_case(case)
    if case in TORCH_CASES:
        return torch_case(case)
    raise ValueError(f"decoder: unknown case {case!r}; known: {list(CASES)}")
