"""A jitted train step that differentiates the adapters only.

``train_step(loss_fn, tx)`` builds ``step(params, adapters, opt_state, batch)`` where
``loss_fn(params, batch)`` is written for ordinary (merged) parameters. The step runs it
through :func:`jaxlora.adapt`, takes the gradient with respect to the *trainable* adapter
arrays only (frozen ones are closed over, so their gradients are never computed), applies
``tx`` and donates the buffers. ``params`` is a frozen input: it gets no gradient and no
optimizer state.

Every method has the same step, ``(params, adapters, opt_state, batch) -> (params, adapters,
opt_state, metrics)``. The params come back as :func:`jaxlora.optim.move_base` leaves them:
moved by an optimizer that moves the base (Delta-LoRA), unchanged otherwise. They are
donated, so an unchanged leaf is the same buffer going out as coming in (XLA aliases the
output to the donated input: no copy), and the caller simply rebinds them.

Every step reports ``metrics["finite"]``, computed on the device: whether the loss, every
gradient (through their norm) and every adapter update are finite. It costs one boolean
reduction per updated array, fused by XLA into the update itself, and lets a training loop
stop before it checkpoints NaNs. ``skip_nonfinite=True`` makes a non-finite step a no-op.

Dropout needs a PRNG key per step: ``train_step(..., with_rng=True)`` builds
``step(params, adapters, opt_state, batch, key)`` and calls ``loss_fn(params, batch,
model_key)`` for the model's own dropout, while the low-rank dropout of adapters made with
``dropout > 0`` (PEFT's ``lora_dropout``) draws from ``lora_key``, where ``model_key,
lora_key = dropout_keys(key)`` (a split: the two streams are independent). A step built
without ``with_rng`` refuses adapters with ``dropout > 0`` rather than silently training
them without it.

The jitted step is an ordinary ``jax.jit`` function, so ``step.lower(...)``, ``.compile()``
and ``cost_analysis()`` work on it: time the compile, read the flops or the memory
(:mod:`jaxlora.profiling`) before training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.adapt import adapt
from jaxlora.adapters import FROZEN, adapter_nodes, labels
from jaxlora.optim import move_base

__all__ = ["dropout_keys", "train_step", "trainable"]


def split_trainable(tree: Any, adapters: Any) -> tuple[Any, Any]:
    """Splits ``tree`` (structured like ``adapters``) into (trainable, frozen) parts.

    Each part has ``None`` where the other holds an array; :func:`join_trainable` inverts it.
    """
    lab = labels(adapters)
    trainable = jax.tree_util.tree_map(lambda x, lb: None if lb == FROZEN else x, tree, lab)
    frozen = jax.tree_util.tree_map(lambda x, lb: x if lb == FROZEN else None, tree, lab)
    return trainable, frozen


def join_trainable(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_trainable`."""
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def trainable(adapters: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The trainable view of an adapters tree: what to differentiate, and how to put it back.

    ``jax.grad`` takes real-valued inputs only, and an adapters tree may also hold frozen
    state that is not: VeRA's shared PRNG key is ``uint32`` key data (an array leaf, so that
    a checkpoint can store the key instead of the random matrices, and ``init`` stays
    jittable), so ``jax.grad(loss)(adapters)`` on a VeRA tree fails with JAX's
    ``grad requires real- or complex-valued inputs``. Differentiate the trainable view
    instead: it holds the trainable arrays with ``None`` at every frozen one (so their
    gradients are not even computed), and ``rebuild`` puts the frozen arrays back.
    (``jax.grad(..., allow_int=True)`` over the whole tree also works, and computes
    gradients for the frozen float arrays too.)

    Args:
      adapters: An adapters tree from a method's ``init``.

    Returns:
      ``(view, rebuild)``: the tree with ``None`` at frozen arrays, and
      ``rebuild(view_like) -> adapters`` for any tree shaped like ``view`` (e.g. its
      gradient, or an updated copy).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlora as jl
      >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
      >>> adapters = jl.vera(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> loss = lambda ad: jl.adapt(lambda p: jnp.sum(jnp.ones((1, 4)) @ p["w"]["kernel"]))(
      ...     params, ad)
      >>> view, rebuild = jl.trainable(adapters)
      >>> grads = jax.grad(lambda v: loss(rebuild(v)))(view)
      >>> [x.shape for x in jax.tree_util.tree_leaves(grads)]  # d (r,) and b (d_out,)
      [(2,), (3,)]
    """
    view, frozen = split_trainable(adapters, adapters)
    return view, lambda v: join_trainable(v, frozen)


def dropout_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(model_key, lora_key)``: how a ``with_rng`` train step splits its step key.

    ``model_key`` is what ``loss_fn(params, batch, model_key)`` gets for the model's own
    dropout; ``lora_key`` is the ``dropout_rng`` given to :func:`jaxlora.adapt` for the
    low-rank dropout. Use it to reproduce a step's masks outside the step.

    Examples:
      >>> import jax
      >>> model_key, lora_key = dropout_keys(jax.random.key(0))
    """
    model_key, lora_key = jax.random.split(key)
    return model_key, lora_key


def dropout_rates(adapters: Any) -> dict[str, float]:
    """The low-rank dropout rate of every adapted kernel with ``dropout > 0``, by path."""
    rates = {p: float(getattr(n, "dropout", 0.0)) for p, n in adapter_nodes(adapters).items()}
    return {p: r for p, r in rates.items() if r}


def _check_no_dropout(adapters: Any) -> None:
    rates = dropout_rates(adapters)
    if rates:
        shown = ", ".join(f"{p!r}: {r}" for p, r in sorted(rates.items())[:4])
        more = f" and {len(rates) - 4} more" if len(rates) > 4 else ""
        raise ValueError(
            f"train_step: the adapters have low-rank dropout ({shown}{more}), which needs a "
            "PRNG key per step; build the step with jl.train_step(..., with_rng=True) and "
            "call step(params, adapters, opt_state, batch, key) (or make the adapters with "
            "dropout=0)"
        )


def _all_finite(loss: Any, grad_norm: Any, updates: Any) -> jax.Array:
    # a NaN or inf in any gradient makes their norm non-finite, so the gradients need no
    # pass of their own; the updates do (a finite gradient can still give a NaN update).
    # A moved base (Delta-LoRA) is a function of finite adapters, so it is not re-checked:
    # that would be a pass over every targeted kernel.
    flags = [jnp.isfinite(loss), jnp.isfinite(grad_norm)]
    flags += [jnp.all(jnp.isfinite(u)) for u in jax.tree_util.tree_leaves(updates)]
    return jnp.all(jnp.stack(flags))


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    # an unchanged leaf (the same object) needs no select
    return jax.tree_util.tree_map(lambda n, o: n if n is o else jnp.where(ok, n, o), new, old)


def train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    strict: bool = False,
    donate: bool = True,
    jit: bool = True,
    skip_nonfinite: bool = False,
    with_rng: bool = False,
) -> Callable[..., tuple[Any, Any, Any, dict[str, Any]]]:
    """Builds ``step(params, adapters, opt_state, batch) -> (params, adapters, opt_state,
    metrics)``, the one train step of every method.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux_dict)`` with
        ``has_aux``), written for plain parameters; ``loss_fn(params, batch, key)`` with
        ``with_rng``.
      tx: The optimizer over the adapters, usually ``jaxlora.optimizer(optax.adamw(...))``
        so that frozen arrays hold no state; ``opt_state = tx.init(adapters)``. One that
        also moves the base (:func:`jaxlora.delta_lora`) moves it here.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` (a dict) is merged into
        the metrics.
      strict: Passed to :func:`jaxlora.adapt`: raise rather than merge a kernel.
      donate: Donate the params, adapters and optimizer state buffers to the step (use the
        returned ones).
      jit: Return the step jitted (the default) or as a plain function to compose.
      skip_nonfinite: Where ``metrics["finite"]`` is false, return the step's inputs
        (params, adapters, optimizer state) unchanged, so a NaN step changes nothing.
      with_rng: Build ``step(params, adapters, opt_state, batch, key)`` for training with
        dropout: ``model_key, lora_key = jaxlora.train.dropout_keys(key)``; ``loss_fn``
        gets ``model_key`` (for the model's own dropout, e.g.
        ``bert.apply(..., dropout_rng=key)``) and the low-rank dropout of adapters made
        with ``dropout > 0`` draws from ``lora_key``. Pass a fresh key every step. With
        no adapter dropout the low-rank branch is exactly the one without a key.

    Returns:
      The step function, a ``jax.jit`` function (with ``jit``): ``step.lower(*args)``
      gives its lowered program, ``.compile()`` the executable with ``cost_analysis()``
      and ``memory_analysis()``. ``metrics`` holds ``loss``, ``grad_norm`` (of trainable
      arrays) and ``finite`` (a boolean: the loss, gradients and updates are all finite).

    Raises:
      ValueError: From the step, if it was built without ``with_rng`` and the adapters have
        low-rank dropout (the message names the kernels and rates).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxlora as jl
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)
      >>> adapters = jl.lora(rank=2, targets=".*kernel").init(jax.random.key(0), params)
      >>> tx = jl.optimizer(optax.sgd(0.1))
      >>> step = jl.train_step(loss_fn, tx)
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
      >>> params, adapters, opt_state, m0 = step(params, adapters, tx.init(adapters), batch)
      >>> params, adapters, opt_state, m1 = step(params, adapters, opt_state, batch)
      >>> float(m0["loss"]), bool(m1["loss"] < m0["loss"])  # B starts at 0: base loss first
      (1.0, True)

      With dropout: the step takes a key (here the model has no dropout of its own and
      ignores ``model_key``; the low-rank branch drops 10% of its input):

      >>> drop = jl.lora(rank=2, targets=".*kernel", dropout=0.1).init(jax.random.key(0), params)
      >>> step = jl.train_step(lambda p, b, key: loss_fn(p, b), tx, with_rng=True)
      >>> params, drop, opt_state, m = step(params, drop, tx.init(drop), batch,
      ...                                   jax.random.key(1))

      The compiled step can be inspected before it runs (``jaxlora.profiling`` reads it):

      >>> compiled = step.lower(params, drop, opt_state, batch, jax.random.key(2)).compile()
      >>> flops = compiled.cost_analysis()["flops"]
    """
    adapted = adapt(loss_fn, strict=strict)

    def run(params, adapters, opt_state, batch, key):
        if with_rng:
            model_key, lora_key = dropout_keys(key)
            # no adapter dropout: the low-rank branch is computed exactly as without a key
            extra = {"dropout_rng": lora_key} if dropout_rates(adapters) else {}
            args = (batch, model_key)
        else:
            _check_no_dropout(adapters)
            extra, args = {}, (batch,)
        trainable, frozen = split_trainable(adapters, adapters)

        def objective(tr):
            return adapted(params, join_trainable(tr, frozen), *args, **extra)

        if has_aux:
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        else:
            loss, grads = jax.value_and_grad(objective)(trainable)
            aux = {}
        # frozen arrays get zeros here only to satisfy optax's tree structure; set_to_zero
        # discards them and XLA removes the dead zeros
        full = join_trainable(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        updates, new_state = tx.update(full, opt_state, adapters)
        upd_tr, _ = split_trainable(updates, adapters)
        new = join_trainable(optax.apply_updates(trainable, upd_tr), frozen)
        moved = move_base(tx, params, adapters, new, opt_state)
        grad_norm = optax.tree.norm(grads)
        finite = _all_finite(loss, grad_norm, upd_tr)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux, "finite": finite}
        if skip_nonfinite:
            moved = _keep_if(finite, moved, params)
            new, new_state = _keep_if(finite, (new, new_state), (adapters, opt_state))
        return moved, new, new_state, metrics

    if with_rng:

        def step(params, adapters, opt_state, batch, key):
            return run(params, adapters, opt_state, batch, key)
    else:

        def step(params, adapters, opt_state, batch):
            return run(params, adapters, opt_state, batch, None)

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())
