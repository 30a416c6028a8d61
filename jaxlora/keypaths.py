"""Key paths: the one way jaxlora names a leaf of a pytree.

A leaf's name is its JAX key path with every entry turned into a string (dict keys, attribute
names, sequence indices) and joined with ``"/"``: ``"layers/0/attn/q_proj/kernel"``. Targets
match against it, adapters trees are nested by it, sharding rules and checkpoint files are
keyed by it. The one variation is NNX's ``Variable`` box: a trailing attribute named
``value`` is dropped for *parameter* names (``kernel.value`` is the parameter ``kernel``),
but kept where the exact tree must round-trip (checkpoint files), hence ``unbox``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

__all__ = ["flatten", "lookup", "nest", "path_str", "path_tuple"]


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_tuple(keypath: Sequence[Any], *, unbox: bool = True) -> tuple[str, ...]:
    """The entries of a JAX key path as strings (see the module docstring for ``unbox``).

    Examples:
      >>> import jax
      >>> kp = jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0][1][0]
      >>> path_tuple(kp)
      ('a', '1')
    """
    parts = tuple(_key_name(k) for k in keypath)
    boxed = keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value"
    return parts[:-1] if unbox and boxed else parts


def path_str(keypath: Sequence[Any]) -> str:
    """Joins a JAX key path into the ``"/"``-separated string that targets match against.

    A trailing attribute named ``value`` is dropped: it is the box of an NNX ``Variable``
    (``kernel.value``), not part of the parameter's name.

    Args:
      keypath: A key path as produced by ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The path as a string.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> tree = {"layers": [{"kernel": jnp.zeros((2, 2))}]}
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['layers/0/kernel']
    """
    return "/".join(path_tuple(keypath))


def flatten(tree: Any, *, is_leaf: Any = None) -> dict[str, Any]:
    """The leaves of ``tree`` keyed by their :func:`path_str`, in flattening order.

    Examples:
      >>> flatten({"a": {"b": 1}, "c": 2})
      {'a/b': 1, 'c': 2}
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(kp): x for kp, x in flat}


def nest(flat: Mapping[str | tuple[str, ...], Any]) -> dict[str, Any]:
    """Turns ``{"a/b/c": x}`` (or ``{("a", "b", "c"): x}``) into ``{"a": {"b": {"c": x}}}``.

    Examples:
      >>> nest({"a/b": 1, "a/c": 2})
      {'a': {'b': 1, 'c': 2}}
    """
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *head, last = path.split("/") if isinstance(path, str) else path
        d = out
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    return out


def lookup(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    """``tree[path[0]][path[1]]...``.

    Examples:
      >>> lookup({"a": {"b": 1}}, ("a", "b"))
      1
    """
    for k in path:
        tree = tree[k]
    return tree
