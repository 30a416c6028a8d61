"""A fair speed comparison: every case in its own fresh process, rounds alternated.

    python -m benchmarks.harness minilm --rounds 3 --steps 20
    python -m benchmarks.harness decoder --cases full lora_all peft_lora_all --rounds 3
    python -m benchmarks.harness decoder --quick     # CI: a smoke run, nothing written

For each round the harness runs every case once, in order, each as
``python -m benchmarks.worker WORKLOAD CASE`` (so A B C A B C ...: drift in the machine's
speed is spread over every case), and collects its JSON. A case's figure is the median over
rounds of the per-round median step time; the spread is the min and max of those.

Validity: every worker records the CPU that *other* processes used while its steps were
timed. A round whose worker saw more than ``--max-other`` cores (0.2) is discarded: a case
with no valid round is printed and written as invalid, without figures (``--allow-load``
keeps loaded rounds). Ratios are taken round by round and their median reported.
(PyTorch's thread pool collapses under contention while XLA degrades
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


def _valid(run: dict, max_other: float) -> bool:
    return "error" not in run and run["other_cores"] <= max_other


def summarize(runs: list[dict], max_other: float) -> dict[str, Any]:
    """One case's figures over its valid rounds (those timed on a quiet machine)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"case": runs[0]["case"], "error": runs[0]["error"]}
    valid = [r for r in ok if r["other_cores"] <= max_other]
    first = ok[0]
    out = {
        "case": first["case"],
        "trainable": first["trainable"],
        "first_loss": first["first_loss"],
        "max_other_cores": max(r["other_cores"] for r in ok),
        "valid": bool(valid),
        "discarded": len(ok) - len(valid),
    }
    if not valid:
        return out
    medians = [r["median_s"] for r in valid]
    med = statistics.median(medians)
    return {
        **out,
        "median_s": med,
        "min_s": min(medians),
        "max_s": max(medians),
        "rounds": len(valid),
        "tokens_per_s": first["tokens_per_step"] / med,
        "step_rss_mib": statistics.median(r["step_rss_mib"] for r in valid),
        "flops": first.get("flops"),
    }


PEER_PAIRS = (
    ("lora_attn", "peft_lora_attn"),
    ("lora_all", "peft_lora_all"),
    ("vera", "peft_vera"),
    ("dora", "peft_dora"),
    ("full", "torch_full"),
)


def ratios(runs: dict[str, list[dict]], max_other: float) -> list[dict[str, Any]]:
    """Ratios taken round by round (cases of one round ran minutes apart, not hours), then
    the median over the rounds where both cases were valid: the peer's step time over
    jaxlora's (a tokens/s ratio) for the PyTorch pairs, jaxlora's over its own full
    fine-tuning for the rest."""
    pairs = [(a, b, "tokens/s") for a, b in PEER_PAIRS]
    pairs += [
        (a, "full", "step time")
        for a in runs
        if a != "full" and not a.startswith(("torch", "peft"))
    ]
    out = []
    for a, b, kind in pairs:
        if a not in runs or b not in runs:
            continue
        per_round = [
            (rb["median_s"] / ra["median_s"])
            if kind == "tokens/s"
            else ra["median_s"] / rb["median_s"]
            for ra, rb in zip(runs[a], runs[b])
            if _valid(ra, max_other) and _valid(rb, max_other)
        ]
        if per_round:
            out.append(
                {
                    "case": a,
                    "over": b,
                    "kind": kind,
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                    "rounds": len(per_round),
                }
            )
    return out


def markdown(
    workload: str, rows: dict[str, dict], ratio_rows: list[dict], meta: dict[str, Any]
) -> str:
    """The results as a markdown section."""
    lines = [
        f"## {workload}",
        "",
        f"{meta['date']}; {meta['machine']}; {meta['rounds']} rounds x {meta['steps']} timed "
        "steps per case, each case in its own process, cases alternated round by round. A "
        f"round counts only if other processes used at most {meta['max_other']:.2f} cores "
        "while it was timed (CPU from /proc/stat minus the worker's own); load average "
        f"{meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end.",
        "",
        "| case | trainable | median ms (min–max) | tokens/s | step RSS MiB | rounds "
        "| other cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['case']} | error | | | | | |")
        elif not r["valid"]:
            lines.append(
                f"| {r['case']} | {r['trainable']:,} | invalid: machine busy | | | 0 "
                f"| {r['max_other_cores']:.2f} |"
            )
        else:
            lines.append(
                f"| {r['case']} | {r['trainable']:,} | {1e3 * r['median_s']:.1f} "
                f"({1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f}) | {r['tokens_per_s']:,.0f} "
                f"| {r['step_rss_mib']:.0f} | {r['rounds']} | {r['max_other_cores']:.2f} |"
            )
    if ratio_rows:
        lines += [
            "",
            "| jaxlora case | over | ratio, median of rounds (min–max) | of |",
            "|---|---|---|---|",
        ]
        for q in ratio_rows:
            what = "tokens/s" if q["kind"] == "tokens/s" else "step time"
            lines.append(
                f"| {q['case']} | {q['over']} | {q['median']:.3f} ({q['min']:.3f}–"
                f"{q['max']:.3f}) | {what} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=("minilm", "decoder"))
    ap.add_argument(
        "--from-json",
        type=Path,
        help="re-render a results JSON written by an earlier run (its raw runs) and exit",
    )
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
        help="CI smoke run: one round of two steps of full, lora_all and peft_lora_all, "
        "loaded rounds kept; prints only",
    )
    args = ap.parse_args(argv)
    if args.quick:
        # a smoke run checks the machinery, not the machine: loaded rounds count too
        args.rounds, args.steps, args.warmup, args.no_write = 1, 2, 1, True
        args.allow_load = True
        args.cases = args.cases or ["full", "lora_all", "peft_lora_all"]
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        runs, meta = saved["runs"], saved["meta"]
        meta.setdefault("max_other", args.max_other)
        return _write(args, runs, meta)
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
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "rounds": args.rounds,
        "steps": args.steps,
        "max_other": float("inf") if args.allow_load else args.max_other,
        "load_start": load_start,
        "load_end": procstat.loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return _write(args, runs, meta)


def _write(args, runs: dict[str, list[dict]], meta: dict[str, Any]) -> int:
    rows = {c: summarize(rs, meta["max_other"]) for c, rs in runs.items()}
    ratio_rows = ratios(runs, meta["max_other"])
    text = markdown(args.workload, rows, ratio_rows, meta)
    print(text)
    if args.no_write:
        return 0
    if not any(r.get("valid") for r in rows.values()):
        print("not written: no case was timed on a quiet machine", file=sys.stderr)
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.workload}.md").write_text(text)
    (RESULTS / f"{args.workload}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ratios": ratio_rows, "runs": runs}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
