"""A BERT encoder in Flax linen, sized for sentence-transformers' all-MiniLM-L6-v2.

Post-LayerNorm layers with exact (erf) GELU, absolute position and token-type embeddings,
exactly as Hugging Face ``BertModel``. Parameter paths are readable
(``layers/2/attn/query/kernel``) and every projection is a plain ``x @ kernel + bias`` with a
2-D ``(d_in, d_out)`` kernel, so ``jaxlora.adapt`` intercepts it. Sentence embeddings are the
mean of the last hidden states over real tokens, L2-normalised (:func:`sentence_embedding`),
which is how all-MiniLM-L6-v2 was trained. The ``[CLS]`` pooler is optional
(``BertConfig.pooler``) because mean-pooled models never use it. Dropout is ``BertModel``'s
(hidden states and attention probabilities, 0.1 each by default) and runs only when
:func:`apply` is given a ``dropout_rng`` (training); without one the model is exactly the
deterministic one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models._layers import attention, attention_mask_4d, gelu, layer_norm

_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static configuration of a BERT encoder (hashable, so usable as a jit static)."""

    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width ``d`` of the hidden states."""
    num_layers: int
    """Number of encoder layers."""
    num_heads: int
    """Number of attention heads; ``hidden_size`` must be divisible by it."""
    intermediate_size: int
    """Width of the feed-forward layer."""
    max_position_embeddings: int = 512
    """Number of learned absolute positions (the longest input)."""
    type_vocab_size: int = 2
    """Number of token types (segments)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    hidden_act: str = "gelu"
    """Feed-forward activation: "gelu" (exact), "gelu_new"/"gelu_pytorch_tanh" or "relu"."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialiser of kernels and embeddings."""
    pooler: bool = False
    """Whether the tree has the tanh ``[CLS]`` pooler (``pooler/{kernel,bias}``)."""
    hidden_dropout: float = 0.1
    """Dropout on the embeddings and on each sub-layer's output (``hidden_dropout_prob``)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (``attention_probs_dropout_prob``)."""
    dtype: str = "float32"
    """Activation dtype."""
    param_dtype: str = "float32"
    """Dtype of freshly initialised parameters."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; expected one of {list(_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dictionary.

        Args:
          config: the parsed ``config.json`` of a ``BertModel`` checkpoint.
          **overrides: fields to set on top, e.g. ``pooler=True``.

        Returns:
          The config.

        Raises:
          ValueError: for relative position embeddings, which are not implemented.

        Examples:
          >>> c = BertConfig.from_hf_config({"vocab_size": 30, "hidden_size": 8,
          ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16})
          >>> c.layer_norm_eps, c.pooler
          (1e-12, False)
        """
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"unsupported position_embedding_type {position_type!r}")
        fields = dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=config.get("hidden_act", "gelu"),
            initializer_range=float(config.get("initializer_range", 0.02)),
            hidden_dropout=float(config.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", 0.1)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``BertConfig`` keyword arguments describing this model.

        Returns:
          A dict for ``transformers.BertConfig(**d)`` (or a ``config.json``).

        Examples:
          >>> c = BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2,
          ...                intermediate_size=16)
          >>> BertConfig.from_hf_config(c.to_hf_config()) == c
          True
        """
        return {
            "model_type": "bert",
            "architectures": ["BertModel"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "position_embedding_type": "absolute",
        }


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def _dropout(rate: float, train: bool) -> Callable[[jax.Array], jax.Array]:
    # nn.Dropout returns its input itself when deterministic or at rate 0: evaluation is
    # bit for bit the model without dropout
    return functools.partial(nn.Dropout(rate), deterministic=not train)


class _LayerNorm(nn.Module):
    """LayerNorm with ``scale``/``bias`` parameters, as ``nn.LayerNorm``, computed by
    :func:`jaxlora.models._layers.layer_norm` (two-pass variance: with eps=1e-12 the fast
    E[x^2]-E[x]^2 form costs parity; a backward that keeps only the input)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), c.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), c.param_dtype)
        return layer_norm(x.astype(c.dtype), scale, bias, c.layer_norm_eps)


def _layer_norm(config: BertConfig, name: str) -> _LayerNorm:
    return _LayerNorm(config, name=name)


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, train):
        c = self.config
        embed = functools.partial(
            nn.Embed,
            features=c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(c.vocab_size, name="word")(input_ids)
            + embed(c.max_position_embeddings, name="position")(positions)
            + embed(c.type_vocab_size, name="token_type")(token_type_ids)
        )
        return _dropout(c.hidden_dropout, train)(_layer_norm(c, "norm")(x))


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, train):
        c = self.config
        batch, seq, _ = x.shape
        heads = (batch, seq, c.num_heads, c.hidden_size // c.num_heads)
        q = _dense(c, c.hidden_size, "query")(x).reshape(heads)
        k = _dense(c, c.hidden_size, "key")(x).reshape(heads)
        v = _dense(c, c.hidden_size, "value")(x).reshape(heads)
        drop = _dropout(c.attention_dropout, train) if train and c.attention_dropout else None
        out = attention(q, k, v, mask, drop).reshape(batch, seq, c.hidden_size)
        return _dropout(c.hidden_dropout, train)(_dense(c, c.hidden_size, "output")(out))


class _MLP(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, train):
        c = self.config
        h = _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "intermediate")(x))
        return _dropout(c.hidden_dropout, train)(_dense(c, c.hidden_size, "output")(h))


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, train):
        c = self.config
        x = _layer_norm(c, "attn_norm")(x + _Attention(c, name="attn")(x, mask, train))
        return _layer_norm(c, "mlp_norm")(x + _MLP(c, name="mlp")(x, train))


class _Layers(nn.Module):
    """Layers named "0", "1", ... so their paths read ``layers/3/...``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, train):
        for i in range(self.config.num_layers):
            x = _Layer(self.config, name=str(i))(x, mask, train)
        return x


class Bert(nn.Module):
    """The encoder; returns ``(hidden_states, pooled or None)``. Prefer :func:`apply`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train=False):
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids, train)
        x = _Layers(c, name="layers")(
            x, attention_mask_4d(attention_mask, x.shape[1], causal=False), train
        )
        pooled = None
        if c.pooler:
            pooled = jnp.tanh(_dense(c, c.hidden_size, "pooler")(x[:, 0]))
        return x, pooled


def init_params(key: jax.Array, config: BertConfig) -> dict[str, Any]:
    """Initialises a parameter tree (normal(0.02) kernels and embeddings, zero biases).

    Args:
      key: a PRNG key.
      config: the model configuration.

    Returns:
      The ``params`` pytree (a nested dict).

    Examples:
      >>> import jax
      >>> c = BertConfig(vocab_size=30, hidden_size=8, num_layers=2, num_heads=2,
      ...                intermediate_size=16)
      >>> p = init_params(jax.random.key(0), c)
      >>> p["layers"]["1"]["mlp"]["intermediate"]["kernel"].shape
      (8, 16)
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    return Bert(config).init(key, ids)["params"]


def apply(
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: BertConfig,
    token_type_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Runs the encoder.

    Args:
      params: the parameter tree (from :func:`init_params` or a loader).
      input_ids: ``(batch, seq)`` token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding; None: no padding.
      config: the model configuration.
      token_type_ids: ``(batch, seq)`` segment ids; zeros by default.
      dropout_rng: A PRNG key: run in training mode, with the config's dropout drawn from
        it. None (the default) is evaluation: no dropout at all.

    Returns:
      The last hidden states ``(batch, seq, hidden_size)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2,
      ...                intermediate_size=16)
      >>> p = init_params(jax.random.key(0), c)
      >>> apply(p, jnp.array([[2, 5, 0]]), jnp.array([[1, 1, 0]]), config=c).shape
      (1, 3, 8)
    """
    train = dropout_rng is not None
    rngs = {"dropout": dropout_rng} if train else None
    hidden, _ = Bert(config).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids, train, rngs=rngs
    )
    return hidden


def pooled_output(
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: BertConfig,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """The tanh ``[CLS]`` pooler output, as ``BertModel``'s ``pooler_output``.

    Args:
      params: the parameter tree; must contain ``pooler``.
      input_ids: ``(batch, seq)`` token ids.
      attention_mask: ``(batch, seq)`` or None.
      config: the model configuration, with ``pooler=True``.
      token_type_ids: ``(batch, seq)`` or None.

    Returns:
      ``(batch, hidden_size)``.

    Raises:
      ValueError: if ``config.pooler`` is False.
    """
    if not config.pooler:
        raise ValueError("pooled_output needs a config with pooler=True")
    _, pooled = Bert(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)
    return pooled


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Averages hidden states over the real (unmasked) tokens.

    Args:
      hidden: ``(batch, seq, d)``.
      attention_mask: ``(batch, seq)`` with 1 for real tokens, or None for no padding.

    Returns:
      ``(batch, d)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[[1.0], [3.0], [100.0]]])
      >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
      [[2.0]]
    """
    if attention_mask is None:
        return jnp.mean(hidden, axis=1)
    weights = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    # The floor on the count matches sentence-transformers (an all-padding row gives 0).
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def sentence_embedding(
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: BertConfig,
    normalize: bool = True,
) -> jax.Array:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

    Args:
      params: the parameter tree.
      input_ids: ``(batch, seq)`` token ids.
      attention_mask: ``(batch, seq)`` or None.
      config: the model configuration.
      normalize: L2-normalise each embedding (cosine similarity is then a dot product).

    Returns:
      ``(batch, hidden_size)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2,
      ...                intermediate_size=16)
      >>> e = sentence_embedding(init_params(jax.random.key(0), c), jnp.array([[2, 3]]), config=c)
      >>> round(float(jnp.linalg.norm(e[0])), 5)
      1.0
    """
    emb = mean_pool(apply(params, input_ids, attention_mask, config=config), attention_mask)
    if normalize:
        # sentence-transformers' Normalize layer: x / max(||x||, 1e-12).
        emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb
