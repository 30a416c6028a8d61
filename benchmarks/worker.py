"""Runs ONE benchmark case in this process and prints one JSON line with its figures.

    python -m benchmarks.worker minilm lora_all --steps 20 --warmup 3

The case is built (weights, data, compile) and warmed up first; then ``--steps`` steps are
timed one by one inside a :class:`benchmarks.procstat.Window`, so the JSON says how much CPU
other processes used while this case was timed. Peak RSS is the process's high-water mark
after warm-up (reset through ``/proc/self/clear_refs``) minus its RSS before the case was
built, so imports and the other cases do not count. Running each case in a fresh process
keeps one framework's thread pools and allocator from touching the other's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time

from benchmarks import procstat

WORKLOADS = ("minilm", "decoder")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _trim() -> None:
    """Returns freed heap to the OS, so RSS is what is live rather than what malloc kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    # writing 5 resets VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _workload(name: str):
    if name == "minilm":
        from benchmarks import minilm

        return minilm
    if name == "decoder":
        from benchmarks import decoder

        return decoder
    raise ValueError(f"unknown workload {name!r}; known: {list(WORKLOADS)}")


def run(workload: str, case: str, *, steps: int, warmup: int) -> dict:
    """Builds, warms up and times ``case``; returns its figures."""
    module = _workload(workload)
    module.batches()  # tokenisation is not part of the case's memory
    base_rss = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    step, info = module.make_case(case)
    losses = [step(i) for i in range(warmup)]
    setup_s = time.perf_counter() - t0
    _trim()
    _reset_peak()
    times = []
    with procstat.Window() as window:
        for i in range(warmup, warmup + steps):
            t = time.perf_counter()
            losses.append(step(i))
            times.append(time.perf_counter() - t)
    peak = _rss_kib("VmHWM")
    trainable = int(info.get("trainable", 0))
    compiled = info.pop("compiled", None)
    flops = None
    if compiled is not None:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
    # Compilation leaves heap behind that is no part of a step's memory, so the step's
    # memory is the peak over the timed steps minus the RSS once everything the case held
    # (weights, adapters, optimizer state, the executable) is freed again.
    del step, info, compiled
    _trim()
    after = _rss_kib("VmRSS")
    out = {
        "workload": workload,
        "case": case,
        "trainable": trainable,
        "setup_s": setup_s,
        "times_s": times,
        "median_s": statistics.median(times),
        "tokens_per_step": module.BATCH * module.SEQ,
        "real_tokens_per_step": module.real_tokens(),
        "step_rss_mib": (peak - after) / 1024,
        "peak_rss_mib": peak / 1024,
        "baseline_rss_mib": base_rss / 1024,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "other_cores": window.other_cores,
        "own_cores": window.own_cores,
        "load_start": window.load_start,
        "load_end": window.load_end,
    }
    if flops is not None:
        out["flops"] = flops
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=WORKLOADS)
    ap.add_argument("case")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    result = run(args.workload, args.case, steps=args.steps, warmup=args.warmup)
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
