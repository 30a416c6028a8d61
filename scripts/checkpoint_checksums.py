"""What the checkpoint checksums cost: save and restore of the SmolLM2-135M LoRA state.

The state is LoRA (rank 8, all-linear targets) on SmolLM2's shapes with random trainable
arrays and Adam's two moments, i.e. what the launcher checkpoints. The script times
``save`` (synchronous, to the file) and ``restore`` with and without checksums, alternating
in one process so that a shared machine's noise hits both alike, and prints medians. It
also prints the bytes hashed per step and the CRC-32 throughput on one buffer of that size,
the figure that does not depend on the disk.

Usage::

    python scripts/checkpoint_checksums.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib

import jax
import numpy as np
import optax

import jaxlora as jl
from jaxlora import assets
from jaxlora.checkpoint import array_bytes
from jaxlora.models.loaders import load_llama_gguf


def smollm2_state():
    """LoRA adapters (random) and Adam state on SmolLM2-135M (LoRA's init reads shapes)."""
    _, params = load_llama_gguf(assets.smollm2_gguf())
    params = jax.eval_shape(lambda: params)
    adapters = jl.lora(rank=8, alpha=16.0, targets="all-linear").init(jax.random.key(0), params)
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree_util.tree_unflatten(
        treedef, [0.01 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
    tx = jl.optimizer(optax.adam(1e-3))
    opt_state = tx.init(adapters)
    _, opt_state = tx.update(adapters, opt_state, adapters)  # non-zero moments
    return adapters, opt_state, tx


def crc32_throughput(nbytes: int, repeats: int) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        zlib.crc32(buf)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    adapters, opt_state, _ = smollm2_state()
    jax.block_until_ready((adapters, opt_state))
    target = jax.eval_shape(lambda: adapters)
    opt_target = jax.eval_shape(lambda: opt_state)
    hashed = array_bytes(adapters) + array_bytes(opt_state)
    times: dict[str, list[float]] = {
        k: [] for k in ("save_on", "save_off", "restore_on", "restore_off")
    }
    for i in range(args.repeats):
        # alternate which goes first, so drift on a shared machine hits both alike
        for on in (True, False) if i % 2 == 0 else (False, True):
            tag = "on" if on else "off"
            with (
                tempfile.TemporaryDirectory() as tmp,
                jl.CheckpointManager(tmp, async_save=False, checksums=on) as mgr,
            ):
                t0 = time.perf_counter()
                mgr.save(i, adapters=adapters, opt_state=opt_state)
                times[f"save_{tag}"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                st = mgr.restore(adapters=target, opt_state=opt_target)
                jax.block_until_ready((st.adapters, st.opt_state))
                times[f"restore_{tag}"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bytes_hashed": hashed,
        "crc32_bytes_per_s": crc32_throughput(hashed, args.repeats),
        **{f"median_{k}_s": v for k, v in med.items()},
        "save_overhead": med["save_on"] / med["save_off"] - 1,
        "restore_overhead": med["restore_on"] / med["restore_off"] - 1,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"bytes hashed per step: {hashed / 2**20:.1f} MiB (adapters + Adam moments)")
    print(f"CRC-32 throughput, one buffer: {out['crc32_bytes_per_s'] / 2**30:.2f} GiB/s")
    for op in ("save", "restore"):
        on, off = med[f"{op}_on"], med[f"{op}_off"]
        print(
            f"{op:8s} median of {args.repeats}: {on * 1e3:7.1f} ms with checksums, "
            f"{off * 1e3:7.1f} ms without ({(on / off - 1) * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
