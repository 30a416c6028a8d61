"""Will it fit? Compile a sharded train step for a model shape and mesh, nothing allocated.

The parameters, adapters and optimizer state are ``jax.ShapeDtypeStruct`` trees
(``jax.eval_shape``), the mesh is made of fake CPU devices, and the step is lowered and
compiled exactly as a pod run would compile it (bf16 base, f32 adapters, scanned layers,
each layer rematerialised, per-layer FSDP gathers, AdamW). The script prints, per device,
what XLA's ``memory_analysis()`` reports (arguments, outputs, temporaries, and the peak they
add up to), the bytes all-gathered and reduced per step (from the compiled HLO, loop bodies
weighted by their trip counts) and an analytic expectation beside it:

    weights/N + unscanned leaves gathered + one layer gathered + adapters and optimizer
    state + their gradients + activations (layer inputs kept by remat, one layer's working set,
    the logits)

These are compile-time estimates of the XLA CPU backend's buffer assignment; a TPU or GPU
compiler schedules differently (its figures are the ones to trust once a device is at
hand), but what scales with the model and the mesh scales the same way. XLA:CPU has no
bf16 arithmetic (it rewrites every bf16 instruction to f32), which costs it bytes a TPU
or GPU does not spend; those it spends at these shapes are read off the compiled HLO and
printed as separate terms (:func:`cpu_artefacts`), and the ratio is given both against
the expectation alone and against the expectation plus them.

Usage (the script sets ``XLA_FLAGS`` for the fake devices itself, before JAX starts)::

    python scripts/plan.py --model llama3-8b --mesh fsdp=8 --method lora full
    python scripts/plan.py --model tinyllama-1.1b --mesh fsdp=4,tensor=2 data=2,fsdp=4
    python scripts/plan.py --hf-config path/to/config.json --mesh fsdp=64 --batch 64

A mesh is ``axis=size`` pairs over ``data``, ``fsdp`` and ``tensor``; ``tensor > 1`` selects
the ``fsdp_tp`` partition preset, otherwise ``fsdp``. For one's own pod slice, give its
mesh (e.g. ``fsdp=256`` for a v5e-256, or ``data=4,fsdp=64``): the fake devices are as many
as the largest mesh asks for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not size.isdigit():
            raise SystemExit(f"bad mesh {text!r}: expected e.g. 'fsdp=4,tensor=2'")
        sizes[name] = int(size)
    return sizes


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3-8b", help="a named shape (see MODELS)")
    p.add_argument("--hf-config", help="a Hugging Face config.json instead of --model")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--mesh", nargs="+", default=["fsdp=8"], type=_parse_mesh)
    p.add_argument("--method", nargs="+", default=["lora", "vera", "dora", "full"])
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length")
    p.add_argument("--rank", type=int, default=16, help="LoRA/DoRA rank (VeRA: 256)")
    p.add_argument("--no-per-layer", action="store_true", help="gather scanned stacks whole")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    # the fake devices must exist before JAX starts
    devices = max(math.prod(m.values()) for m in ARGS.mesh)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

# this checkout's jaxlora, not whichever one is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxlora as jl  # noqa: E402
from jaxlora import profiling  # noqa: E402
from jaxlora import sharding as sh  # noqa: E402
from jaxlora.keypaths import path_str  # noqa: E402
from jaxlora.models import llama  # noqa: E402
from jaxlora.sharding.rules import entry_axes  # noqa: E402
from jaxlora.targets import stacked  # noqa: E402
from jaxlora.train import split_trainable  # noqa: E402

_COMMON = dict(scan_layers=True, remat=True, dtype="bfloat16", param_dtype="bfloat16")
MODELS: dict[str, llama.LlamaConfig] = {
    "smollm2-135m": llama.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        **_COMMON,
    ),
    "tinyllama-1.1b": llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        rms_norm_eps=1e-5,
        **_COMMON,
    ),
    "llama3-8b": llama.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        **_COMMON,
    ),
}
"""Model shapes by name, as the planner compiles them (scanned, remat, bf16)."""

GIB = 2**30


def method_of(name: str, rank: int) -> jl.Method:
    """The adapters of a planner method: all-linear LoRA/VeRA/DoRA, or every leaf (full)."""
    if name == "lora":
        return jl.lora(rank=rank, alpha=2.0 * rank, targets=stacked("all-linear"))
    if name == "dora":
        return jl.dora(rank=rank, alpha=2.0 * rank, targets=stacked("all-linear"))
    if name == "vera":
        return jl.vera(rank=256, targets=stacked("all-linear"))
    if name == "full":
        return jl.full(targets=".*")
    raise SystemExit(f"unknown method {name!r}: choose lora, vera, dora or full")


def _f32(tree):
    # low-rank adapters train in float32 over the bf16 base
    def cast(x):
        dtype = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype)

    return jax.tree_util.tree_map(cast, tree)


def _bytes_at_rest(shapes, shardings) -> int:
    """Bytes per device of ``shapes`` stored in ``shardings``."""
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(tuple(x.shape))
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _gathered_bytes(x, s, gather=("fsdp",)) -> int:
    """Bytes per device of one leaf once its ``gather`` axes are all-gathered."""
    mesh = dict(s.mesh.shape)
    n = math.prod(
        mesh[a] for e in s.spec if e is not None for a in entry_axes(e) if a not in gather
    )
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // n


def analytic(plan: Plan) -> dict[str, int]:
    """The expected per-device bytes, term by term (see the module docstring)."""
    c, mesh = plan.config, plan.mesh
    tp = dict(mesh.shape)["tensor"]
    leaves = jax.tree_util.tree_flatten_with_path(plan.params)[0]
    psh = jax.tree_util.tree_leaves(plan.param_shardings)
    fsdp = [("fsdp" in str(s.spec), path_str(kp), x, s) for (kp, x), s in zip(leaves, psh)]
    unscanned = sum(
        _gathered_bytes(x, s) for split, p, x, s in fsdp if split and p not in plan.scanned
    )
    layer = sum(_gathered_bytes(x, s) for _, p, x, s in fsdp if p in plan.scanned) // c.num_layers
    trainable, _ = split_trainable(plan.adapters, plan.adapters)
    trainable_sh, _ = split_trainable(plan.adapter_shardings, plan.adapters)
    state = _bytes_at_rest(plan.adapters, plan.adapter_shardings) + _bytes_at_rest(
        plan.opt_state, plan.opt_state_shardings
    )
    b = plan.local_batch
    tokens, act = b * plan.seq, 2  # bf16 activations
    kv = c.num_kv_heads * c.head_dim
    # remat keeps each layer's input; the backward recomputes one layer at a time
    kept = c.num_layers * tokens * c.hidden_size * act
    layer_acts = 2 * tokens * (4 * c.hidden_size + 2 * kv + 3 * c.intermediate_size // tp) * act
    scores = 2 * b * (c.num_heads // tp) * plan.seq**2 * 4  # f32 probabilities and gradient
    logits = tokens * (c.vocab_size // tp) * (act + 4 + 4)  # bf16 logits, f32 log-probs, grad
    return {
        "weights/N": _bytes_at_rest(plan.params, plan.param_shardings),
        "unscanned gathered": unscanned,
        # full fine-tuning also holds one layer's gathered gradient before its reduce-scatter
        "one layer gathered": layer * (2 if plan.method == "full" else 1),
        "adapter state": state,
        "gradients": _bytes_at_rest(trainable, trainable_sh),
        "activations": kept + layer_acts + scores + logits,
    }


@dataclasses.dataclass
class Plan:
    """One compiled configuration: abstract trees, shardings and the step."""

    config: llama.LlamaConfig
    mesh: jax.sharding.Mesh
    method: str
    seq: int
    local_batch: int
    params: object
    param_shardings: object
    adapters: object
    adapter_shardings: object
    opt_state: object
    opt_state_shardings: object
    scanned: set
    step: object
    batch: object


def build(config, mesh_shape, method, *, batch, seq, rank, per_layer=True) -> Plan:
    """Abstract trees, shardings and the sharded step of one configuration."""
    mesh = sh.make_mesh(mesh_shape)
    preset = "fsdp_tp" if mesh_shape.get("tensor", 1) > 1 else "fsdp"
    shapes = jax.eval_shape(functools.partial(llama.init_params, config=config), jax.random.key(0))
    adapters = jax.eval_shape(method_of(method, rank).init, jax.random.key(1), shapes)
    if method != "full":  # a fully trained copy must keep its base leaf's dtype
        adapters = _f32(adapters)

    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    run = sh.setup(
        loss_fn,
        jl.optimizer(optax.adamw(1e-4)),
        shapes,
        llama.partition_rules(preset),
        mesh,
        adapters=adapters,
        abstract=True,  # shapes only: plans models far larger than this host
        per_layer=per_layer,
    )
    psh, ash, osh = run.param_shardings, run.adapter_shardings, run.opt_state_shardings
    opt_state, step = run.opt_state, run.step
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    scanned = sh.scanned_paths(loss_fn, shapes, ids) if per_layer else set()
    split = math.prod(dict(mesh.shape)[a] for a in sh.BATCH_AXES)
    if batch % split:
        raise SystemExit(f"batch {batch} is not divisible by the batch axes' {split} devices")
    return Plan(
        config,
        mesh,
        method,
        seq,
        batch // split,
        shapes,
        psh,
        adapters,
        ash,
        opt_state,
        osh,
        scanned,
        step,
        ids,
    )


def measure(plan: Plan) -> dict:
    """Compiles the plan's step and reads XLA's per-device figures and collectives."""
    start = time.perf_counter()
    compiled = plan.step.lower(plan.params, plan.adapters, plan.opt_state, plan.batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
    }
    xla["peak"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temp"]
    text = compiled.as_text()
    moved = profiling.collective_bytes(text)
    terms = analytic(plan)
    cpu = cpu_artefacts(plan, text)
    return {
        "compile_s": round(seconds, 1),
        "xla": xla,
        "all_gathered": moved.get("all-gather", 0),
        "reduced": sum(moved.get(op, 0) for op in ("all-reduce", "reduce-scatter")),
        "analytic": terms,
        "expected": sum(terms.values()),
        "cpu_artefacts": cpu,
        "expected_as_compiled": sum(terms.values()) + sum(cpu.values()),
    }


def _entry_lines(hlo_text: str) -> list[str]:
    lines = hlo_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    return lines[start:]


def _array_bytes(type_text: str) -> tuple[int, int]:
    """(bytes, bytes per element of the largest array) of an HLO type like ``f32[4,8]``."""
    total, big, size = 0, 0, 0
    for dtype, dims in profiling._ARRAY_RE.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d)
        total += n * profiling._DTYPE_BYTES.get(dtype, 0)
        if n > big:
            big, size = n, profiling._DTYPE_BYTES.get(dtype, 0)
    return total, size


def cpu_artefacts(plan: Plan, hlo_text: str) -> dict[str, int]:
    """Bytes XLA:CPU holds beyond what a TPU or GPU would, each read off the compiled HLO.

    XLA:CPU has no 16-bit float arithmetic: its float-normalization pass rewrites every
    bf16 instruction to f32 with converts around it. Two consequences show in the buffer
    assignment at these shapes:

    * the unscanned leaves gathered at the top of the step (embedding, head) are gathered
      and kept in f32, twice their bf16 bytes (the ``all-gather`` outside the layer loops);
    * the scanned stacks are sliced and gathered as their 16-bit payload
      (``jaxlora.adapt`` does so on CPU, to keep XLA from hoisting an f32 conversion of
      every stack out of the layer loop), and XLA:CPU materialises that ``bitcast-convert``
      of each stack, a 16-bit copy of the stacks' shards, before the loop.
    """
    entry = _entry_lines(hlo_text)
    terms = {}
    # the largest gather at the top level: the unscanned leaves' dtype as gathered
    size = 0
    for line in entry:
        m = profiling._COLLECTIVE_RE.match(line)
        if m is not None and m.group("op") == "all-gather":
            size = max(size, _array_bytes(m.group("type"))[1])
    base = jnp.dtype(plan.config.param_dtype).itemsize
    unscanned = analytic(plan)["unscanned gathered"]
    if size > base:
        terms["cpu: unscanned leaves gathered in f32"] = unscanned * (size - base) // base
    copies = 0
    for line in entry:
        if "bitcast-convert" in line and "fusion(" in line:
            copies += _array_bytes(line.split("=", 1)[1].split("fusion(", 1)[0])[0]
    if copies:
        terms["cpu: 16-bit copy of the stacks"] = copies
    return terms


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _mesh_name(m: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in m.items())


HEADER = (
    "| model | mesh | method | args GiB | temp GiB | peak GiB | expected GiB (bf16) "
    "| peak / expected | CPU artefacts GiB | peak / (expected + CPU artefacts) "
    "| gathered GiB/step | reduced GiB/step | compile s |"
)


def row(model: str, mesh: dict[str, int], method: str, r: dict) -> str:
    x = r["xla"]
    cpu = sum(r["cpu_artefacts"].values())
    return (
        f"| {model} | {_mesh_name(mesh)} | {method} | {_gib(x['arguments'])} | {_gib(x['temp'])} "
        f"| {_gib(x['peak'])} | {_gib(r['expected'])} | {x['peak'] / r['expected']:.2f} "
        f"| {_gib(cpu)} | {x['peak'] / r['expected_as_compiled']:.2f} "
        f"| {_gib(r['all_gathered'])} | {_gib(r['reduced'])} | {r['compile_s']} |"
    )


def main(args: argparse.Namespace) -> None:
    if args.hf_config:
        with open(args.hf_config) as f:
            config = llama.LlamaConfig.from_hf_config(json.load(f), **_COMMON)
        name = os.path.basename(os.path.dirname(os.path.abspath(args.hf_config))) or "hf"
    else:
        if args.model not in MODELS:
            raise SystemExit(f"unknown model {args.model!r}; known: {sorted(MODELS)}")
        config, name = MODELS[args.model], args.model
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    print(f"{name}: {config}", file=sys.stderr)
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    rows = []
    for mesh in args.mesh:
        for method in args.method:
            plan = build(
                config,
                mesh,
                method,
                batch=args.batch,
                seq=args.seq,
                rank=args.rank,
                per_layer=not args.no_per_layer,
            )
            r = measure(plan)
            print(row(name, mesh, method, r), flush=True)
            terms = {**r["analytic"], **r["cpu_artefacts"]}
            print(
                "   analytic: " + ", ".join(f"{k} {_gib(v)}" for k, v in terms.items()),
                file=sys.stderr,
                flush=True,
            )
            rows.append({"model": name, "mesh": mesh, "method": method, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(ARGS)
