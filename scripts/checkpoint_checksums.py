"""What the checkpoint checksums cost: save and restore of the SmolLM2-135M LoRA state.

The state is LoRA (rank 8, all-linear targets) on SmolLM2's shapes with random trainable
arrays and Adam's two moments, i.e. what the launcher checkpoints. The script times
``save`` (synchronous, to the file) and ``restore`` with and without checksums, alternating
in one process so that a shared machine's noise hits both alike, and prints the medians of
wall time and of process CPU time (all threads) and their ratios (with / without). It also
prints the bytes hashed per step, the hashing time of one step's arrays as save does it,
the throughput of XXH3 (what is recorded) and of zlib's CRC-32 (what format-2 steps recorded)
on one buffer of that size (figures that do not depend on the disk), and whether the
machine was loaded. About 30 s.

Usage::

    python scripts/checkpoint_checksums.py [--repeats 11] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import zlib

import jax
import numpy as np
import optax
import xxhash

import jaxlora as jl
from jaxlora import assets
from jaxlora.checkpoint import array_bytes, integrity, layout
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


def throughput(hash_fn, nbytes: int, repeats: int) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        hash_fn(buf)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def machine_load() -> str:
    """``"quiet"`` or ``"loaded"``: the 1-minute load average against the CPU count."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return f"{'loaded' if load > 0.5 * cpus else 'quiet'} (load {load:.1f} on {cpus} CPUs)"


def timed(fn) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of ``fn()``; CPU time counts every thread (orbax's,
    tensorstore's and the hashing threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    adapters, opt_state, _ = smollm2_state()
    jax.block_until_ready((adapters, opt_state))
    target = jax.eval_shape(lambda: adapters)
    opt_target = jax.eval_shape(lambda: opt_state)
    hashed = array_bytes(adapters) + array_bytes(opt_state)
    load_before = machine_load()
    times: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("save_on", "save_off", "restore_on", "restore_off")
    }
    for i in range(args.repeats + 1):
        # alternate which goes first, so drift on a shared machine hits both alike;
        # round 0 warms up (first compilations, orbax's imports) and is not counted
        for on in (True, False) if i % 2 == 0 else (False, True):
            tag = "on" if on else "off"
            with (
                tempfile.TemporaryDirectory() as tmp,
                jl.CheckpointManager(tmp, async_save=False, checksums=on) as mgr,
            ):
                save = timed(lambda i=i: mgr.save(i, adapters=adapters, opt_state=opt_state))

                def read():
                    st = mgr.restore(adapters=target, opt_state=opt_target)
                    jax.block_until_ready((st.adapters, st.opt_state))

                restore = timed(read)
            if i:
                times[f"save_{tag}"].append(save)
                times[f"restore_{tag}"].append(restore)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in times.items()
    }
    # the hashing alone, as save does it (host copies, then a hash of each)
    jobs = []
    for name, tree in [("adapters", adapters), ("opt_state", opt_state)]:
        paths, leaves, _ = layout.leaf_paths(tree)
        jobs += integrity.host_jobs(name, paths, leaves, layout.to_host(leaves))
    hash_cpu = statistics.median(timed(lambda: integrity.records(jobs))[1] for _ in range(5))
    out = {
        "machine": f"{load_before} before, {machine_load()} after",
        "bytes_hashed": hashed,
        "algorithm": integrity.ALGORITHM,
        "xxh3_bytes_per_s": throughput(xxhash.xxh3_64_intdigest, hashed, 5),
        "crc32_bytes_per_s": throughput(zlib.crc32, hashed, 5),
        "repeats": args.repeats,
        "hash_cpu_s": hash_cpu,
    }
    for op in ("save", "restore"):
        (w_on, c_on), (w_off, c_off) = med[f"{op}_on"], med[f"{op}_off"]
        out[op] = {
            "wall_s": {"with": w_on, "without": w_off, "ratio": w_on / w_off},
            "cpu_s": {"with": c_on, "without": c_off, "ratio": c_on / c_off},
        }
    out["rounds_ms"] = {
        k: [[round(w * 1e3, 1), round(c * 1e3, 1)] for w, c in v] for k, v in times.items()
    }
    out["seconds"] = time.perf_counter() - began
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"machine: {out['machine']}")
    print(f"bytes hashed per step: {hashed / 2**20:.1f} MiB (adapters + Adam moments)")
    print(
        f"throughput, one buffer: XXH3 {out['xxh3_bytes_per_s'] / 2**30:.1f} GiB/s "
        f"(recorded), zlib CRC-32 {out['crc32_bytes_per_s'] / 2**30:.2f} GiB/s"
    )
    print(
        f"hashing alone: {hash_cpu * 1e3:.1f} ms CPU, "
        f"{hash_cpu / med['save_off'][1] * 100:.1f}% of a save's CPU without checksums"
    )
    print(f"medians of {args.repeats} alternating rounds (with / without checksums):")
    for op in ("save", "restore"):
        for kind in ("wall_s", "cpu_s"):
            r = out[op][kind]
            print(
                f"  {op:8s} {kind[:-2]:4s} {r['with'] * 1e3:7.1f} ms / {r['without'] * 1e3:7.1f} ms"
                f"   ratio {r['ratio']:.3f} ({(r['ratio'] - 1) * 100:+.1f}%)"
            )
    print(f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
