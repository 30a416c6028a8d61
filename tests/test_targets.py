"""Target selection: regexes over key paths, axis layouts, and the errors for bad specs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora as jl
from jaxlora.targets import module_targets, select

PARAMS = {
    "embed": {"embedding": jnp.zeros((10, 8))},
    "layers": {
        "0": {"attn": {"q_proj": {"kernel": jnp.zeros((8, 8))}, "bias": jnp.zeros((8,))}},
        "1": {"attn": {"q_proj": {"kernel": jnp.zeros((8, 8))}, "bias": jnp.zeros((8,))}},
    },
    "stacked": {"kernel": jnp.zeros((3, 8, 4))},
    "out": {"kernel": jnp.zeros((2, 4, 8))},
    "lm_head": {"kernel": jnp.zeros((8, 10))},
}


def test_regex_selects_full_paths_only():
    sel = select(PARAMS, r"layers/\d+/attn/q_proj/kernel")
    assert list(sel) == ["layers/0/attn/q_proj/kernel", "layers/1/attn/q_proj/kernel"]
    assert sel["layers/0/attn/q_proj/kernel"].in_axes == (0,)


STACKED = jl.Target(r"stacked/kernel", stack_axes=(0,))
OUT = jl.Target(r"out/kernel", in_axes=(0, 1))


def test_stacked_layout_from_its_stack_axes():
    lay = select(PARAMS, STACKED)["stacked/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes) == ((0,), (1,), (2,))
    assert (lay.num_stacked, lay.d_in, lay.d_out) == (3, 8, 4)


@pytest.mark.parametrize("targets", [r"stacked/kernel", "all-linear", [r".*kernel"]])
def test_a_kernel_of_three_axes_is_never_guessed(targets):
    with pytest.raises(jl.TargetError) as err:
        select(PARAMS, targets)
    msg = str(err.value)
    # leaves are visited in key order: 'out/kernel' (2, 4, 8) comes before 'stacked/kernel'
    assert re.search(r"'(out|stacked)/kernel' with shape \((2, 4, 8|3, 8, 4)\)", msg)
    assert "ambiguous" in msg
    assert "stack_axes=(0,)" in msg and "like=(fn, *args)" in msg and "infer_targets" in msg


def test_one_group_of_axes_given_the_other_is_the_rest():
    lay = select(PARAMS, OUT)["out/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes) == ((), (0, 1), (2,))
    lay = select(PARAMS, jl.Target(r"out/kernel", out_axes=(1, 2)))["out/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes) == ((), (0,), (1, 2))


def test_dense_general_layout():
    t = jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(-1,))
    lay = select(PARAMS, t)["out/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes, lay.d_in) == ((), (0, 1), (2,), 8)


def test_all_linear_preset_skips_embeddings_biases_and_head():
    sel = select(PARAMS, [STACKED, OUT, "all-linear"])
    assert set(sel) == {
        "layers/0/attn/q_proj/kernel",
        "layers/1/attn/q_proj/kernel",
        "stacked/kernel",
        "out/kernel",
    }


def test_first_matching_target_wins():
    sel = select(PARAMS, [OUT, STACKED, r".*kernel"])
    assert sel["out/kernel"].in_axes == (0, 1)
    assert sel["stacked/kernel"].in_axes == (1,)


def test_nnx_state_paths_drop_the_variable_box():
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    assert list(select(state, r"kernel")) == ["kernel"]


def test_pattern_matching_nothing_names_the_pattern_and_paths():
    with pytest.raises(jl.TargetError, match=r"\['.*v_proj.*'\] matched no leaf.*q_proj"):
        select(PARAMS, [r".*q_proj/kernel", r".*v_proj/kernel"])


def test_unsplittable_leaf_is_an_error():
    with pytest.raises(jl.TargetError, match=r"cannot split 'stacked/kernel'"):
        select(PARAMS, jl.Target(r"stacked/kernel", in_axes=(1,), out_axes=(1,)))
    with pytest.raises(jl.TargetError, match=r"axis 5 is out of range for 'out/kernel'"):
        select(PARAMS, jl.Target(r"out/kernel", in_axes=(5,)))


def test_rank_larger_than_kernel_is_an_error():
    with pytest.raises(jl.TargetError, match=r"rank 5 .* min\(8, 4\) .*'stacked/kernel'"):
        jl.lora(rank=5, targets=STACKED).init(jax.random.key(0), PARAMS)
    with pytest.raises(jl.TargetError, match="positive integer"):
        jl.lora(rank=0, targets=STACKED).init(jax.random.key(0), PARAMS)


def test_selection_works_on_shapes_only():
    shapes = jax.eval_shape(lambda: PARAMS)
    targets = [STACKED, OUT, "all-linear"]
    assert select(shapes, targets) == select(PARAMS, targets)


def test_peft_target_modules_are_module_names():
    params = {
        "layers": {
            "0": {"q_proj": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((8,))}},
            "1": {"q_proj": {"kernel": jnp.zeros((8, 8))}, "v_proj": {"w": jnp.zeros((8, 8))}},
        },
        "big_q_proj": {"kernel": jnp.zeros((8, 8))},  # another module's name ends in q_proj
    }
    got = select(params, module_targets(["q_proj", "v_proj"]))
    assert list(got) == ["layers/0/q_proj/kernel", "layers/1/q_proj/kernel", "layers/1/v_proj/w"]
    assert module_targets("all-linear") is jl.ALL_LINEAR
    by_name = jl.lora(rank=2, target_modules=["q_proj"]).init(jax.random.key(0), params)
    by_regex = jl.lora(rank=2, targets=r".*/q_proj/kernel").init(jax.random.key(0), params)
    assert jax.tree_util.tree_structure(by_name) == jax.tree_util.tree_structure(by_regex)
    with pytest.raises(jl.TargetError, match="module names such as"):
        module_targets(["layers/.*"])
    with pytest.raises(jl.TargetError, match="module names such as"):
        jl.vera(target_modules=[])


@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool"])
@pytest.mark.parametrize("make", [jl.lora, jl.vera, jl.full])
def test_non_floating_kernel_is_refused_naming_path_and_dtype(make, dtype):
    # merge() cannot add a float update to an integer kernel: it would be cast away, and
    # the trained update lost from the merged/exported model
    params = {
        "ok": {"kernel": jnp.ones((4, 4))},
        "t": {"kernel": jnp.arange(16).reshape(4, 4).astype(dtype)},
    }
    kw = {} if make is jl.full else {"rank": 2}
    with pytest.raises(jl.TargetError, match=rf"t/kernel.*{dtype}"):
        make(targets=".*kernel", **kw).init(jax.random.key(0), params)
    # shapes only: refused the same way
    with pytest.raises(jl.TargetError, match=rf"t/kernel.*{dtype}"):
        select(jax.eval_shape(lambda: params), ".*kernel")


def test_floating_kernels_of_every_width_are_selected():
    params = {n: {"kernel": jnp.ones((4, 4), n)} for n in ("float32", "bfloat16", "float16")}
    assert sorted(select(params, ".*kernel")) == [f"{n}/kernel" for n in sorted(params)]
