"""A Llama-family decoder in Flax linen (Llama 2/3, SmolLM2, TinyLlama, ...).

The model exists to be adapted, so its parameter tree is the contract: readable key paths
(``layers/3/attn/q_proj/kernel``) that target specs match by regex, and every projection a
plain ``x @ kernel`` with a 2-D ``(d_in, d_out)`` kernel so that ``jaxlora.adapt`` sees one
``dot_general`` per kernel. With ``scan_layers=True`` the layers are one ``nn.scan`` over
stacked weights (``layers/attn/q_proj/kernel`` is ``(L, d_in, d_out)``), which compiles
once instead of ``L`` times; ``remat=True`` rematerialises each layer in the backward pass.

There is no dropout: fine-tuning regularisation belongs to the adapter methods, and a
deterministic forward pass is what the parity tests against ``transformers`` need.
Use :func:`init_params` and :func:`apply` rather than the module classes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlora.models._layers import attention, attention_mask_4d, rotary_embedding


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static configuration of a Llama-family decoder (hashable, so usable as a jit static)."""

    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width ``d`` of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads; fewer than ``num_heads`` means grouped-query attention."""
    head_dim: int | None = None
    """Per-head width; defaults to ``hidden_size // num_heads``."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Whether the output projection reuses ``embed/embedding`` (then ``lm_head`` is absent)."""
    max_position_embeddings: int = 2048
    """Longest context the model was trained for (informational; RoPE does not need it)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialiser of kernels and embeddings."""
    scan_layers: bool = False
    """Stack the layers' weights on a leading axis and run them with ``nn.scan``."""
    remat: bool = False
    """Rematerialise each layer's activations in the backward pass (``nn.remat``)."""
    dtype: str = "float32"
    """Activation dtype (parameters stay in ``param_dtype``)."""
    param_dtype: str = "float32"
    """Dtype of freshly initialised parameters."""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from a Hugging Face ``config.json`` dictionary.

        Args:
          config: the parsed ``config.json`` of a ``LlamaForCausalLM`` checkpoint
            (transformers 4 ``rope_theta`` or transformers 5 ``rope_parameters``).
          **overrides: fields to set on top, e.g. ``scan_layers=True``.

        Returns:
          The config.

        Raises:
          ValueError: for features this implementation does not have (biases, RoPE
            scaling, an activation other than SiLU).

        Examples:
          >>> c = LlamaConfig.from_hf_config({"vocab_size": 10, "hidden_size": 8,
          ...     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2})
          >>> c.num_kv_heads, c.head_dim, c.tie_embeddings
          (2, 4, False)
        """
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        unsupported = {
            "rope scaling": rope_type != "default",
            "attention_bias": bool(config.get("attention_bias", False)),
            "mlp_bias": bool(config.get("mlp_bias", False)),
            "hidden_act": config.get("hidden_act", "silu") != "silu",
        }
        if any(unsupported.values()):
            bad = [k for k, v in unsupported.items() if v]
            raise ValueError(f"unsupported Llama config features: {bad}")
        fields = dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim"),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            initializer_range=float(config.get("initializer_range", 0.02)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``LlamaConfig`` keyword arguments describing this model.

        Returns:
          A dict for ``transformers.LlamaConfig(**d)`` (or a ``config.json``).

        Examples:
          >>> c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2,
          ...                 num_heads=2, num_kv_heads=1)
          >>> LlamaConfig.from_hf_config(c.to_hf_config()) == c
          True
        """
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
        }


class _Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.config
        dense = functools.partial(
            nn.Dense,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range),
        )
        batch, seq, _ = x.shape
        q = dense(c.num_heads * c.head_dim, name="q_proj")(x)
        k = dense(c.num_kv_heads * c.head_dim, name="k_proj")(x)
        v = dense(c.num_kv_heads * c.head_dim, name="v_proj")(x)
        q = rotary_embedding(
            q.reshape(batch, seq, c.num_heads, c.head_dim), positions, theta=c.rope_theta
        )
        k = rotary_embedding(
            k.reshape(batch, seq, c.num_kv_heads, c.head_dim), positions, theta=c.rope_theta
        )
        v = v.reshape(batch, seq, c.num_kv_heads, c.head_dim)
        out = attention(q, k, v, mask).reshape(batch, seq, c.num_heads * c.head_dim)
        return dense(c.hidden_size, name="o_proj")(out)


class _MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(
            nn.Dense,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range),
        )
        gate = dense(c.intermediate_size, name="gate_proj")(x)
        up = dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(nn.silu(gate) * up)


def _rms_norm(config: LlamaConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(
        epsilon=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name
    )


class _Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.config
        x = x + _Attention(c, name="attn")(_rms_norm(c, "input_norm")(x), mask, positions)
        x = x + _MLP(c, name="mlp")(_rms_norm(c, "post_attn_norm")(x))
        # (carry, per-step output): the signature nn.scan wants; unscanned callers take [0].
        return x, None


class _Layers(nn.Module):
    """Unscanned layers, named "0", "1", ... so their paths read ``layers/3/...``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, positions):
        block = nn.remat(_Block) if self.config.remat else _Block
        for i in range(self.config.num_layers):
            x, _ = block(self.config, name=str(i))(x, mask, positions)
        return x


class Llama(nn.Module):
    """The decoder; returns logits ``(batch, seq, vocab)``. Prefer :func:`apply`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None):
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
            name="embed",
        )
        seq = input_ids.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), input_ids.shape)
        mask = attention_mask_4d(attention_mask, seq, causal=True)
        x = embed(input_ids)
        if c.scan_layers:
            # prevent_cse=False is safe (and faster) inside scan, as the linen docs advise.
            block = nn.remat(_Block, prevent_cse=False) if c.remat else _Block
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=c.num_layers,
            )
            x, _ = layers(c, name="layers")(x, mask, positions)
        else:
            x = _Layers(c, name="layers")(x, mask, positions)
        x = _rms_norm(c, "final_norm")(x)
        if c.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(
            c.vocab_size,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range),
            name="lm_head",
        )(x)


def init_params(key: jax.Array, config: LlamaConfig) -> dict[str, Any]:
    """Initialises a parameter tree (normal(0.02) kernels, unit norm scales).

    Args:
      key: a PRNG key.
      config: the model configuration.

    Returns:
      The ``params`` pytree (a nested dict); shapes alone are available cheaply with
      ``jax.eval_shape(functools.partial(init_params, config=config), key)``.

    Examples:
      >>> import jax
      >>> c = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2,
      ...                 num_heads=2, num_kv_heads=1)
      >>> p = init_params(jax.random.key(0), c)
      >>> p["layers"]["1"]["attn"]["k_proj"]["kernel"].shape
      (8, 4)
      >>> import dataclasses
      >>> s = init_params(jax.random.key(0), dataclasses.replace(c, scan_layers=True))
      >>> s["layers"]["attn"]["q_proj"]["kernel"].shape
      (2, 8, 8)
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    return Llama(config).init(key, ids)["params"]


def apply(
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: LlamaConfig,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Runs the decoder.

    Args:
      params: the parameter tree (from :func:`init_params` or a loader).
      input_ids: ``(batch, seq)`` integer token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding; None means no
        padding. Padded keys are never attended to.
      config: the model configuration.
      positions: ``(batch, seq)`` RoPE positions; defaults to ``0..seq-1`` (right padding).
        With left padding pass ``cumsum(attention_mask) - 1``.

    Returns:
      Logits ``(batch, seq, vocab)``; position ``t`` predicts token ``t + 1``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=1,
      ...                 num_heads=2, num_kv_heads=2, tie_embeddings=True)
      >>> p = init_params(jax.random.key(0), c)
      >>> apply(p, jnp.array([[1, 2, 3]]), config=c).shape
      (1, 3, 11)
    """
    return Llama(config).apply({"params": params}, input_ids, attention_mask, positions)


def causal_lm_loss(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy (nats per predicted token).

    Args:
      logits: ``(batch, seq, vocab)`` from :func:`apply`.
      input_ids: ``(batch, seq)`` the same ids that produced the logits.
      loss_mask: ``(batch, seq)``, 1 where a token should be predicted (its own position,
        not the position that predicts it); None predicts every token after the first.

    Returns:
      A scalar: the mean of ``-log p(input_ids[:, t] | input_ids[:, :t])`` over the
      masked positions ``t >= 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
      >>> round(float(causal_lm_loss(logits, jnp.array([[0, 1, 2]]))), 4)  # log 4
      1.3863
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = jnp.ones_like(nll) if loss_mask is None else loss_mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(jax.jit, static_argnames=("config", "prompt_len", "eos_id"))
def _greedy(params, buffer, *, config, prompt_len, eos_id):
    # Full recompute over a fixed-size buffer: one compilation for the whole loop, and the
    # causal mask keeps the not-yet-written tail of the buffer from influencing step t.
    def step(t, state):
        buffer, done = state
        logits = apply(params, buffer, config=config)
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False), axis=-1)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), t, 1), done

    done = jnp.zeros(buffer.shape[0], bool)
    buffer, _ = jax.lax.fori_loop(prompt_len, buffer.shape[1], step, (buffer, done))
    return buffer


def generate(
    params: Mapping[str, Any],
    config: LlamaConfig,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> np.ndarray:
    """Greedy decoding.

    Each step recomputes the whole (fixed-size) sequence instead of keeping a KV cache:
    quadratic in length, but a single compiled loop and exactly :func:`apply`'s numerics,
    which is what tests and short samples need.

    Args:
      params: the parameter tree.
      config: the model configuration.
      prompt_ids: ``(prompt_len,)`` or ``(batch, prompt_len)`` token ids (equal lengths).
      max_new_tokens: how many tokens to append.
      eos_id: once a sequence emits it, the rest of that sequence is filled with it.

    Returns:
      ``(batch, prompt_len + max_new_tokens)`` int32 ids (``(prompt_len + max_new_tokens,)``
      for a 1-D prompt), prompt included.

    Examples:
      >>> import jax
      >>> c = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=1,
      ...                 num_heads=2, num_kv_heads=1)
      >>> out = generate(init_params(jax.random.key(0), c), c, [1, 2], 3)
      >>> out.shape, out[:2].tolist()
      ((5,), [1, 2])
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    squeeze = prompt.ndim == 1
    prompt = np.atleast_2d(prompt)
    if prompt.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt")
    buffer = np.zeros((prompt.shape[0], prompt.shape[1] + max_new_tokens), np.int32)
    buffer[:, : prompt.shape[1]] = prompt
    out = np.asarray(
        _greedy(params, buffer, config=config, prompt_len=prompt.shape[1], eos_id=eos_id)
    )
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- sharding

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel"
_ROW = r"(o_proj|down_proj)/kernel"

PARTITION_PRESETS: dict[str, tuple[tuple[str, P], ...]] = {
    # Everything replicated: pure data parallelism over the batch axes.
    "dp": ((r".*", P()),),
    # ZeRO-3 style: every matrix split over `fsdp` on its model-width (d) axis, gathered
    # where used. Column-parallel kernels (d, n) split d_in, row-parallel ones (n, d) d_out,
    # so for both the adapter factor on the d side is split too and the rank side small.
    "fsdp": (
        (rf"(.*/)?{_COLUMN}", P("fsdp", None)),
        (rf"(.*/)?{_ROW}", P(None, "fsdp")),
        (r"embed/embedding", P(None, "fsdp")),
        (r"lm_head/kernel", P("fsdp", None)),
        (r".*", P()),
    ),
    # Megatron tensor parallelism: column-parallel kernels split their outputs (so heads
    # and MLP units are split), row-parallel ones their inputs; the vocabulary is split too.
    "tp": (
        (rf"(.*/)?{_COLUMN}", P(None, "tensor")),
        (rf"(.*/)?{_ROW}", P("tensor", None)),
        (r"embed/embedding", P("tensor", None)),
        (r"lm_head/kernel", P(None, "tensor")),
        (r".*", P()),
    ),
    # Both: FSDP on the model-width axis, tensor parallelism on the other one.
    "fsdp_tp": (
        (rf"(.*/)?{_COLUMN}", P("fsdp", "tensor")),
        (rf"(.*/)?{_ROW}", P("tensor", "fsdp")),
        (r"embed/embedding", P("tensor", "fsdp")),
        (r"lm_head/kernel", P("fsdp", "tensor")),
        (r".*", P()),
    ),
}


def partition_rules(preset: str = "fsdp") -> tuple[tuple[str, P], ...]:
    """Partition rules (for :func:`jaxlora.sharding.param_specs`) of these parameters,
    scanned or not.

    Args:
      preset: ``"dp"`` (replicated), ``"fsdp"`` (every matrix split over ``fsdp`` on its
        model-width axis), ``"tp"`` (Megatron column/row tensor parallelism over
        ``tensor``) or ``"fsdp_tp"`` (both).

    Returns:
      The rules, ending with ``(".*", P())`` (norm scales are replicated).

    Raises:
      ValueError: For an unknown preset.

    Examples:
      >>> dict(partition_rules("fsdp_tp"))[r"lm_head/kernel"]
      P('fsdp', 'tensor')
    """
    if preset not in PARTITION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PARTITION_PRESETS)}")
    return PARTITION_PRESETS[preset]
