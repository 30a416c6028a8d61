"""Methods by name, for experiments that pick them from a config string.

A fine-tuning method is two things: the adapters it adds (a :class:`jaxlora.Method`) and how
they are optimised (LoRA+ is plain LoRA adapters with a per-matrix learning rate,
Delta-LoRA is LoRA adapters with an optimizer that also moves the base kernels). A
:class:`MethodSpec` bundles both behind one interface, so an experiment loop is the same
for every name in :data:`NAMES`::

    spec = jl.method("delta_lora", rank=8, lam=0.5, start_step=100)
    params, adapters = spec.prepare(key, params)       # PiSSA replaces the base here
    tx = spec.optimizer(optax.adamw, learning_rate=1e-4)
    opt_state = spec.init_optimizer(tx, params, adapters)
    step = spec.train_step(loss_fn, tx)
    params, adapters, opt_state, metrics = step(params, adapters, opt_state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from jaxlora._validate import finite
from jaxlora.adapters import Method, unmerge
from jaxlora.delta_lora import check_hyperparameters, delta_lora
from jaxlora.dora import dora
from jaxlora.lora import lora
from jaxlora.lora_fa import lora_fa
from jaxlora.lora_plus import lora_plus
from jaxlora.optim import optimizer as plain_optimizer
from jaxlora.train import train_step as make_train_step
from jaxlora.vera import vera

__all__ = ["NAMES", "MethodSpec", "method"]

OptimizerFn = Callable[..., optax.GradientTransformation]


def _plain(make: OptimizerFn, *, learning_rate: Any, **kwargs: Any):
    return plain_optimizer(make(learning_rate=learning_rate, **kwargs))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method picked by name: its adapters, its optimizer and its train step."""

    name: str
    """The registry name (a member of :data:`NAMES`)."""
    adapters: Method
    """Builds the adapters tree: ``adapters.init(key, params)``."""
    build_optimizer: Callable[..., optax.GradientTransformation]
    """``build_optimizer(make, learning_rate=..., **kw)``; see :meth:`optimizer`."""
    update_params: bool = False
    """Whether the optimizer also moves the base params (Delta-LoRA)."""
    replaces_base: bool = False
    """Whether the base must be replaced by a residual after ``init`` (PiSSA)."""

    def init(self, key: Any, params: Any) -> dict[str, Any]:
        """The adapters tree (for PiSSA use :meth:`prepare`, which also returns the base)."""
        return self.adapters.init(key, params)

    def prepare(self, key: Any, params: Any) -> tuple[Any, dict[str, Any]]:
        """``(base_params, adapters)`` to train with: the residual base for PiSSA."""
        adapters = self.adapters.init(key, params)
        return (unmerge(params, adapters) if self.replaces_base else params), adapters

    def optimizer(
        self, make: OptimizerFn = optax.adamw, *, learning_rate: Any, **kwargs: Any
    ) -> optax.GradientTransformation:
        """The method's optimizer around ``make`` (an optax constructor) and its arguments."""
        return self.build_optimizer(make, learning_rate=learning_rate, **kwargs)

    def init_optimizer(self, tx: optax.GradientTransformation, params: Any, adapters: Any):
        """``tx.init`` with the tree the method's optimizer updates."""
        return tx.init((params, adapters) if self.update_params else adapters)

    def train_step(self, loss_fn: Callable[..., Any], tx: optax.GradientTransformation, **kw):
        """``step(params, adapters, opt_state, batch) -> (params, adapters, opt_state, metrics)``.

        ``params`` come back unchanged (the same object, no copy) unless the method moves
        them. Keyword arguments go to :func:`jaxlora.train_step`.
        """
        step = make_train_step(loss_fn, tx, update_params=self.update_params, **kw)
        if self.update_params:
            return step

        def fixed_base_step(params, adapters, opt_state, batch):
            adapters, opt_state, metrics = step(params, adapters, opt_state, batch)
            return params, adapters, opt_state, metrics

        return fixed_base_step


def _lora_plus(*, ratio: float = 16.0, **kw: Any) -> MethodSpec:
    if not finite("lora_plus", "ratio", ratio) > 0:
        raise ValueError(f"lora_plus: ratio must be > 0, got ratio={ratio!r}")

    def build(make, *, learning_rate, **okw):
        return lora_plus(make, learning_rate=learning_rate, ratio=ratio, **okw)

    return MethodSpec("lora_plus", lora(**kw), build)


def _delta_lora(*, lam: float, start_step: int, scale_delta: bool = False, **kw) -> MethodSpec:
    check_hyperparameters(lam, start_step)  # at once, not when the optimizer is built

    def build(make, *, learning_rate, **okw):
        inner = _plain(make, learning_rate=learning_rate, **okw)
        return delta_lora(inner, lam=lam, start_step=start_step, scale_delta=scale_delta)

    delta_lora(optax.identity(), lam=lam, start_step=start_step)  # validate now, not later
    return MethodSpec("delta_lora", lora(**kw), build, update_params=True)


_REGISTRY: dict[str, Callable[..., MethodSpec]] = {
    "lora": lambda **kw: MethodSpec("lora", lora(**kw), _plain),
    "rslora": lambda **kw: MethodSpec("rslora", lora(rslora=True, **kw), _plain),
    "pissa": lambda **kw: MethodSpec("pissa", lora(init="pissa", **kw), _plain, replaces_base=True),
    "lora_fa": lambda **kw: MethodSpec("lora_fa", lora_fa(**kw), _plain),
    "vera": lambda **kw: MethodSpec("vera", vera(**kw), _plain),
    "dora": lambda **kw: MethodSpec("dora", dora(**kw), _plain),
    "lora_plus": _lora_plus,
    "delta_lora": _delta_lora,
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every name :func:`method` accepts."""


def method(name: str, **kwargs: Any) -> MethodSpec:
    """Looks up a method by name and configures it.

    Args:
      name: One of :data:`NAMES`: ``"lora"``, ``"rslora"``, ``"pissa"``, ``"lora_fa"``,
        ``"vera"``, ``"dora"``, ``"lora_plus"``, ``"delta_lora"``.
      **kwargs: The method's hyper-parameters: those of its adapter factory (``rank``,
        ``alpha``, ``targets``, ...), plus ``ratio`` for ``"lora_plus"`` and ``lam``,
        ``start_step``, ``scale_delta`` for ``"delta_lora"`` (which are
        :func:`jaxlora.lora` adapters with :func:`jaxlora.lora_plus` /
        :func:`jaxlora.delta_lora` optimizers).

    Returns:
      A :class:`MethodSpec`.

    Raises:
      ValueError: For an unknown name (the message lists :data:`NAMES`) or a bad value.
      TypeError: For an unknown or missing hyper-parameter.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.ones((8, 8))}}
      >>> spec = jl.method("lora_plus", rank=2, targets=".*kernel", ratio=4)
      >>> params, adapters = spec.prepare(jax.random.key(0), params)
      >>> tx = spec.optimizer(optax.sgd, learning_rate=0.1)
      >>> spec.name, jl.num_trainable(adapters)
      ('lora_plus', 32)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {list(NAMES)}")
    return _REGISTRY[name](**kwargs)
