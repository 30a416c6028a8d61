"""Memory and step time of SmolLM2-135M QLoRA training on a quantized base vs float32.

One training configuration for every base, QLoRA's: SmolLM2-135M-Instruct from its GGUF
with scanned layers and gradient checkpointing (``scan_layers=True, remat=True``: each
layer's activations are recomputed in the backward pass), LoRA rank 8 (alpha 16) on every
linear kernel, AdamW over the adapters only, a batch of 4 sequences of 64 tokens, float32
activations. Bases:

* ``float32``: the file dequantized to float32 (the float-base LoRA run);
* ``nf4``: QLoRA's NF4 (blocks of 64, double-quantized scales) on every linear kernel *and*
  the tied embedding, quantized tensor by tensor while the file is read
  (``load_llama_gguf(path, quantize="nf4", quantize_embedding=True)``), so the float model
  is never held; a lookup gathers rows of codes, the tied output projection dequantizes
  the table per use;
* ``nf4_linear``: the same with the embedding left float32 (bitsandbytes' QLoRA keeps it);
* ``q4_1``: the file's own Q4_1 codes, never dequantized (embedding float32).

Memory: each base runs in its own subprocess (one run's allocations cannot flatter
another) that loads the base, compiles the train step and runs a few steps. It reports the
peak RSS of the whole process (``VmHWM``, the kernel's high-water mark, load included), the
RSS after each phase (runtime and libraries, base loaded, step compiled, trained), the
base's stored bytes, and XLA's ``memory_analysis()`` of the step: its temporary bytes,
beside the bytes a float32 copy of the quantized tensors would take (a full-model float
copy inside the step would have to fit in the temporaries). RSS does not depend on how busy
the machine is.

Step time (``--timing``): one further process holds the float32 and the NF4 step and runs
them in alternating rounds, so machine load hits both alike; it reports the median of the
per-round ratios. On a shared machine that ratio is still noisy: say so when quoting it.

Usage::

    python scripts/bench_quant_memory.py                    # memory table, every base
    python scripts/bench_quant_memory.py --timing           # also the step-time ratio
    python scripts/bench_quant_memory.py --json             # the same as JSON
    python scripts/bench_quant_memory.py --bases float32,nf4
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASES = ("float32", "nf4", "nf4_linear", "q4_1")
BATCH, SEQ, STEPS = 4, 64, 3
RANK, ALPHA = 8, 16.0
ROUNDS, STEPS_PER_ROUND = 7, 3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _mib(kib: int) -> float:
    return kib / 1024


def _load(base: str):
    """``(config, params)`` of SmolLM2-135M with the benchmark's base and model options."""
    from jaxlora import assets
    from jaxlora.models import loaders

    options = dict(scan_layers=True, remat=True)
    gguf = assets.smollm2_gguf()
    if base == "float32":
        return loaders.load_llama_gguf(gguf, **options)
    if base == "nf4":
        return loaders.load_llama_gguf(gguf, quantize="nf4", quantize_embedding=True, **options)
    if base == "nf4_linear":
        return loaders.load_llama_gguf(gguf, quantize="nf4", **options)
    if base == "q4_1":
        return loaders.load_llama_gguf(gguf, quantized=True, **options)
    raise ValueError(f"unknown base {base!r}; choose from {BASES}")


def _setup(base: str):
    """Loads ``base`` and compiles its train step: ``(compiled, state, info)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxlora as jl
    from jaxlora.models import llama
    from jaxlora.profiling import cost_of
    from jaxlora.quant import QuantizedKernel
    from jaxlora.targets import is_kernel_leaf, stacked

    config, params = _load(base)
    jax.block_until_ready(params)
    gc.collect()  # the GGUF reader's memory map
    loaded_kib = _status_kib("VmRSS")
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_kernel_leaf)
    quantized = [x for x in leaves if isinstance(x, QuantizedKernel)]
    base_bytes = sum(
        x.nbytes if isinstance(x, QuantizedKernel) else x.size * x.dtype.itemsize for x in leaves
    )

    def loss_fn(p, ids):
        return llama.causal_lm_loss(llama.apply(p, ids, config=config), ids)

    method = jl.lora(rank=RANK, alpha=ALPHA, targets=stacked("all-linear"))
    adapters = method.init(jax.random.key(0), params)
    tx = jl.optimizer(optax.adamw(1e-4))
    opt_state = tx.init(adapters)
    step = jl.train_step(loss_fn, tx)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, SEQ)).astype(np.int32))
    compiled = step.lower(params, adapters, opt_state, ids).compile()
    cost = cost_of(compiled)
    info = {
        "base": base,
        "loaded_rss_mib": _mib(loaded_kib),
        "compiled_rss_mib": _mib(_status_kib("VmRSS")),
        "base_mib": base_bytes / 2**20,
        "quantized_tensors": len(quantized),
        "float_copy_of_quantized_mib": sum(x.size * 4 for x in quantized) / 2**20,
        "largest_quantized_float_mib": max((x.size * 4 for x in quantized), default=0) / 2**20,
        "xla_temp_mib": cost.temp_bytes / 2**20,
        "xla_argument_mib": cost.argument_bytes / 2**20,
    }
    return compiled, [params, adapters, opt_state, ids], info


def _steps(compiled, state, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        params, adapters, opt_state, metrics = compiled(*state)
        state[:3] = params, adapters, opt_state
        losses.append(float(metrics["loss"]))  # waits for the step
    return losses


def child(base: str) -> dict:
    import jax
    import jax.numpy as jnp

    jnp.zeros(()).block_until_ready()  # the runtime, as every run has it
    runtime_kib = _status_kib("VmRSS")
    compiled, state, info = _setup(base)
    losses = _steps(compiled, state, STEPS)
    jax.block_until_ready(state)
    return {
        **info,
        "runtime_rss_mib": _mib(runtime_kib),
        "trained_rss_mib": _mib(_status_kib("VmRSS")),
        "peak_rss_mib": _mib(_status_kib("VmHWM")),
        "losses": losses,
    }


def timing(bases: tuple[str, str]) -> dict:
    """Alternating rounds of the two bases' steps in one process; per-round time ratios."""
    runs = [_setup(b) for b in bases]
    for compiled, state, _ in runs:
        _steps(compiled, state, 1)  # first call: buffer transfers, thread pools
    seconds: list[list[float]] = [[], []]
    for r in range(ROUNDS):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            compiled, state, _ = runs[i]
            t0 = time.perf_counter()
            _steps(compiled, state, STEPS_PER_ROUND)
            seconds[i].append((time.perf_counter() - t0) / STEPS_PER_ROUND)
    ratios = [q / f for f, q in zip(*seconds, strict=True)]
    return {
        "bases": list(bases),
        "step_s": [statistics.median(s) for s in seconds],
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }


def _run(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--timing", action="store_true", help="also float32 vs nf4 step time")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if args.timing_child:
        print(json.dumps(timing(("float32", "nf4"))))
        return
    rows = [_run(["--child", b]) for b in args.bases.split(",")]
    timed = _run(["--timing-child"]) if args.timing else None
    if args.json:
        print(json.dumps({"memory": rows, "timing": timed}, indent=2))
        return
    ref = next((r for r in rows if r["base"] == "float32"), None)
    print(
        f"SmolLM2-135M, LoRA r={RANK} all-linear, batch {BATCH}x{SEQ}, scanned layers + "
        "remat, AdamW (RSS in MiB)\n"
        "base       | base MiB | runtime | loaded | compiled | trained | peak (x f32) | "
        "XLA temp | f32 copy of quantized (largest)"
    )
    for r in rows:
        ratio = f" ({r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x)" if ref else ""
        print(
            f"{r['base']:10} | {r['base_mib']:8.1f} | {r['runtime_rss_mib']:7.0f} | "
            f"{r['loaded_rss_mib']:6.0f} | {r['compiled_rss_mib']:8.0f} | "
            f"{r['trained_rss_mib']:7.0f} | {r['peak_rss_mib']:.0f}{ratio} | "
            f"{r['xla_temp_mib']:8.1f} | {r['float_copy_of_quantized_mib']:.1f} "
            f"({r['largest_quantized_float_mib']:.1f})"
        )
    if timed:
        f, q = timed["step_s"]
        print(
            f"step time, alternating rounds in one process: float32 {f * 1e3:.0f} ms, "
            f"nf4 {q * 1e3:.0f} ms, ratio {timed['ratio_median']:.2f}x (median of "
            f"{len(timed['ratios'])} rounds; {min(timed['ratios']):.2f}-"
            f"{max(timed['ratios']):.2f})"
        )


if __name__ == "__main__":
    main()
