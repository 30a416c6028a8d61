"""Memory of SmolLM2-135M LoRA training on a quantized base vs the float32 base.

Each base runs in its own subprocess (so one run's allocations cannot flatter the other):
it loads SmolLM2-135M-Instruct from its GGUF (scanned layers), builds the base, initialises
LoRA (rank 8, all-linear), compiles the jitted train step and runs a few steps on a
random batch. It reports

* peak RSS of the whole process (``VmHWM``), and of the training phase alone (the peak is
  reset with ``/proc/self/clear_refs`` after the base is built, so the float32 weights an
  NF4 run reads before quantizing them do not count against training);
* the base's stored bytes, and XLA's ``memory_analysis()`` of the compiled step: its
  temporary bytes against the bytes a float32 copy of the quantized kernels would take
  (a full-model float copy inside the step would have to fit in the temporaries).

Bases: ``float32``; ``nf4`` (QLoRA: NF4, blocks of 64, double-quantized scales, quantized
from the float weights); ``q4_1`` (the GGUF file's own Q4_1 codes, never dequantized to a
float copy, not even at load). Step times are not reported: this script is not meant to be
timed on a shared machine.

Usage::

    python scripts/bench_quant_memory.py              # a table
    python scripts/bench_quant_memory.py --json       # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BASES = ("float32", "nf4", "q4_1")
BATCH, SEQ, STEPS = 4, 64, 3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(base: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxlora as jl
    from jaxlora import assets
    from jaxlora.models import llama, loaders
    from jaxlora.profiling import cost_of
    from jaxlora.quant import QuantizedKernel
    from jaxlora.targets import is_kernel_leaf

    gguf = assets.smollm2_gguf()
    config, params = loaders.load_llama_gguf(gguf, scan_layers=True, quantized=base == "q4_1")
    if base == "nf4":
        params = jl.quantize(params, targets="all-linear", kind="nf4", double_quant=True)
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_kernel_leaf)
    jax.block_until_ready(params)
    load_peak = _status_kib("VmHWM")
    reset = _reset_peak()

    quantized = [x for x in leaves if isinstance(x, QuantizedKernel)]
    base_bytes = sum(
        x.nbytes if isinstance(x, QuantizedKernel) else x.size * x.dtype.itemsize for x in leaves
    )
    float_copy = sum(x.size * 4 for x in quantized)

    def loss_fn(p, ids):
        return llama.causal_lm_loss(llama.apply(p, ids, config=config), ids)

    adapters = jl.lora(rank=8, alpha=16.0, targets="all-linear").init(jax.random.key(0), params)
    tx = jl.optimizer(optax.adamw(1e-4))
    state = tx.init(adapters)
    step = jl.train_step(loss_fn, tx)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, SEQ)).astype(np.int32))
    compiled = step.lower(params, adapters, state, ids).compile()
    cost = cost_of(compiled)
    losses = []
    for _ in range(STEPS):
        params, adapters, state, metrics = compiled(params, adapters, state, ids)
        losses.append(float(metrics["loss"]))
    now = _status_kib("VmHWM")
    return {
        "base": base,
        "peak_rss_mib": max(load_peak, now) / 1024,
        "train_peak_rss_mib": now / 1024 if reset else None,
        "base_mib": base_bytes / 2**20,
        "quantized_kernels": len(quantized),
        "float_copy_of_quantized_mib": float_copy / 2**20,
        "xla_temp_mib": cost.temp_bytes / 2**20,
        "xla_argument_mib": cost.argument_bytes / 2**20,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    parser.add_argument("--bases", default=",".join(BASES))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    for base in args.bases.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", base], capture_output=True, text=True, check=False
        )
        if out.returncode:
            sys.exit(f"{base} run failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    ref = next((r for r in rows if r["base"] == "float32"), None)
    print(
        f"SmolLM2-135M, LoRA r=8 all-linear, batch {BATCH}x{SEQ}, scanned layers, AdamW\n"
        "base     | base MiB | peak RSS MiB (x f32) | train-phase peak MiB (x f32) | "
        "XLA temp MiB | f32 copy of quantized kernels MiB"
    )
    for r in rows:
        ratio = f" ({r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x)" if ref else ""
        train = r["train_peak_rss_mib"]
        tr = "n/a" if train is None else f"{train:.0f}"
        if ref and train is not None and ref["train_peak_rss_mib"]:
            tr += f" ({train / ref['train_peak_rss_mib']:.2f}x)"
        print(
            f"{r['base']:8} | {r['base_mib']:8.1f} | {r['peak_rss_mib']:.0f}{ratio} | {tr} | "
            f"{r['xla_temp_mib']:.1f} | {r['float_copy_of_quantized_mib']:.1f}"
        )


if __name__ == "__main__":
    main()
