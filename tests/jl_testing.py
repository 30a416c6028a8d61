"""Shared helpers for the test-suite (imported by test modules, not collected)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora as jl
from jaxlora.adapters import FROZEN


def randomize(adapters, key, scale=0.1):
    """Replaces every trainable adapter array by random values (B=0 would hide bugs)."""
    lab = jax.tree_util.tree_leaves(jl.labels(adapters))
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    out = [
        x if lb == FROZEN else scale * jax.random.normal(k, x.shape, x.dtype)
        for x, lb, k in zip(leaves, lab, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def check_against_merged(fn, params, adapters, *args, atol=1e-5, rtol=1e-5, strict=True):
    """Asserts adapt(fn) == fn(merge(...)) in value and adapter gradient; returns report."""
    adapted = jl.adapt(fn, strict=strict)

    def ref(p, a, *xs):
        return fn(jl.merge(p, a), *xs)

    def scalar(f):
        return lambda p, a, *xs: sum(
            jnp.sum(jnp.asarray(y, jnp.float32)) for y in jax.tree_util.tree_leaves(f(p, a, *xs))
        )

    out = jax.jit(adapted)(params, adapters, *args)
    expect = jax.jit(ref)(params, adapters, *args)
    for o, e in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(
            np.asarray(o, np.float32), np.asarray(e, np.float32), atol=atol, rtol=rtol
        )
    g = jax.jit(jax.grad(scalar(adapted), argnums=1))(params, adapters, *args)
    ge = jax.jit(jax.grad(scalar(ref), argnums=1))(params, adapters, *args)
    for o, e in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ge)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(e), atol=atol, rtol=rtol)
    return jl.adapt_report(fn, params, adapters, *args)


SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"


def load_script(name: str):
    """Imports ``scripts/<name>.py`` as a module (scripts import each other by name)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)
