"""jaxlora.sharding: meshes, path rules, derived adapter/optimizer shardings.

Everything here runs on the one CPU device of the main test process, with abstract meshes
for the rule and spec checks. The numerical checks (sharded training equals one device,
under every preset) need 8 devices, which ``XLA_FLAGS`` only provides before JAX starts:
:func:`test_sharded_cases` runs ``tests/_sharded_cases.py`` in its own pytest process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jaxlora as jl
from jaxlora import distributed
from jaxlora import sharding as sh
from jaxlora.adapters import SHARED_KEY, Adapter, Factors, register_adapter
from jaxlora.keypaths import nest
from jaxlora.models import llama
from jaxlora.sharding.step import _drop_axes
from jaxlora.targets import Target, select, stacked

HERE = pathlib.Path(__file__).parent
MESH = AbstractMesh((2, 2, 2), sh.AXES)
CONFIG = llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


def _shapes(scan: bool):
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    return jax.eval_shape(functools.partial(llama.init_params, config=config), jax.random.key(0))


# ----------------------------------------------------------------------------- mesh


def test_mesh_shape_resolves_the_rest():
    assert sh.mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sh.mesh_shape((2, -1, 1), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sh.mesh_shape(None, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sh.mesh_shape({"x": -1}, 4, axis_names=("x",)) == {"x": 4}


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"model": 2}, "unknown mesh axes"),
        ({"data": -1, "fsdp": -1}, "at most one -1"),
        ({"fsdp": 3}, "covers 3 devices"),
        ({"fsdp": 3, "data": -1}, "not divisible by 3"),
        ((2, 2), "does not fit axis names"),
    ],
)
def test_mesh_shape_errors(shape, match):
    with pytest.raises(sh.ShardingError, match=match):
        sh.mesh_shape(shape, 8)


def test_make_mesh_on_one_device_has_all_axes():
    mesh = sh.make_mesh({"fsdp": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# ----------------------------------------------------------------------------- rules


def test_rules_errors_name_the_path():
    params = {"attn": {"kernel": jnp.zeros((6, 4))}, "norm": jnp.zeros(4)}
    with pytest.raises(sh.ShardingError, match=r"no partition rule matches 'norm'"):
        sh.param_specs(params, [(r".*kernel", P())], MESH)
    with pytest.raises(sh.ShardingError, match=r"'attn/kernel'.*size 6.*\('data', 'fsdp'\)"):
        sh.param_specs(params, [(r".*", P(("data", "fsdp"), None))], MESH)
    with pytest.raises(sh.ShardingError, match=r"'attn/kernel'.*mesh axis 'model'"):
        sh.param_specs(params, [(r".*", P("model"))], MESH)
    with pytest.raises(sh.ShardingError, match=r"'norm'.*fewer axes"):
        sh.param_specs(params, [(r".*kernel", P()), (r".*", P(None, "fsdp"))], MESH)
    with pytest.raises(sh.ShardingError, match=r"'attn/kernel'.*twice"):
        sh.param_specs(params, [(r".*", P("fsdp", "fsdp"))], MESH)


# ----------------------------------------------------------------------------- adapters


def test_lora_factors_follow_their_kernel_axes():
    params = {
        # DenseGeneral output projection (heads, head_dim, d), stacked over 3 layers
        "o": {"kernel": jnp.zeros((3, 4, 8, 16))},
        "q": {"kernel": jnp.zeros((16, 32))},
    }
    targets = [Target(r"o/kernel", in_axes=(1, 2), out_axes=(3,)), Target(r"q/kernel")]
    specs = {"o": {"kernel": P(None, "tensor", None, "fsdp")}, "q": {"kernel": P("fsdp", None)}}
    adapters = jax.eval_shape(jl.lora(rank=2, targets=targets).init, jax.random.key(0), params)
    got = sh.adapter_specs(adapters, specs)
    assert got["o"]["kernel"].a == P(None, "tensor", None, None)
    assert got["o"]["kernel"].b == P(None, None, "fsdp")
    assert got["q"]["kernel"].a == P("fsdp", None)
    assert got["q"]["kernel"].b == P(None, None)


def test_vera_and_dora_vectors_follow_the_output_axis():
    params = {"w": {"kernel": jnp.zeros((2, 16, 16))}}  # square: shapes alone are ambiguous
    specs = {"w": {"kernel": P(None, "fsdp", "tensor")}}
    target = Target("w/kernel", stack_axes=(0,))
    vera = jax.eval_shape(jl.vera(rank=4, targets=target).init, jax.random.key(0), params)
    got = sh.adapter_specs(vera, specs)
    assert got["w"]["kernel"].d == P(None, None)
    assert got["w"]["kernel"].b == P(None, "tensor")
    shared = jax.tree_util.tree_leaves(got[SHARED_KEY], is_leaf=lambda x: isinstance(x, P))
    assert shared and all(s == P() for s in shared)
    dora = jax.eval_shape(jl.dora(rank=4, targets=target).init, jax.random.key(0), params)
    assert sh.adapter_specs(dora, specs)["w"]["kernel"].m == P(None, "tensor")


@register_adapter
class _ThirdParty(Adapter):
    """An adapter class from outside jaxlora: its AXES say how each array shards."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("a", "b", "scale_out", "gate")
    LABELS: ClassVar[dict[str, str]] = {"a": "a", "b": "b", "scale_out": "s", "gate": "g"}
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "a": ("stack", "in", "rank"),
        "b": ("stack", "rank", "out"),
        "scale_out": ("stack", "out"),
        "gate": ("stack", "rank", "rank"),  # axes of its own: stack kept, the rest replicated
    }

    layout: Any
    rank: int
    a: Any
    b: Any
    scale_out: Any
    gate: Any

    def factors(self, w, shared):
        return Factors(self.a, self.b, 1.0, self.scale_out)


@register_adapter
class _Undeclared(_ThirdParty):
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {"a": ("stack", "in", "rank")}


def test_axes_declared_by_third_party_adapters():
    params = {"w": jnp.zeros((5, 8, 12)), "head": jnp.zeros((8, 12))}
    (layout,) = select(params, Target("w", stack_axes=(0,))).values()

    def node(rank):
        return _ThirdParty(
            layout=layout,
            rank=rank,
            a=jnp.zeros((5, 8, rank)),
            b=jnp.zeros((5, rank, 12)),
            scale_out=jnp.zeros((5, 12)),
            gate=jnp.zeros((5, 3, 3)),
        )

    specs = {"w": P("tensor", "fsdp", "data"), "head": P(None, "data")}
    got = sh.adapter_specs(nest({"w": node(4)}), specs)["w"]
    assert (got.a, got.b) == (P("tensor", "fsdp", None), P("tensor", None, "data"))
    assert (got.scale_out, got.gate) == (P("tensor", "data"), P("tensor", None, None))
    # rank == d_out: the declaration decides, no shape is guessed
    got = sh.adapter_specs(nest({"w": node(12)}), specs)["w"]
    assert got.scale_out == P("tensor", "data")
    # an array without a declaration, or one that does not fit it, is a clear error
    odd = _Undeclared(**{f: getattr(node(4), f) for f in ("layout", "rank", *_ThirdParty.ARRAYS)})
    with pytest.raises(sh.ShardingError, match=r"_Undeclared.b at 'w' has no axis groups"):
        sh.adapter_specs(nest({"w": odd}), specs)
    bad = dataclasses.replace(node(4), a=jnp.zeros((5, 7, 4)))
    with pytest.raises(sh.ShardingError, match=r"_ThirdParty.a at 'w' has shape \(5, 7, 4\)"):
        sh.adapter_specs(nest({"w": bad}), specs)
    # fully trained copies (jl.full) take the base leaf's spec
    full = jl.compose(jl.lora(rank=2, targets=stacked("w")), jl.full(targets="head"))
    adapters = jax.eval_shape(full.init, jax.random.key(0), params)
    assert sh.adapter_specs(adapters, specs)["__full__"]["head"] == P(None, "data")
    with pytest.raises(sh.ShardingError, match="'w' has no base spec"):
        sh.adapter_specs(adapters, {"head": P()})


# ----------------------------------------------------------------------------- optimizer


def test_opt_state_follows_adapters_through_masks_and_labels():
    shapes = _shapes(scan=True)
    specs = sh.param_specs(shapes, llama.partition_rules("fsdp_tp"), MESH)
    adapters = jax.eval_shape(
        jl.lora_fa(rank=4, targets=stacked("all-linear")).init, jax.random.key(0), shapes
    )
    aspecs = sh.adapter_specs(adapters, specs)
    tx = jl.optimizer({"lora_b": optax.adam(1e-3)})  # A is frozen: masked, no state
    state = jax.eval_shape(tx.init, adapters)
    got = sh.opt_state_specs(state, adapters, aspecs)
    q = "layers/attn/q_proj/kernel"
    b_spec = aspecs["layers"]["attn"]["q_proj"]["kernel"].b
    per_param = 0
    for kp, spec in jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, P)):
        path = jl.targets.path_str(kp)
        if path.endswith(f"{q}/b"):
            assert spec == b_spec == P(None, None, "tensor")
            per_param += 1
        elif "count" in path:
            assert spec == P()
    assert per_param == 2  # adam's mu and nu


def test_opt_state_over_params_and_adapters():
    shapes = _shapes(scan=False)
    specs = sh.param_specs(shapes, llama.partition_rules("fsdp"), MESH)
    adapters = jax.eval_shape(
        jl.lora(rank=4, targets=".*q_proj/kernel").init, jax.random.key(0), shapes
    )
    aspecs = sh.adapter_specs(adapters, specs)
    # an optimizer with state for the base too, e.g. full fine-tuning of some leaves
    tx = optax.adam(1e-3)
    state = jax.eval_shape(tx.init, (shapes, adapters))
    got = sh.opt_state_specs(state, adapters, aspecs, params=shapes, param_specs=specs)
    mu_params, mu_adapters = got[0].mu
    assert mu_params["layers"]["0"]["mlp"]["down_proj"]["kernel"] == P(None, "fsdp")
    assert mu_adapters["layers"]["0"]["attn"]["q_proj"]["kernel"].a == P("fsdp", None)


# ----------------------------------------------------------------------------- step


def test_gathered_drops_only_the_gathered_axes():
    assert _drop_axes(P("fsdp", ("data", "tensor"), None), ("fsdp", "data")) == P(
        None, "tensor", None
    )


# ----------------------------------------------------------------------------- setup


def _loss(config):
    def loss_fn(params, ids):
        return llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)

    return loss_fn


def test_setup_equals_its_building_blocks_and_the_unsharded_step():
    # on the one CPU device; tests/_sharded_cases.py runs it over 8 devices and every preset
    init = functools.partial(llama.init_params, config=CONFIG)
    method, tx = jl.lora(rank=2, targets="all-linear"), jl.optimizer(optax.adam(1e-2))
    mesh, rules = sh.make_mesh(), llama.partition_rules("fsdp")
    run = sh.setup(
        _loss(CONFIG), tx, lambda: init(jax.random.key(0)), rules, mesh,
        method=method, key=jax.random.key(1), donate=False,
    )  # fmt: skip
    params = jax.jit(init)(jax.random.key(0))  # jitted like setup's (eager may be an ulp off)
    psh = sh.param_shardings(params, rules, mesh)
    adapters = method.init(jax.random.key(1), params)
    ash = sh.adapter_shardings(adapters, psh)
    for got, want in [
        (run.param_shardings, psh),
        (run.adapter_shardings, ash),
        (run.opt_state_shardings, sh.opt_state_shardings(tx, adapters, ash)),
    ]:
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(want)
    chex_equal = functools.partial(jax.tree_util.tree_map, lambda a, b: bool(jnp.all(a == b)))
    assert all(jax.tree_util.tree_leaves(chex_equal(run.params, params)))
    assert all(jax.tree_util.tree_leaves(chex_equal(run.adapters, adapters)))
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, CONFIG.vocab_size)
    want = jl.train_step(_loss(CONFIG), tx, donate=False)(params, adapters, tx.init(adapters), ids)
    got = run.step(run.params, run.adapters, run.opt_state, run.put_batch(ids))
    assert float(got[3]["loss"]) == pytest.approx(float(want[3]["loss"]), rel=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        assert jnp.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_setup_with_given_adapters_copies_them_so_they_may_be_donated():
    params = jax.tree_util.tree_map(jnp.zeros_like, _shapes(False))
    adapters = jl.lora(rank=2, targets="all-linear").init(jax.random.key(1), params)
    run = sh.setup(
        _loss(CONFIG), jl.optimizer(optax.sgd(0.1)), params, llama.partition_rules("fsdp"),
        sh.make_mesh(), adapters=adapters,
    )  # fmt: skip
    leaf = jax.tree_util.tree_leaves(adapters)[0]
    assert jax.tree_util.tree_leaves(run.adapters)[0].unsafe_buffer_pointer() != (
        leaf.unsafe_buffer_pointer()
    )


def test_setup_abstract_allocates_nothing_and_lowers():
    shapes = _shapes(True)
    run = sh.setup(
        _loss(dataclasses.replace(CONFIG, scan_layers=True)), jl.optimizer(optax.adamw(1e-4)),
        shapes, llama.partition_rules("fsdp"), sh.make_mesh(),
        method=jl.lora(rank=2, targets=stacked("all-linear")), key=jax.random.key(1),
        abstract=True,
    )  # fmt: skip
    for tree in (run.params, run.adapters, run.opt_state):
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    compiled = run.step.lower(run.params, run.adapters, run.opt_state, ids).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "not none of them"),
        ({"method": jl.lora(rank=2)}, "not method$"),
        ({"key": jax.random.key(0), "adapters": {}}, "not adapters and key$"),
    ],
)
def test_setup_needs_adapters_or_method_and_key(kw, match):
    params = {"w": {"kernel": jnp.eye(4)}}
    with pytest.raises(ValueError, match=match):
        sh.setup(lambda p, b: 0.0, jl.optimizer(optax.sgd(0.1)), params, [], sh.make_mesh(), **kw)


def test_distributed_initialize_is_env_driven():
    assert distributed.initialize({}) is False
    assert distributed.initialize({"JAX_NUM_PROCESSES": "1"}) is False
    assert distributed.initialize({"SLURM_NTASKS": "1"}) is False
    assert distributed.initialize({"JAXLORA_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}) is False
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        distributed.initialize({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})


def _run_cases(marker: str, timeout: int) -> None:
    # Cheaper LLVM code generation halves the compile times that dominate these tiny runs;
    # the one-device reference runs in the same process, under the same flags.
    flags = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_force_host_platform_device_count=8",
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
        ]
    ).strip()
    env = {
        **os.environ,
        "XLA_FLAGS": flags,
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", str(HERE / "_sharded_cases.py")]
    proc = subprocess.run(
        [*cmd, "-m", marker],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_sharded_cases():
    """Sharded training == one device, and FSDP gathers each kernel once (8 fake devices)."""
    _run_cases("not slow", timeout=600)


@pytest.mark.slow
def test_sharded_cases_every_method_and_preset():
    _run_cases("slow or not slow", timeout=3600)
