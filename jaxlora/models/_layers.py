"""Pieces shared by the Llama and BERT models: masks, rotary embeddings, attention.

Both models route attention through :func:`attention`, a thin wrapper over
``jax.nn.dot_product_attention``, so grouped-query attention, masking and the choice of
kernel (XLA on CPU, cuDNN where available) live in one place. Masks are boolean and
broadcast to ``(batch, heads, queries, keys)``; a query row that sees no key (a padding
query) gets a uniform softmax rather than NaNs, and its output is ignored downstream.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def attention_mask_4d(
    attention_mask: jax.Array | None, num_queries: int, *, causal: bool
) -> jax.Array | None:
    """Builds the boolean mask ``jax.nn.dot_product_attention`` expects.

    Args:
      attention_mask: ``(batch, keys)`` with 1 for real tokens and 0 for padding, or None
        when no position is padded.
      num_queries: number of query positions; keys are assumed to be the same positions.
      causal: whether query ``t`` may only see keys ``<= t``.

    Returns:
      A boolean array broadcastable to ``(batch, 1, queries, keys)``, or None when nothing is
      masked.

    Examples:
      >>> import jax.numpy as jnp
      >>> m = attention_mask_4d(jnp.array([[1, 1, 0]]), 3, causal=True)
      >>> m.shape
      (1, 1, 3, 3)
      >>> m[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    """
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((num_queries, num_queries), dtype=bool))[None, None]
    if attention_mask is not None:
        keys = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def rotary_embedding(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
    """Applies rotary position embeddings in the "rotate half" layout of Hugging Face Llama.

    Feature ``j`` of the first half is rotated together with feature ``j`` of the second
    half by angle ``position * theta**(-2j/head_dim)``. (llama.cpp interleaves the pairs
    instead, which is why its q/k projection rows are permuted; see ``loaders``.)

    Args:
      x: ``(batch, seq, heads, head_dim)`` queries or keys; ``head_dim`` must be even.
      positions: ``(batch, seq)`` integer positions.
      theta: the RoPE base frequency (``rope_theta``).

    Returns:
      An array like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 2, 1, 4))
      >>> y = rotary_embedding(x, jnp.array([[0, 1]]), theta=10000.0)
      >>> bool(jnp.allclose(y[0, 0], x[0, 0]))  # position 0 is not rotated
      True
      >>> bool(jnp.allclose(jnp.linalg.norm(y[0, 1]), jnp.linalg.norm(x[0, 1])))
      True
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    # Angles in float32 whatever the activation dtype: bf16 positions lose integers > 256.
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query support.

    Args:
      query: ``(batch, queries, heads, head_dim)``.
      key: ``(batch, keys, kv_heads, head_dim)``; ``heads`` must be a multiple of
        ``kv_heads`` (each key/value head serves ``heads // kv_heads`` query heads).
      value: like ``key``.
      mask: boolean, broadcastable to ``(batch, heads, queries, keys)``, or None.
      dropout: Applied to the attention probabilities (training); None keeps the fused
        ``jax.nn.dot_product_attention`` path.

    Returns:
      ``(batch, queries, heads, head_dim)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> q = jnp.ones((1, 3, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
      >>> attention(q, kv, kv, None).shape
      (1, 3, 4, 8)
    """
    if dropout is None:
        return jax.nn.dot_product_attention(query, key, value, mask=mask)
    # the probabilities must exist as an array to be dropped, as in the reference models
    b, t, h, d = query.shape
    kv = key.shape[2]
    q = query.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, key) / jnp.sqrt(jnp.asarray(d, query.dtype))
    logits = logits.reshape(b, h, t, -1)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = dropout(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(query.dtype))
    probs = probs.reshape(b, kv, h // kv, t, -1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(b, t, h, d)
