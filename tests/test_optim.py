"""jl.optimizer: label trees, frozen arrays without state, per-label transforms."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora as jl
from jaxlora.adapters import Adapter, Factors, register_adapter

PARAMS = {
    "q": {"kernel": jnp.ones((16, 8))},
    "s": {"kernel": jnp.ones((2, 8, 4))},
}


@register_adapter
class _FrozenA(Adapter):
    """A test-only adapter with a frozen A, to exercise the "frozen" label mechanics."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b")
    LABELS: ClassVar[dict[str, str]] = {"a": "frozen", "b": "lora_b"}
    layout: Any
    a: Any
    b: Any

    def factors(self, w, shared):
        return Factors(self.a, self.b, 1.0)


def _frozen_a_adapters():
    ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    return jax.tree_util.tree_map(
        lambda n: _FrozenA(n.layout, n.a, n.b),
        ad,
        is_leaf=lambda x: isinstance(x, Adapter),
    )


def _state_bytes(state):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)


def test_adam_state_is_two_moments_of_trainable_arrays_only():
    ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    # r * (d_in + d_out) per kernel, stacked kernels counted per layer
    n = 2 * (16 + 8) + 2 * 2 * (8 + 4)
    assert jl.num_trainable(ad) == n
    assert _state_bytes(jl.optimizer(optax.adam(1e-3)).init(ad)) == 2 * 4 * n

    frozen = _frozen_a_adapters()
    n_b = 2 * 8 + 2 * 2 * 4
    assert jl.num_trainable(frozen) == n_b
    assert _state_bytes(jl.optimizer(optax.adam(1e-3)).init(frozen)) == 2 * 4 * n_b


def test_frozen_arrays_never_move_and_others_follow_the_transform():
    ad = _frozen_a_adapters()
    tx = jl.optimizer(optax.sgd(0.5))
    grads = jax.tree_util.tree_map(jnp.ones_like, ad)
    updates, _ = tx.update(grads, tx.init(ad), ad)
    node = updates["q"]["kernel"]
    assert not node.a.any()
    np.testing.assert_array_equal(node.b, -0.5 * np.ones((2, 8)))


def test_per_label_transforms():
    ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    tx = jl.optimizer({"lora_a": optax.sgd(1.0), "lora_b": optax.sgd(3.0)})
    grads = jax.tree_util.tree_map(jnp.ones_like, ad)
    updates, _ = tx.update(grads, tx.init(ad), ad)
    assert float(updates["q"]["kernel"].a[0, 0]) == -1.0
    assert float(updates["q"]["kernel"].b[0, 0]) == -3.0


def test_bad_label_mappings_are_clear_errors():
    ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match=r"labelled 'lora_b'.*only has \['lora_a'\]"):
        jl.optimizer({"lora_a": optax.sgd(1.0)}).init(ad)
    with pytest.raises(ValueError, match="'frozen' is reserved"):
        jl.optimizer({"frozen": optax.sgd(1.0)})


def test_labels_tree_matches_adapters_structure():
    ad = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), PARAMS)
    lab = jl.labels(ad)
    assert jax.tree_util.tree_structure(lab) == jax.tree_util.tree_structure(ad)
    assert jax.tree_util.tree_leaves(lab) == ["lora_a", "lora_b"] * 2
