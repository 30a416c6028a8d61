"""jaxlora against full fine-tuning and against its peers, side by side in one run.

One Llama-style decoder (16.8M params: vocab 4096, d=512, MLP 1376, 4 layers, 8 heads), one
batch (4 x 128) and the same weights for every contestant:

* jaxlora train steps: full fine-tuning (gradient of every parameter, AdamW on all), the
  input-only floor (forward + activation backward, no weight gradient; ``bench_core``),
  LoRA (attention and all-linear targets), LoRA-FA, VeRA, Delta-LoRA and DoRA
  (all-linear, hyper-parameters of ``compare_methods``);
* Hugging Face PEFT LoRA on ``transformers.LlamaForCausalLM`` (torch eager, sdpa attention,
  ``torch.set_num_threads`` = the cores XLA uses, AdamW), attention and all-linear;
* Qwix LoRA on a Flax NNX model of the same architecture (``scripts/_bench_peers.py``).

Step times are measured in one process with the cases interleaved round by round (the
machine is shared, so load drifts; interleaving spreads it over every case), after
compilation and warm-up, and reported as median (min, max) and as ratios. Flops and
temp/argument memory come from XLA's compiled program. Peak RSS is measured per case in a
fresh subprocess: its RSS before building anything is the baseline, the peak is reset after
compile and warm-up (``/proc/self/clear_refs``), and the figure reported is the peak over
a few steps minus the baseline, so compilation and the other cases do not count.

Usage::

    python scripts/bench.py                # the 16.8M model; writes benchmarks/results.{md,json}
    python scripts/bench.py --quick        # a small model and few steps (CI), prints only
    python scripts/bench.py --gpu          # ~1.1B-param Llama in bfloat16 with MFU (GPU host)
    python scripts/bench.py --preset tiny --dtype bfloat16   # the GPU path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench_peers as peers
import bench_core
import compare_methods
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora as jl
from jaxlora.models import llama
from jaxlora.profiling import CompiledCost, cost_of

RANK, ALPHA = compare_methods.RANK, 2.0 * compare_methods.RANK
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01  # torch.optim.AdamW's default decay, used by all

PRESETS: dict[str, llama.LlamaConfig] = {
    "16m": bench_core.FULL_CONFIG,
    "quick": bench_core.QUICK_CONFIG,
    "tiny": llama.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2,
    ),
    # TinyLlama-1.1B's shape: grouped-query attention, 22 layers
    "1b": llama.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
        num_heads=32, num_kv_heads=4,
    ),
}  # fmt: skip
BATCH = {"16m": (4, 128), "quick": (2, 64), "tiny": (2, 32), "1b": (8, 1024)}

JAXLORA_METHODS = ("lora_fa", "vera", "delta_lora", "dora")
JAXLORA_CASES = ("full", "input-only", "lora attention", "lora all-linear", *JAXLORA_METHODS)
PEER_CASES = ("peft attention", "peft all-linear", "qwix attention", "qwix all-linear")
ALL_CASES = JAXLORA_CASES + PEER_CASES

# Dense bf16 peak of accelerators, for MFU (override with --peak-tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclasses.dataclass
class Runner:
    """One contestant: ``step()`` runs one train step, blocks until done, returns the loss."""

    name: str
    family: str
    step: Callable[[], float]
    trainable: int
    cost: CompiledCost | None = None


class Setup:
    """The model, weights and batch shared by every case (built once per process)."""

    def __init__(self, config: llama.LlamaConfig, batch: int, seq: int):
        self.config, self.batch, self.seq = config, batch, seq
        # the keys bench_core uses, so its input-only case sees the same weights and batch
        self.ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
        self._params = None

    def params(self) -> Any:
        """The base parameters, shared by the cases that do not donate them."""
        if self._params is None:
            self._params = self.fresh_params()
        return self._params

    def fresh_params(self) -> Any:
        """A private copy for a case that donates (updates in place) its base."""
        return llama.init_params(jax.random.key(0), self.config)

    def release(self) -> None:
        self._params = None

    @property
    def loss(self):
        return bench_core.llama_loss(self.config)


def _compiled(jitted, args) -> tuple[Any, CompiledCost]:
    compiled = jitted.lower(*args).compile()
    return compiled, cost_of(compiled)


def _jax_runner(
    name, jitted, state: list, thread: Callable, trainable: int, family: str = "jaxlora"
) -> Runner:
    """Compiles a jitted step; ``thread(state, out)`` gives the next arguments and the loss."""
    compiled, cost = _compiled(jitted, state)

    def step() -> float:
        out = jax.block_until_ready(compiled(*state))
        state[:], loss = thread(state, out)
        return float(loss)

    return Runner(name, family, step, trainable, cost)


def _full(s: Setup) -> Runner:
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    full_step = bench_core.full_finetune_step(s.loss, tx)
    params = s.fresh_params()
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    state = [params, tx.init(params), {"ids": s.ids}]
    jitted = jax.jit(full_step, donate_argnums=(0, 1))
    return _jax_runner("full", jitted, state, lambda st, o: ([o[0], o[1], st[2]], o[2]), n)


def _input_only(s: Setup) -> Runner:
    (case,) = bench_core.build_cases(s.config, s.batch, s.seq, names={"input-only"})
    return _jax_runner("input-only", case.step, list(case.args), lambda st, o: (st, o[0]), 0)


def _method(s: Setup, name: str, label: str, kw: dict[str, Any]) -> Runner:
    recipe = jl.recipe(name, **kw)
    # the step donates the base (and Delta-LoRA moves it): every runner gets its own copy
    base, adapters = recipe.prepare(jax.random.key(2), s.fresh_params())
    tx = recipe.optimizer(optax.adamw, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    state = [base, adapters, tx.init(adapters), {"ids": s.ids}]
    jitted = jl.train_step(s.loss, tx)  # -> (params, adapters, opt_state, metrics)
    thread = lambda st, o: ([o[0], o[1], o[2], st[3]], o[3]["loss"])
    return _jax_runner(label, jitted, state, thread, jl.num_trainable(adapters))


def _lora(s: Setup, targets: str) -> Runner:
    kw = dict(rank=RANK, alpha=ALPHA, targets=bench_core.ATTENTION)
    if targets == "all-linear":
        kw = compare_methods.method_kwargs("lora")
    return _method(s, "lora", f"lora {targets}", kw)


def _peft(s: Setup, targets: str) -> Runner:
    step, n = peers.peft_step(
        s.config, s.params(), np.asarray(s.ids), targets=targets, **_peer_kwargs()
    )
    return Runner(f"peft {targets}", "peft", step, n)


def _qwix(s: Setup, targets: str) -> Runner:
    jitted, state = peers.qwix_train_step(
        s.config, s.params(), s.ids, targets=targets, **_peer_kwargs()
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(state[0]))
    thread = lambda st, o: ([o[0], o[1], st[2], st[3]], o[2])
    return _jax_runner(f"qwix {targets}", jitted, state, thread, n, family="qwix")


def _peer_kwargs() -> dict[str, Any]:
    return dict(rank=RANK, alpha=ALPHA, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def build(setup: Setup, name: str) -> Runner:
    """Builds (and compiles) the named case."""
    if name == "full":
        return _full(setup)
    if name == "input-only":
        return _input_only(setup)
    family, _, targets = name.partition(" ")
    if family == "lora":
        return _lora(setup, targets)
    if family == "peft":
        return _peft(setup, targets)
    if family == "qwix":
        return _qwix(setup, targets)
    if name in JAXLORA_METHODS:
        return _method(setup, name, name, compare_methods.method_kwargs(name))
    raise ValueError(f"unknown case {name!r}; known: {list(ALL_CASES)}")


# ------------------------------------------------------------------------------- timing


PAUSE_S = 0.05


def _pause() -> None:
    """Lets the previous step's worker threads go to sleep before the next step starts.

    XLA's and torch's CPU pools both spin for a while after their work runs out. With the
    two libraries in one process on few cores, a step that starts while the other pool
    still spins loses its cores: a 10 ms PEFT step took 1.4 s right after a JAX step, and
    10 ms with a 10 ms pause between them. The pause is outside the timed region.
    """
    time.sleep(PAUSE_S)


def time_interleaved(
    runners: list[Runner], steps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, float], list[float]]:
    """Step times per case, round-robin (the starting case rotates every round).

    Returns ``(times, step-0 losses, 1-minute load averages sampled every round)``.
    """
    first = {}
    for r in runners:
        losses = []
        for _ in range(warmup):
            _pause()
            losses.append(r.step())
        first[r.name] = losses[0]
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    loads = []
    for i in range(steps):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            _pause()
            t0 = time.perf_counter()
            r.step()
            times[r.name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    return times, first, loads


# --------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _trim() -> None:
    """Returns freed heap to the OS, so RSS is what is live rather than what malloc kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_rss(setup: Setup, name: str, steps: int = 3) -> dict[str, float]:
    """Peak memory of one case's train steps; run it in a fresh process (``--rss-case``).

    Compilation leaves heap behind (LLVM, XLA's passes) that is no part of a step's memory,
    and glibc keeps some of it whatever ``malloc_trim`` does. So the step's memory is read
    as a difference taken *after* the steps: the peak RSS over ``steps`` steps (VmHWM reset
    once compile and warm-up are done) minus the RSS once everything the case holds
    (weights, adapters, optimizer state, the executable) has been freed again.

    Returns MiB: ``step`` (that difference), ``step_peak``, ``after_free``, ``baseline``
    (RSS with the libraries loaded and nothing built) and ``process_peak`` (VmHWM including
    compilation); on an accelerator also ``device_peak`` (the allocator's peak bytes).
    """
    if name.startswith("peft"):
        import peft  # noqa: F401  (loaded before the baseline, like jax below)
        import torch  # noqa: F401
        import transformers  # noqa: F401
    if name.startswith("qwix"):
        import qwix  # noqa: F401
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))  # start the runtime
    _trim()
    baseline = _status_kib("VmRSS")
    runner = build(setup, name)
    for _ in range(2):
        _pause()
        runner.step()
    _trim()
    process_peak = _status_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        _pause()
        runner.step()
    peak = _status_kib("VmHWM")
    stats = jax.devices()[0].memory_stats() or {}
    del runner
    setup.release()
    _trim()
    after = _status_kib("VmRSS")
    out = dict(
        step=(peak - after) / 1024,
        step_peak=peak / 1024,
        after_free=after / 1024,
        baseline=baseline / 1024,
        process_peak=max(process_peak, peak) / 1024,
    )
    if "peak_bytes_in_use" in stats and jax.default_backend() != "cpu":
        out["device_peak"] = stats["peak_bytes_in_use"] / 2**20
    return out


def rss_in_subprocess(name: str, argv: list[str]) -> dict[str, float] | str:
    """Runs ``--rss-case name`` in a fresh interpreter; the dict, or the error text."""
    cmd = [sys.executable, __file__, *argv, "--rss-case", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS_JSON "):
            return json.loads(line[len("RSS_JSON ") :])
    return (proc.stderr.strip().splitlines() or ["no output"])[-1]


# ------------------------------------------------------------------------------ report


def _peak_flops(peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if jax.default_backend() == "cpu":
        return None
    kind = jax.devices()[0].device_kind
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), None)


def summarise(setup, runners, times, first, rss, peak_flops) -> list[dict[str, Any]]:
    tokens = setup.batch * setup.seq
    rows = []
    for r in runners:
        t = times[r.name]
        med = statistics.median(t)
        row = dict(
            case=r.name,
            family=r.family,
            trainable=r.trainable,
            step0_loss=first[r.name],
            median_s=med,
            min_s=min(t),
            max_s=max(t),
            tokens_per_s=tokens / med,
            flops=r.cost.flops if r.cost else None,
            temp_bytes=r.cost.temp_bytes if r.cost else None,
            argument_bytes=r.cost.argument_bytes if r.cost else None,
            rss_mib=rss.get(r.name),
        )
        if peak_flops and r.cost:
            row["mfu"] = r.cost.flops / med / peak_flops
        rows.append(row)
    full = next((x for x in rows if x["case"] == "full"), None)
    for row in rows:
        if full is None:
            continue
        row["time_ratio"] = row["median_s"] / full["median_s"]
        if row["flops"] is not None:
            row["flops_ratio"] = row["flops"] / full["flops"]
        if isinstance(row["rss_mib"], dict) and isinstance(full["rss_mib"], dict):
            row["rss_ratio"] = row["rss_mib"]["step"] / full["rss_mib"]["step"]
        if row["temp_bytes"] is not None:
            mem = row["temp_bytes"] + row["argument_bytes"]
            row["xla_mem_ratio"] = mem / (full["temp_bytes"] + full["argument_bytes"])
    return rows


def peer_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """tokens/s of jaxlora LoRA over each peer's, per target set."""
    by = {r["case"]: r for r in rows}
    out = {}
    for targets in ("attention", "all-linear"):
        ours = by.get(f"lora {targets}")
        for peer in ("peft", "qwix"):
            theirs = by.get(f"{peer} {targets}")
            if ours and theirs:
                out[f"{peer} {targets}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return out


TARGETS = [  # (description, how to read it off the rows, bound)
    ("LoRA attention step time / full", lambda b, p: b["lora attention"]["time_ratio"], 0.66),
    ("LoRA all-linear step time / full", lambda b, p: b["lora all-linear"]["time_ratio"], 0.66),
    ("LoRA attention tokens/s / PEFT", lambda b, p: p["peft attention"], 1.25),
    ("LoRA all-linear tokens/s / PEFT", lambda b, p: p["peft all-linear"], 1.25),
    ("LoRA attention tokens/s / Qwix", lambda b, p: p["qwix attention"], 1.1),
    ("LoRA all-linear tokens/s / Qwix", lambda b, p: p["qwix all-linear"], 1.1),
    ("LoRA attention peak step RSS / full", lambda b, p: b["lora attention"]["rss_ratio"], 0.65),
    ("LoRA all-linear peak step RSS / full", lambda b, p: b["lora all-linear"]["rss_ratio"], 0.65),
]


def check_targets(rows, ratios) -> list[dict[str, Any]]:
    by = {r["case"]: r for r in rows}
    out = []
    for desc, get, bound in TARGETS:
        try:
            value = get(by, ratios)
        except KeyError:
            continue  # a case that was not run, or a failed measurement
        upper = "step" in desc  # time and memory ratios are upper bounds, speed-ups lower
        met = value <= bound if upper else value >= bound
        out.append(dict(target=desc, value=value, bound=("≤ " if upper else "≥ ") + str(bound),
                        met=bool(met)))  # fmt: skip
    return out


def _fmt(x, spec=".3f", none="—"):
    return none if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["rows"]
    lines = [
        f"# jaxlora benchmarks ({result['preset']}, {result['dtype']})",
        "",
        f"Model: {result['params'] / 1e6:.1f}M params, {result['config']['num_layers']} x "
        f"{result['config']['hidden_size']} (MLP {result['config']['intermediate_size']}, "
        f"vocab {result['config']['vocab_size']}), batch {result['batch']} x {result['seq']}; "
        f"LoRA rank {RANK}, alpha {ALPHA:g} (VeRA rank {compare_methods.VERA_RANK}); AdamW.",
        f"Machine: {m['backend']} ({m['device']}), {m['cores']} cores, torch threads "
        f"{m['torch_threads']}; jax {m['jax']}, torch {m.get('torch', '—')}, transformers "
        f"{m.get('transformers', '—')}, peft {m.get('peft', '—')}, qwix {m.get('qwix', '—')}.",
        f"Load average (1 min) at start {m['load_start']:.2f}, during timing median "
        f"{m['load_median']:.2f} (max {m['load_max']:.2f}), at end {m['load_end']:.2f}. "
        f"{result['steps']} timed steps per case after {result['warmup']} warm-up, "
        "interleaved round-robin in one process.",
        "",
        "| case | trainable | flops / full | XLA temp + arg MiB | step RSS MiB | RSS / full "
        "| median ms (min–max) | time / full | tokens/s"
        + (" | MFU" if result["mfu"] else "")
        + " | step-0 loss |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if result["mfu"] else "") + "---|",
    ]
    for r in rows:
        xla = None if r["temp_bytes"] is None else (r["temp_bytes"] + r["argument_bytes"]) / 2**20
        rss = r["rss_mib"]["step"] if isinstance(r["rss_mib"], dict) else None
        lines.append(
            f"| {r['case']} | {r['trainable']:,} | {_fmt(r.get('flops_ratio'))} "
            f"| {_fmt(xla, '.1f')} | {_fmt(rss, '.1f')} | {_fmt(r.get('rss_ratio'))} "
            f"| {1e3 * r['median_s']:.1f} ({1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f}) "
            f"| {_fmt(r.get('time_ratio'))} | {r['tokens_per_s']:,.0f}"
            + (f" | {_fmt(r.get('mfu'), '.1%')}" if result["mfu"] else "")
            + f" | {r['step0_loss']:.5f} |"
        )
    if result["peer_ratios"]:
        lines += ["", "| jaxlora LoRA tokens/s over | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["peer_ratios"].items()]
    if result["targets"]:
        lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['value']:.3f} | {t['bound']} | {'yes' if t['met'] else 'no'} |"
            for t in result["targets"]
        ]
    if result["errors"]:
        lines += ["", "Failed measurements:"]
        lines += [f"- {k}: {v}" for k, v in result["errors"].items()]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("jax", "flax", "optax", "torch", "transformers", "peft", "qwix"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


# --------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (CI)")
    ap.add_argument("--gpu", action="store_true", help="--preset 1b --dtype bfloat16, MFU")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {list(ALL_CASES)}")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-case RSS subprocesses")
    ap.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: "
                    "benchmarks/results for full runs, nothing for --quick)")  # fmt: skip
    ap.add_argument("--rss-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("1b" if args.gpu else "quick" if args.quick else "16m")
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    default_batch, default_seq = BATCH[args.preset]
    args.batch, args.seq = args.batch or default_batch, args.seq or default_seq
    args.steps = args.steps or (3 if args.quick else 15)
    return args


def _setup(args) -> Setup:
    config = dataclasses.replace(PRESETS[args.preset], dtype=args.dtype, param_dtype=args.dtype)
    return Setup(config, args.batch, args.seq)


def _case_names(args) -> list[str]:
    if args.cases:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
    else:
        names = list(ALL_CASES)
    unknown = sorted(set(names) - set(ALL_CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(ALL_CASES)}")
    on_cpu = jax.default_backend() == "cpu"
    # torch here is a CPU build: against JAX on an accelerator it would measure the host
    return [n for n in names if on_cpu or not n.startswith("peft")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark described by ``args`` (see :func:`parse_args`); returns the result."""
    load_start = os.getloadavg()[0]
    setup = _setup(args)
    names = _case_names(args)
    rss: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if not args.no_rss:
        argv = ["--preset", args.preset, "--dtype", args.dtype, "--batch", str(args.batch),
                "--seq", str(args.seq)]  # fmt: skip
        for name in names:
            got = rss_in_subprocess(name, argv)
            if isinstance(got, dict):
                rss[name] = got
            else:
                errors[f"{name} RSS"] = got
    runners = []
    for name in names:
        try:
            runners.append(build(setup, name))
        except Exception as e:  # a peer that cannot run is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
    times, first, loads = time_interleaved(runners, args.steps, args.warmup)
    peak = _peak_flops(args.peak_tflops)
    rows = summarise(setup, runners, times, first, rss, peak)
    ratios = peer_ratios(rows)
    versions = _versions()
    dev = jax.devices()[0]
    return dict(
        preset=args.preset,
        dtype=args.dtype,
        config=dataclasses.asdict(setup.config),
        params=sum(x.size for x in jax.tree_util.tree_leaves(setup.params())),
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        mfu=peak is not None,
        machine=dict(
            backend=jax.default_backend(),
            device=getattr(dev, "device_kind", str(dev)),
            cores=peers.torch_threads(),
            torch_threads=peers.torch_threads() if "torch" in versions else None,
            platform=platform.platform(),
            load_start=load_start,
            load_median=statistics.median(loads) if loads else load_start,
            load_max=max(loads, default=load_start),
            load_end=os.getloadavg()[0],
            **versions,
        ),
        rows=rows,
        peer_ratios=ratios,
        targets=check_targets(rows, ratios),
        errors=errors,
    )


def main(argv=None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.rss_case:
        print("RSS_JSON " + json.dumps(measure_rss(_setup(args), args.rss_case)), flush=True)
        return None
    result = run(args)
    text = markdown(result)
    print(text)
    out = args.out or (None if args.quick else "benchmarks/results")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
