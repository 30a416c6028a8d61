"""A fair speed comparison: every case in its own fresh process, rounds alternated.

    python -m benchmarks.harness minilm --rounds 3 --steps 20
    python -m benchmarks.harness decoder --cases full lora_all peft_lora_all --rounds 3
    python -m benchmarks.harness decoder --quick     # CI: a smoke run, nothing written

For each round the harness runs every case once, in order, each as
``python -m benchmarks.worker WORKLOAD CASE`` (so A B C A B C ...: drift in the machine's
speed is spread over every case), and collects its JSON. A case's figure is the median over
rounds of the per-round median step time; the spread is the min and max of those.

Validity: every worker records the CPU that *other* processes used while its steps were
timed. A round whose worker saw more than ``--max-other`` cores (0.2) is invalid; results
with any invalid round are printed but not written to ``benchmarks/results/`` unless
``--allow-load``. (PyTorch's thread pool collapses under contention while XLA degrades
gently, so a loaded comparison is biased, not just noisy.)

Threads: PyTorch gets ``torch.set_num_threads(cores)``; XLA uses its defaults (its CPU
client sizes its pool by the process's CPU affinity). Neither is pinned to cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import procstat

RESULTS = Path(__file__).parent / "results"
MAX_OTHER_CORES = 0.2


def run_worker(workload: str, case: str, *, steps: int, warmup: int, env=None) -> dict:
    """Runs one case in a fresh interpreter and returns its JSON (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "benchmarks.worker", workload, case]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    return {"case": case, "error": (proc.stderr or proc.stdout)[-2000:]}


def summarize(runs: list[dict], max_other: float) -> dict[str, Any]:
    """One case's figures over its rounds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"case": runs[0]["case"], "error": runs[0]["error"]}
    medians = [r["median_s"] for r in ok]
    first = ok[0]
    med = statistics.median(medians)
    return {
        "case": first["case"],
        "trainable": first["trainable"],
        "median_s": med,
        "min_s": min(medians),
        "max_s": max(medians),
        "rounds": len(ok),
        "tokens_per_s": first["tokens_per_step"] / med,
        "step_rss_mib": statistics.median(r["step_rss_mib"] for r in ok),
        "first_loss": first["first_loss"],
        "max_other_cores": max(r["other_cores"] for r in ok),
        "valid": all(r["other_cores"] <= max_other for r in ok),
        "flops": first.get("flops"),
    }


def _ratio_rows(rows: dict[str, dict]) -> list[tuple[str, str, float]]:
    pairs = [
        ("lora_attn", "peft_lora_attn"),
        ("lora_all", "peft_lora_all"),
        ("vera", "peft_vera"),
        ("dora", "peft_dora"),
        ("full", "torch_full"),
    ]
    out = []
    for a, b in pairs:
        if a in rows and b in rows and "error" not in rows[a] and "error" not in rows[b]:
            out.append((a, b, rows[b]["median_s"] / rows[a]["median_s"]))
    if "full" in rows and "error" not in rows["full"]:
        for a in rows:
            if a != "full" and "error" not in rows[a] and not a.startswith(("torch", "peft")):
                out.append((a, "full (time ratio)", rows[a]["median_s"] / rows["full"]["median_s"]))
    return out


def markdown(workload: str, rows: dict[str, dict], meta: dict[str, Any]) -> str:
    """The results as a markdown section."""
    lines = [
        f"## {workload}",
        "",
        f"{meta['machine']}; {meta['rounds']} rounds x {meta['steps']} timed steps per case, "
        f"each case in its own process, rounds alternated; other processes' CPU during "
        f"timing at most {meta['max_other_cores']:.2f} cores "
        f"({'valid' if meta['valid'] else 'INVALID: machine was busy'}); "
        f"load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end.",
        "",
        "| case | trainable | median ms (min–max) | tokens/s | step RSS MiB | other cores |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['case']} | error | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['trainable']:,} | {1e3 * r['median_s']:.1f} "
            f"({1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f}) | {r['tokens_per_s']:,.0f} "
            f"| {r['step_rss_mib']:.0f} | {r['max_other_cores']:.2f} |"
        )
    ratios = _ratio_rows(rows)
    if ratios:
        lines += ["", "| jaxlora case | over | ratio |", "|---|---|---|"]
        for a, b, v in ratios:
            label = "tokens/s ratio" if not b.endswith("ratio)") else "step time"
            lines.append(f"| {a} | {b} | {v:.3f} ({label}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=("minilm", "decoder"))
    ap.add_argument("--cases", nargs="*", help="default: every case of the workload")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-other", type=float, default=MAX_OTHER_CORES)
    ap.add_argument("--allow-load", action="store_true", help="write results even if busy")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: one round of two steps of full, lora_all and peft_lora_all; "
        "prints only",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.no_write = 1, 2, 1, True
        args.cases = args.cases or ["full", "lora_all", "peft_lora_all"]
    module = __import__(f"benchmarks.{args.workload}", fromlist=["CASES"])
    cases = args.cases or list(module.CASES)
    unknown = sorted(set(cases) - set(module.CASES))
    if unknown:
        ap.error(f"unknown cases {unknown} for {args.workload}; known: {list(module.CASES)}")
    load_start = procstat.loadavg()
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for rnd in range(args.rounds):
        for case in cases:
            r = run_worker(args.workload, case, steps=args.steps, warmup=args.warmup)
            runs[case].append(r)
            msg = r.get("error", "").strip().splitlines()[-1:] if "error" in r else None
            print(
                f"[round {rnd + 1}/{args.rounds}] {case}: "
                + (f"ERROR {msg}" if msg is not None else
                   f"{1e3 * r['median_s']:.1f} ms, other cores {r['other_cores']:.2f}"),
                file=sys.stderr, flush=True,
            )  # fmt: skip
    rows = {c: summarize(rs, args.max_other) for c, rs in runs.items()}
    valid = all(r.get("valid", False) for r in rows.values())
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "rounds": args.rounds,
        "steps": args.steps,
        "max_other_cores": max((r.get("max_other_cores", 0.0) for r in rows.values()), default=0),
        "valid": valid,
        "load_start": load_start,
        "load_end": procstat.loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    text = markdown(args.workload, rows, meta)
    print(text)
    if args.no_write:
        return 0
    if not valid and not args.allow_load:
        print(
            f"not written: other processes used more than {args.max_other} cores while a case "
            "was timed (re-run on a quiet machine, or pass --allow-load)",
            file=sys.stderr,
        )
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.workload}.md").write_text(text)
    (RESULTS / f"{args.workload}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
