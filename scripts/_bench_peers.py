"""The peers ``scripts/bench.py`` measures jaxlora against, on the same weights and batch.

* Hugging Face PEFT LoRA on ``transformers.LlamaForCausalLM`` (torch, eager, the ``sdpa``
  attention class, ``torch.optim.AdamW``): the model most fine-tuning is done with today.
* Qwix LoRA (the LoRA Tunix and MaxText use) on :class:`NnxLlama`, a minimal Flax NNX
  decoder written here. Its projections are ``nnx.Linear`` layers, which Qwix intercepts
  through its public ``LoraProvider`` / ``apply_lora_to_model``. Norms, RoPE and attention
  reuse :mod:`jaxlora.models._layers`, so the NNX model computes exactly what
  :mod:`jaxlora.models.llama` computes and only the adapter machinery differs.

Both are built from a jaxlora Llama parameter tree (``to_hf_state_dict`` for torch, a
direct copy for NNX), so every contestant trains the same model; the step-0 losses, which
the benchmark reports, agree because every method starts with ``ΔW = 0``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.models import llama
from jaxlora.models._layers import attention, attention_mask_4d, rotary_embedding

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# -------------------------------------------------------------------- Hugging Face PEFT


def torch_threads() -> int:
    """The cores XLA's CPU client uses (it sizes its pool by the process's CPU affinity)."""
    return len(os.sched_getaffinity(0))


def peft_step(
    config: llama.LlamaConfig,
    params: Any,
    ids: np.ndarray,
    *,
    targets: str,
    rank: int,
    alpha: float,
    learning_rate: float,
    weight_decay: float,
) -> tuple[Callable[[], float], int]:
    """A PEFT LoRA train step on ``LlamaForCausalLM`` holding ``params``' weights.

    Args:
      config: the jaxlora config; the torch model gets ``config.to_hf_config()``.
      params: a jaxlora Llama parameter tree, copied into the torch model.
      ids: the ``(batch, seq)`` token batch (the labels too, as in the JAX loss).
      targets: ``"attention"`` (q/k/v/o projections) or ``"all-linear"`` (PEFT's preset).
      rank: LoRA rank.
      alpha: LoRA alpha (scale ``alpha / rank``).
      learning_rate: AdamW learning rate.
      weight_decay: AdamW weight decay.

    Returns:
      ``(step, trainable)``: ``step()`` runs one train step and returns its loss (a Python
      float, which also synchronises, so wall time around it is the step's); ``trainable``
      counts the parameters PEFT trains.
    """
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(torch_threads())
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**config.to_hf_config(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config)
    state = {k: torch.from_numpy(v) for k, v in llama_state_dict(params, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # rotary buffers are computed, not stored; everything else must come from `params`
    if unexpected or any("rotary" not in m for m in missing):
        raise ValueError(f"weight transfer mismatch: missing={missing} unexpected={unexpected}")
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(ATTENTION_MODULES) if targets == "attention" else "all-linear",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; harmless
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = peft.get_peft_model(model, lora_config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    batch = torch.from_numpy(np.asarray(ids, dtype=np.int64))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in trainable)


def llama_state_dict(params: Any, config: llama.LlamaConfig) -> dict[str, np.ndarray]:
    """``to_hf_state_dict`` in float32 (the torch reference runs in float32 on CPU)."""
    from jaxlora.models.loaders import to_hf_state_dict

    return {k: v.astype(np.float32) for k, v in to_hf_state_dict(params, config).items()}


# ------------------------------------------------------------------------- Qwix on NNX


def _nnx():
    from flax import nnx

    return nnx


def nnx_llama(config: llama.LlamaConfig, params: Any):
    """A Flax NNX Llama holding ``params``' weights (the layout of :mod:`jaxlora.models.llama`).

    The module tree mirrors the linen one (``layers/0/attn/q_proj/kernel``...), so Qwix rules
    select projections by the same names.
    """
    nnx = _nnx()
    c = config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

    def linear(d_in, d_out, rngs):
        return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def norm(rngs):
        return nnx.RMSNorm(
            c.hidden_size, epsilon=c.rms_norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs
        )

    class Attention(nnx.Module):
        def __init__(self, rngs):
            d, hd = c.hidden_size, c.head_dim
            self.q_proj = linear(d, c.num_heads * hd, rngs)
            self.k_proj = linear(d, c.num_kv_heads * hd, rngs)
            self.v_proj = linear(d, c.num_kv_heads * hd, rngs)
            self.o_proj = linear(c.num_heads * hd, d, rngs)

        def __call__(self, x, mask, positions):
            b, s, _ = x.shape
            q = self.q_proj(x).reshape(b, s, c.num_heads, c.head_dim)
            k = self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
            v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
            q = rotary_embedding(q, positions, theta=c.rope_theta)
            k = rotary_embedding(k, positions, theta=c.rope_theta)
            return self.o_proj(attention(q, k, v, mask).reshape(b, s, c.num_heads * c.head_dim))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.gate_proj = linear(c.hidden_size, c.intermediate_size, rngs)
            self.up_proj = linear(c.hidden_size, c.intermediate_size, rngs)
            self.down_proj = linear(c.intermediate_size, c.hidden_size, rngs)

        def __call__(self, x):
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.input_norm = norm(rngs)
            self.attn = Attention(rngs)
            self.post_attn_norm = norm(rngs)
            self.mlp = MLP(rngs)

        def __call__(self, x, mask, positions):
            x = x + self.attn(self.input_norm(x), mask, positions)
            return x + self.mlp(self.post_attn_norm(x))

    class NnxLlama(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(
                c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=pdtype, rngs=rngs
            )
            self.layers = nnx.List([Block(rngs) for _ in range(c.num_layers)])
            self.final_norm = norm(rngs)
            self.lm_head = linear(c.hidden_size, c.vocab_size, rngs)

        def __call__(self, input_ids):
            seq = input_ids.shape[1]
            positions = jnp.broadcast_to(jnp.arange(seq), input_ids.shape)
            mask = attention_mask_4d(None, seq, causal=True)
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x, mask, positions)
            return self.lm_head(self.final_norm(x))

    if c.tie_embeddings or c.scan_layers:
        raise ValueError("the NNX reference model is untied and unscanned")
    model = NnxLlama(nnx.Rngs(0))
    # copy the weights, so the NNX model is the same model as the jaxlora one
    model.embed.embedding[...] = params["embed"]["embedding"]
    model.final_norm.scale[...] = params["final_norm"]["scale"]
    model.lm_head.kernel[...] = params["lm_head"]["kernel"]
    for i, block in enumerate(model.layers):
        p = params["layers"][str(i)]
        block.input_norm.scale[...] = p["input_norm"]["scale"]
        block.post_attn_norm.scale[...] = p["post_attn_norm"]["scale"]
        for group, names in (
            ("attn", ATTENTION_MODULES),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                getattr(getattr(block, group), name).kernel[...] = p[group][name]["kernel"]
    return model


@contextlib.contextmanager
def _qwix_on_flax_012():
    """Silences the deprecation warnings qwix 0.1.8 raises under flax 0.12.

    It calls NNX APIs flax 0.12 deprecates (``m.iter_modules()``, ``nnx.VariableState``...)
    while it wraps the model and while the wrapped model is traced; the tests turn warnings
    into errors, and these are the peer's to fix, not ours.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def qwix_train_step(
    config: llama.LlamaConfig,
    params: Any,
    ids: jax.Array,
    *,
    targets: str,
    rank: int,
    alpha: float,
    learning_rate: float,
    weight_decay: float,
):
    """A Qwix LoRA train step on :func:`nnx_llama`, jitted the fast NNX way.

    The LoRA parameters (``nnx.LoRAParam``) are split from the frozen rest once; the jitted
    step merges them inside the trace, so no NNX graph traversal runs per step (the pattern
    the Flax docs recommend for performance), and it donates the LoRA and optimizer state.

    Returns:
      ``(jitted, args)``: ``jitted(*args) -> (lora_state, opt_state, loss)``, where ``args``
      is ``[lora_state, opt_state, rest, ids]``.
    """
    import qwix

    nnx = _nnx()
    model = nnx_llama(config, params)
    pattern = r".*(q|k|v|o)_proj" if targets == "attention" else r".*_proj"
    provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=alpha)
    with _qwix_on_flax_012():
        model = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(2))
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    n_lora = len(jax.tree_util.tree_leaves(lora_state))
    expected = 2 * config.num_layers * (4 if targets == "attention" else 7)
    if n_lora != expected:
        raise RuntimeError(f"Qwix created {n_lora} LoRA arrays, expected {expected}")
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def train(lora_state, opt_state, rest, ids):
        def loss_fn(lora_state):
            with _qwix_on_flax_012():  # (Python, so at trace time only)
                logits = nnx.merge(graphdef, lora_state, rest)(ids)
            return llama.causal_lm_loss(logits, ids)

        loss, grads = jax.value_and_grad(loss_fn)(lora_state)
        updates, opt_state = tx.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    jitted = jax.jit(train, donate_argnums=(0, 1))
    return jitted, [lora_state, tx.init(lora_state), rest, ids]
