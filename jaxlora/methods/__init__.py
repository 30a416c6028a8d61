"""The methods: one module each, owning its adapter node, init, labels, optimizer defaults,
checkpoint and export hooks, and registering its recipes (:mod:`jaxlora.recipes`).

Generic code (``adapt``, ``merge``, ``train_step``, sharding, checkpoints, interop) sees only
the interfaces in :mod:`jaxlora.adapters` and the hooks the methods register; importing this
package registers every method.
"""

from jaxlora import recipes
from jaxlora.methods import delta_lora, dora, full, lora, lora_fa, lora_plus, vera

NAMES: tuple[str, ...] = recipes.names()
"""Every name :func:`jaxlora.recipe` accepts."""

__all__ = ["NAMES", "delta_lora", "dora", "full", "lora", "lora_fa", "lora_plus", "vera"]
