"""Target selection: regexes over key paths, axis layouts, and the errors for bad specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora as jl
from jaxlora.targets import select

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


def test_default_layout_treats_leading_axes_as_stacked():
    lay = select(PARAMS, r"stacked/kernel")["stacked/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes) == ((0,), (1,), (2,))
    assert (lay.num_stacked, lay.d_in, lay.d_out) == (3, 8, 4)


def test_dense_general_layout():
    t = jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(-1,))
    lay = select(PARAMS, t)["out/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes, lay.d_in) == ((), (0, 1), (2,), 8)


def test_all_linear_preset_skips_embeddings_biases_and_head():
    sel = select(PARAMS, "all-linear")
    assert set(sel) == {
        "layers/0/attn/q_proj/kernel",
        "layers/1/attn/q_proj/kernel",
        "stacked/kernel",
        "out/kernel",
    }


def test_first_matching_target_wins():
    sel = select(PARAMS, [jl.Target(r"out/kernel", in_axes=(0, 1), out_axes=(2,)), r".*kernel"])
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
        jl.lora(rank=5, targets=r"stacked/kernel").init(jax.random.key(0), PARAMS)
    with pytest.raises(jl.TargetError, match="positive integer"):
        jl.lora(rank=0, targets=r"stacked/kernel").init(jax.random.key(0), PARAMS)


def test_selection_works_on_shapes_only():
    shapes = jax.eval_shape(lambda: PARAMS)
    assert set(select(shapes, "all-linear")) == set(select(PARAMS, "all-linear"))


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
