"""Runs one experiment config: every method in it, trained and evaluated the same way.

    python -m experiments.run --config e1_topics --variant local [--methods lora,vera]

For each method it builds the adapters (plus a fully trained head where the task has one),
the method's optimizer (AdamW, warm-up + cosine schedule) and its train step, compiles the
step once per bucket length (batches are padded to the next of ``config.buckets`` only; the
longest bucket's executable gives XLA's cost/memory figures), trains with dropout from a
per-step key and a progress bar, evaluates the merged weights before and after (one
compiled evaluation per bucket for all methods), and writes under ``<out>/<experiment>/``:
``<method>/metrics.jsonl`` (every step and evaluation), ``<method>/adapters`` (the adapter
checkpoint) and ``results.json``. Everything is validated before any training starts:
the config's field types, method names, assets and mesh (:func:`validate`), then every
method built from shapes alone (:func:`validate_methods`). A step whose loss, gradients or
updates are not finite stops the run before it is checkpointed (``on_nonfinite``).
``--seeds N`` runs every method N times (seeds ``seed .. seed+N-1``, under
``<method>/seed<k>/``); the table then shows the mean ± std and the min–max over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import time
import warnings
from typing import Any

import jax
import optax
from tensorboardX import SummaryWriter
from tqdm import tqdm

import jaxlora as jl
from experiments import config as config_lib
from experiments.config import ExperimentConfig, MethodConfig
from experiments.report import table
from experiments.tasks import ASSETS, RULE_PRESETS, TASKS, Task, partition_rules
from jaxlora import assets, data, distributed
from jaxlora import sharding as sh
from jaxlora.adapters import full_leaves
from jaxlora.checkpoint import array_bytes, checkpoint_bytes
from jaxlora.methods import NAMES
from jaxlora.profiling import cost_of
from jaxlora.recipes import Recipe, default_optimizer
from jaxlora.train import split_trainable

SPECIAL = ("full", "linear_probe", "untrained")
"""Baselines the launcher adds to the registry's method names."""


class ConfigError(ValueError):
    """A config that cannot run; raised before any training."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or update (``on_nonfinite="stop"``)."""


def method_recipe(m: MethodConfig, task: Task) -> Recipe:
    """The method to train, with the task's head (if any) trained in full beside it."""
    if m.name == "full":
        return Recipe("full", jl.full(targets=".*"), default_optimizer)
    if m.name in ("linear_probe", "untrained"):
        return Recipe(m.name, jl.full(targets=task.head or "(?!)"), default_optimizer)
    return jl.recipe(m.name, **m.kwargs, train=task.head)  # None: no head to train


def validate(config: ExperimentConfig) -> None:
    """Fails fast, with a clear message, on anything that would stop a run midway."""
    try:
        config_lib.check_types(config)
    except TypeError as e:
        raise ConfigError(f"{getattr(config, 'name', config)}: {e}") from e
    if config.on_nonfinite not in config_lib.NONFINITE_POLICIES:
        raise ConfigError(
            f"{config.name}: on_nonfinite must be one of {config_lib.NONFINITE_POLICIES}, "
            f"got {config.on_nonfinite!r}"
        )
    for m in config.methods:
        if not (math.isfinite(m.learning_rate) and m.learning_rate >= 0):
            raise ConfigError(
                f"{config.name}: method {m.display!r}: learning_rate must be finite and >= 0, "
                f"got {m.learning_rate!r}"
            )
    if config.task not in TASKS:
        raise ConfigError(f"{config.name}: unknown task {config.task!r}; known: {sorted(TASKS)}")
    for m in config.methods:
        if m.name not in NAMES and m.name not in SPECIAL:
            raise ConfigError(
                f"{config.name}: unknown method {m.name!r}; known: {sorted([*NAMES, *SPECIAL])}"
            )
    for name in ASSETS[config.task]:
        try:
            assets.path(name)
        except assets.AssetNotFoundError as e:
            raise ConfigError(f"{config.name}: {e}") from e
    sizes = mesh_shape(config.mesh)
    if config.steps < 1 or config.batch_size < 1:
        raise ConfigError(f"{config.name}: steps and batch_size must be positive")
    if config.rules not in RULE_PRESETS[config.task]:
        raise ConfigError(
            f"{config.name}: rules {config.rules!r} not available for task {config.task!r}; "
            f"use one of {RULE_PRESETS[config.task]}"
        )
    shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if config.batch_size % shards:
        raise ConfigError(
            f"{config.name}: batch_size {config.batch_size} is not divisible by the "
            f"{shards} data/fsdp shards of mesh {sizes}"
        )


def validate_methods(config: ExperimentConfig, task: Task, methods) -> None:
    """Builds every method's adapters and optimizer state from shapes alone
    (``jax.eval_shape``), so a bad keyword, rank or target fails before any method trains."""
    key = jax.random.key(config.seed)
    for m in methods:
        try:
            recipe = method_recipe(m, task)
            _, adapters = jax.eval_shape(recipe.prepare, key, task.params)
            tx = recipe.optimizer(
                optax.adamw,
                learning_rate=_schedule(config, m.learning_rate),
                weight_decay=config.weight_decay,
            )
            jax.eval_shape(tx.init, adapters)
        except Exception as e:
            raise ConfigError(
                f"{config.name}: method {m.display!r} ({m.name}, {m.kwargs}) cannot be built: "
                f"{type(e).__name__}: {e}"
            ) from e


def _nonfinite(config, m, st: _State, metrics: dict[str, Any], saving: list[bool]) -> None:
    """Acts on a step whose ``finite`` flag is false, as ``config.on_nonfinite`` says."""
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
    what = (
        ", ".join(f"{k}={float(metrics[k])}" for k in bad)
        or "an update (loss and gradients finite)"
    )
    msg = f"{config.name}/{m.display}: step {st.step} is not finite: {what}"
    if config.on_nonfinite == "stop":
        raise NonFiniteError(
            f"{msg}; stopped before checkpointing it (set on_nonfinite='skip' to skip such "
            "steps, or 'warn' to train on)"
        )
    if config.on_nonfinite == "skip":
        tqdm.write(f"{msg}; skipped (the state is unchanged)")
        return
    if not saving[0]:  # warned already
        tqdm.write(msg)
        return
    saving[0] = False
    msg += "; training on (on_nonfinite='warn'), but writing no further checkpoints"
    warnings.warn(msg, stacklevel=2)


def mesh_shape(axes: dict[str, int]) -> dict[str, int]:
    """Resolves -1 in a mesh spec against the available devices, or raises ConfigError."""
    try:
        return sh.mesh_shape(axes, jax.device_count())
    except sh.ShardingError as e:
        raise ConfigError(f"mesh {axes} does not fit {jax.device_count()} device(s): {e}") from e


def _schedule(config: ExperimentConfig, lr: float):
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(config.steps, warmup + 1), end_value=0.1 * lr
    )


def evaluate(task: Task, run_eval, params, adapters, config: ExperimentConfig) -> dict[str, float]:
    """Sums ``task.eval_fn`` over the held-out set and finishes the metrics.

    It evaluates the merged weights (``jl.merge``: what export and inference use), so one
    jitted ``run_eval`` serves every method and seed: it compiles once per bucket length.
    """
    merged = jl.merge(params, adapters)
    sums: dict[str, float] = {}
    for batch in data.bucketed_sequential_batches(
        task.eval, config.eval_batch_size, config.buckets or (config.max_length,)
    ):
        out = run_eval(merged, batch)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in task.finish(sums).items()}


class _Log:
    """Every record to ``metrics.jsonl`` and its scalars to TensorBoard event files."""

    def __init__(self, directory: pathlib.Path):
        self.jsonl = (directory / "metrics.jsonl").open("w")
        self.tb = SummaryWriter(logdir=str(directory / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        for k, v in record.items():
            if k == "eval":
                for name, value in v.items():
                    self.tb.add_scalar(f"eval/{name}", value, step)
            elif k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _put_batch(batch: dict[str, Any], sharding) -> dict[str, Any]:
    """A host batch as global arrays split over the mesh's data/fsdp axes."""
    return distributed.put(batch, {k: sharding for k in batch})


def _latest_checkpoint_bytes(directory: pathlib.Path) -> int | None:
    steps = [p for p in directory.glob("*") if p.is_dir() and p.name.isdigit()]
    if not steps:
        return None
    return checkpoint_bytes(max(steps, key=lambda p: int(p.name)))


def _head_params(adapters: Any) -> int:
    return sum(x.size for x in full_leaves(adapters).values())


@dataclasses.dataclass
class _State:
    """One method's training state, placed in its shards."""

    recipe: Recipe
    tx: optax.GradientTransformation
    params: Any
    adapters: Any
    opt_state: Any
    shardings: dict[str, Any]
    batches: data.BucketedBatches
    train_step: Any  # the jitted sharded step (jaxlora.sharding.setup)
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _prepare(config: ExperimentConfig, m: MethodConfig, task: Task, key) -> _State:
    """Builds the method's adapters, optimizer and state, each directly in its shards."""
    recipe = method_recipe(m, task)
    params, adapters = recipe.prepare(key, task.params)
    tx = recipe.optimizer(
        optax.adamw,
        learning_rate=_schedule(config, m.learning_rate),
        weight_decay=config.weight_decay,
    )
    # base params by the config's rules, each adapter array like its kernel, optimizer
    # state like its parameter, batches over the data/fsdp axes; put() copies, so the
    # step may donate (and Delta-LoRA move) the base while the task's params stay intact
    run = sh.setup(
        task.loss_fn,
        tx,
        params,
        partition_rules(config.rules),
        jl.make_mesh(config.mesh),
        adapters=adapters,
        skip_nonfinite=config.on_nonfinite == "skip",
        with_rng=config.dropout,  # a per-step key for the model's and the low-rank dropout
    )
    params, adapters, opt_state = run.params, run.adapters, run.opt_state
    shardings = {
        "params": run.param_shardings,
        "adapters": run.adapter_shardings,
        "opt_state": run.opt_state_shardings,
        "batch": run.batch_sharding,
    }
    batches = data.BucketedBatches(
        task.train,
        batch_size=config.batch_size,
        seed=config.seed,
        buckets=config.buckets or (config.max_length,),
    )
    return _State(recipe, tx, params, adapters, opt_state, shardings, batches, run.step)


def _resume(st: _State, ckpt, method_dir: pathlib.Path) -> None:
    """Continues from the latest intact checkpoint (a corrupt newer one is skipped, with a
    warning): state, data position and the log so far."""
    restored = ckpt.restore(
        fallback=True,
        adapters=st.adapters,
        opt_state=st.opt_state,
        base=st.params,
        adapter_shardings=st.shardings["adapters"],
        opt_state_shardings=st.shardings["opt_state"],
    )
    st.params, st.adapters, st.opt_state = restored.base, restored.adapters, restored.opt_state
    st.step = restored.step
    st.batches.position = restored.data_position
    records = [json.loads(x) for x in (method_dir / "metrics.jsonl").read_text().splitlines()]
    st.history = [r for r in records if r["step"] == 0 or ("loss" in r and r["step"] <= st.step)]


class _Executables:
    """A method's compiled train steps, one per batch shape (bucket length), shared by its
    seeds: the step, its optimizer and shardings are the same for every seed."""

    def __init__(self):
        self.by_shape: dict[tuple, Any] = {}
        self.compile_s: list[float] = []

    def get(self, step, st: _State, batch: dict[str, Any], key) -> Any:
        shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if shape not in self.by_shape:
            args = (st.params, st.adapters, st.opt_state, batch) + (() if key is None else (key,))
            t0 = time.perf_counter()
            self.by_shape[shape] = step.lower(*args).compile()
            self.compile_s.append(time.perf_counter() - t0)
        return self.by_shape[shape]


def _step_key(key, step: int):
    """The dropout key of training step ``step`` (0-based): a pure function of the run's key
    and the step, so a resumed run draws the same masks as an uninterrupted one. (The run's
    key also initialises the adapters; the dropout stream is folded off it first.)"""
    return jax.random.fold_in(jax.random.fold_in(key, _DROPOUT_STREAM), step)


_DROPOUT_STREAM = 0x64726F70  # "drop"


def _train(
    config, m, task, st: _State, *, key, last, log, ckpt, eval_fn, quiet, row, executables
) -> list:
    """The training loop from ``st.step`` to ``last``; returns each step's wall time."""
    shd = st.shardings
    rng = config.dropout  # the step takes a per-step key (see _prepare)
    step = st.train_step
    # XLA's figures come from the longest bucket's executable (compiled first: every
    # method reports the same shape), the run compiles each other bucket when it first
    # comes up
    example = next(iter(data.sequential_batches(task.train, config.batch_size)))
    batch = _put_batch(example, shd["batch"])
    compiled = executables.get(step, st, batch, _step_key(key, 0) if rng else None)
    cost = cost_of(compiled)
    row.update(flops=cost.flops, temp_bytes=cost.temp_bytes)
    times = []
    saving = [True]  # False once a non-finite step was trained on (on_nonfinite="warn")
    bar = tqdm(
        range(st.step, last),
        initial=st.step,
        total=config.steps,
        desc=f"{config.name}/{m.display}",
        disable=quiet,
        unit="step",
        dynamic_ncols=True,
    )
    for i in bar:
        batch = _put_batch(next(st.batches), shd["batch"])
        extra = (_step_key(key, i),) if rng else ()
        compiled = executables.get(step, st, batch, extra[0] if extra else None)
        t0 = time.perf_counter()
        st.params, st.adapters, st.opt_state, metrics = compiled(
            st.params, st.adapters, st.opt_state, batch, *extra
        )
        loss = float(metrics["loss"])  # blocks: the step is finished
        dt = time.perf_counter() - t0
        times.append(dt)
        st.step = i + 1
        if not bool(metrics["finite"]):
            _nonfinite(config, m, st, metrics, saving)
        tok_s = config.batch_size * int(batch["input_ids"].shape[1]) / dt
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        record = {
            "step": st.step,
            "loss": loss,
            "time_s": dt,
            "tokens_per_s": tok_s,
            "length": int(batch["input_ids"].shape[1]),  # the batch's bucket
        }
        if config.eval_every and st.step % config.eval_every == 0 and st.step < config.steps:
            record["eval"] = evaluate(task, eval_fn, st.params, st.adapters, config)
        log.write(record)
        st.history.append(record)
        every = config.checkpoint_every
        if saving[0] and ((every and st.step % every == 0) or st.step == config.steps):
            ckpt.save(
                st.step,
                adapters=st.adapters,
                opt_state=st.opt_state,
                rng=key,
                data_position=st.batches.position,
                base=st.params,
                metrics={"loss": loss},
            )
            ckpt.wait()  # the next step donates these buffers: the host copy must be done
    bar.close()
    return times


def run_method(
    config: ExperimentConfig,
    m: MethodConfig,
    task: Task,
    out_dir: pathlib.Path,
    *,
    quiet: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    eval_fn=None,
    executables: _Executables | None = None,
    method_dir: pathlib.Path | None = None,
) -> dict[str, Any]:
    """Trains and evaluates one method with ``config.seed``; returns its results.

    With ``resume`` it continues from the method's latest checkpoint (adapters, optimizer
    state, moved base, data position; the dropout key of each step is derived from the
    seed and the step), bit-for-bit as if never stopped. ``stop_after`` ends the run after
    that many steps in total, as an interruption would (for tests). ``eval_fn`` and
    ``executables`` let several runs share compiled code (:func:`run` passes them).
    """
    key = jax.random.key(config.seed)
    st = _prepare(config, m, task, key)
    eval_fn = eval_fn or jax.jit(task.eval_fn)
    executables = executables or _Executables()
    compiles_before = len(executables.compile_s)
    method_dir = method_dir or out_dir / m.display
    method_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = method_dir / "checkpoints"
    manager = jl.CheckpointManager(
        ckpt_dir, max_to_keep=2, method=st.recipe.method, store_base=st.recipe.moves_base
    )
    with manager as ckpt:
        if resume and ckpt.latest_step() is not None:
            _resume(st, ckpt, method_dir)
        if st.history:
            before = st.history[0]["eval"]
        else:
            before = evaluate(task, eval_fn, st.params, st.adapters, config)
            st.history.append({"step": 0, "eval": before})
        trainable = jl.num_trainable(st.adapters)
        row: dict[str, Any] = {
            "method": m.display,
            "seed": config.seed,
            "trainable_params": trainable if m.name != "untrained" else 0,
            "method_params": trainable - _head_params(st.adapters)
            if m.name != "full"
            else trainable,
            "before": before,
        }
        last = min(config.steps, stop_after or config.steps)
        times: list[float] = []
        with _Log(method_dir) as log:
            for record in st.history:
                log.write(record)
            if m.name != "untrained":
                times = _train(
                    config,
                    m,
                    task,
                    st,
                    key=key,
                    last=last,
                    log=log,
                    ckpt=ckpt,
                    eval_fn=eval_fn,
                    quiet=quiet,
                    row=row,
                    executables=executables,
                )
                after = evaluate(task, eval_fn, st.params, st.adapters, config)
            else:
                after = before
            log.write({"step": last, "eval": after})
    # the first step includes the transfer of freshly created buffers: leave it out
    steady = times[1:] or times
    row.update(
        after=after,
        losses=[r["loss"] for r in st.history if "loss" in r],
        median_step_s=statistics.median(steady) if steady else None,
        train_s=sum(times),
        compiles=len(executables.compile_s) - compiles_before,
        compile_s=sum(executables.compile_s[compiles_before:]),
        trainable_bytes=array_bytes(split_trainable(st.adapters, st.adapters)[0]),
        checkpoint_bytes=_latest_checkpoint_bytes(ckpt_dir),
    )
    if task.sample is not None and config.generate_prompts:
        row["samples_before"] = task.sample(task.params)
        row["samples_after"] = task.sample(jl.merge(st.params, st.adapters))
    return row


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row from its per-seed runs: metrics as the mean over seeds, with their
    spread (``after_spread[metric] = {mean, std, min, max}``; std is the sample standard
    deviation over seeds), the mean loss curve, and each run under ``runs``."""
    first = runs[0]
    row = {k: v for k, v in first.items() if k not in ("seed", "losses")}
    row["seeds"] = [r["seed"] for r in runs]
    for when in ("before", "after"):
        row[when] = {k: statistics.fmean(r[when][k] for r in runs) for k in first[when]}
        row[f"{when}_spread"] = {k: _spread([r[when][k] for r in runs]) for k in first[when]}
    n = min(len(r["losses"]) for r in runs)
    row["losses"] = [statistics.fmean(r["losses"][i] for r in runs) for i in range(n)]
    row["losses_min"] = [min(r["losses"][i] for r in runs) for i in range(n)]
    row["losses_max"] = [max(r["losses"][i] for r in runs) for i in range(n)]
    times = [r["median_step_s"] for r in runs if r.get("median_step_s")]
    row["median_step_s"] = statistics.median(times) if times else None
    row["compiles"] = sum(r.get("compiles", 0) for r in runs)
    row["compile_s"] = sum(r.get("compile_s", 0.0) for r in runs)
    row["train_s"] = sum(r.get("train_s", 0.0) for r in runs)
    row["runs"] = [
        {k: r[k] for k in ("seed", "before", "after", "median_step_s", "train_s") if k in r}
        for r in runs
    ]
    return row


def relative_to_full(rows: list[dict[str, Any]]) -> None:
    """Adds each row's step time and XLA temp memory relative to full fine-tuning's row."""
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        if full is not None and r.get("median_step_s") and full.get("median_step_s"):
            r["time_vs_full"] = r["median_step_s"] / full["median_step_s"]
            r["temp_mem_vs_full"] = r["temp_bytes"] / max(full["temp_bytes"], 1)


def run(
    config: ExperimentConfig,
    out: pathlib.Path,
    *,
    methods=None,
    quiet=False,
    resume=False,
    stop_after=None,
    seeds: int = 1,
):
    """Runs every method of ``config`` (or the named subset) and writes ``results.json``.

    With ``seeds > 1`` every method runs once per seed ``config.seed + i`` (adapter
    init, data order and dropout differ; the task, its split, training subset
    and head init stay those of ``config.seed``), each under ``<method>/seed<k>/``, and its
    row holds the mean over seeds with the spread (:func:`aggregate`). A method's seeds
    share its compiled steps, and all methods share the compiled evaluation, so the
    compiles are (number of buckets used) per method plus one evaluation per bucket.
    """
    validate(config)
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ConfigError(f"{config.name}: seeds must be a positive integer, got {seeds!r}")
    chosen = [m for m in config.methods if methods is None or m.display in methods]
    if methods is not None and len(chosen) != len(methods):
        known = [m.display for m in config.methods]
        raise ConfigError(f"{config.name}: methods {methods} not all in the config's {known}")
    task = TASKS[config.task](config)
    validate_methods(config, task, chosen)
    out_dir = out / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_fn = jax.jit(task.eval_fn)  # on merged weights: one compilation for every method
    rows = []
    for m in chosen:
        executables = _Executables()
        runs = [
            run_method(
                dataclasses.replace(config, seed=config.seed + i),
                m,
                task,
                out_dir,
                quiet=quiet,
                resume=resume,
                stop_after=stop_after,
                eval_fn=eval_fn,
                executables=executables,
                method_dir=out_dir / m.display / f"seed{config.seed + i}" if seeds > 1 else None,
            )
            for i in range(seeds)
        ]
        rows.append(aggregate(runs))
    relative_to_full(rows)
    steps_per_epoch = -(-len(task.train[next(iter(task.train))]) // config.batch_size)
    result = {
        "config": dataclasses.asdict(config),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "seeds": seeds,
        "train_examples": len(task.train[next(iter(task.train))]),
        "eval_examples": len(task.eval[next(iter(task.eval))]),
        "epochs": config.steps / steps_per_epoch,
        "eval_compiles": len(
            {
                tuple(sorted((k, v.shape) for k, v in b.items()))
                for b in data.bucketed_sequential_batches(
                    task.eval, config.eval_batch_size, config.buckets or (config.max_length,)
                )
            }
        ),
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run one experiment config.")
    ap.add_argument("--config", required=True, help="module name in experiments/configs")
    ap.add_argument("--variant", default="local", help="local (CPU, minutes) or full")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--out", default="results", help="results directory")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    ap.add_argument("--seeds", type=int, default=1, help="runs per method (seed, seed+1, ...)")
    args = ap.parse_args(argv)
    distributed.initialize()  # a no-op for one process; joins the pod/cluster otherwise
    config = config_lib.load(args.config, args.variant)
    methods = None if args.methods is None else args.methods.split(",")
    result = run(
        config, pathlib.Path(args.out), methods=methods, resume=args.resume, seeds=args.seeds
    )
    print(table([result]))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
