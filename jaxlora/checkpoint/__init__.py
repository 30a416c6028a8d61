"""Checkpoints of a training run: adapters, optimizer state, step, RNG key, data position.

:class:`CheckpointManager` wraps orbax's ``CheckpointManager`` (retention, async writes,
atomic step directories, multi-host) and adds what a fine-tuning run needs on top:

* **Adapter-only.** The frozen base is never written. The one exception is a method that
  moves the base (Delta-LoRA): pass ``base=params`` and only the *targeted kernels* are
  stored, in full. That is the price of an exact resume: ``W_t = W_0 + λ(A_tB_t − A_KB_K)``
  holds in exact arithmetic only, so a ``W_0``-relative delta or the factors at step ``K``
  would restore ``W_t`` to within rounding, not bit-for-bit. The cost is the size of the
  targeted kernels (for SmolLM2 with all-linear targets, ≈ 90% of the model).
* **Plain trees on disk.** Every pytree is written as a nested dict of arrays keyed by its
  key path (``layers/0/attn/q_proj/kernel/a``), so the files do not depend on pytree node
  classes. The static configuration that lives in the adapters' treedef (method class,
  layout, rank, scale) is recorded as JSON beside it, together with the shape and dtype of
  every array, and a restore whose target disagrees is refused with the differences named.
* **Shared state compact.** State shared by all layers is stored in the compact form its
  method defines whenever that round trip is exact (checked at save time): VeRA's random
  matrices as the PRNG key they are drawn from, so a VeRA checkpoint is its per-layer
  vectors plus a few bytes. The method owns the rule (:class:`jaxlora.adapters.SharedState`
  hooks); nothing here knows any method.
* **Any mesh.** Arrays are restored into the shardings of the target tree (or ones passed
  explicitly), whatever mesh wrote them.
* **Small arrays packed.** orbax spends a few KB per array; arrays up to
  :data:`PACK_LIMIT` bytes are packed into one buffer per dtype, so hundreds of small
  vectors cost their bytes, not their count. An adapter-only checkpoint of SmolLM2 is
  ≤ 1.05× its trainable bytes (``scripts/checkpoint_sizes.py``).

What a checkpoint directory guarantees:

* **Atomic steps.** orbax writes each step into a temporary directory and renames it when
  complete, and retention renames a step out of the listing (into ``.deleted/``) before it
  deletes any file, so a crash or a kill mid-save or mid-delete never leaves a partial
  step listed: every step in :meth:`~CheckpointManager.all_steps` is whole.
* **Checksummed.** Every array's 64-bit XXH3 hash is stored in its step's metadata
  (per shard for arrays a process holds only parts of, gathered from every process, so
  multi-host checkpoints are covered) and verified on restore onto any mesh; a corrupt
  array, or one without a record, is refused by path (:class:`CorruptCheckpointError`),
  and ``restore(fallback=True)`` walks back to the newest intact step, warning what it
  skipped (:mod:`~jaxlora.checkpoint.integrity`; about 1 ms per 28 MiB).
* **One writer.** A writing manager holds an exclusive lock file naming its host and pid;
  a second writer is refused, a dead one's lock taken over (:mod:`~jaxlora.checkpoint.lock`).
* **NaN-safe retention.** A NaN or infinite ``best_metric`` never ranks as best, so it
  never causes a finite step to be deleted.

Modules: ``manager`` (the manager, save and restore), ``layout`` (trees as plain dicts on
disk, packing), ``describe`` (the adapters' static configuration and its comparison),
``storage`` (compact shared state, omitted frozen arrays), ``integrity`` (checksums),
``lock`` (the writer lock), ``sizes``.

Examples:
  >>> import tempfile, jax, jax.numpy as jnp, optax, jaxlora as jl
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> method = jl.lora(rank=2, targets=".*kernel")
  >>> adapters = method.init(jax.random.key(0), params)
  >>> tx = jl.optimizer(optax.adam(1e-3))
  >>> with jl.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
  ...     mgr.save(10, adapters=adapters, opt_state=tx.init(adapters), data_position=640)
  ...     mgr.wait()
  ...     target = jax.eval_shape(method.init, jax.random.key(0), params)
  ...     state = mgr.restore(adapters=target, opt_state=jax.eval_shape(tx.init, target))
  True
  >>> state.step, state.data_position
  (10, 640)
"""

from jaxlora.checkpoint.describe import describe_adapters
from jaxlora.checkpoint.errors import CheckpointError, CorruptCheckpointError
from jaxlora.checkpoint.layout import PACK_LIMIT
from jaxlora.checkpoint.manager import FORMAT_VERSION, CheckpointManager, TrainState
from jaxlora.checkpoint.sizes import array_bytes, checkpoint_bytes

__all__ = [
    "FORMAT_VERSION",
    "PACK_LIMIT",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "TrainState",
    "array_bytes",
    "checkpoint_bytes",
    "describe_adapters",
]
