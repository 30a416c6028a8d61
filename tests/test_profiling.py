"""jaxlora.profiling: XLA's cost figures of a compiled program and its collectives."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlora.profiling import Collective, collectives, compiled_cost


def test_compiled_cost_counts_a_matmul_and_its_buffers():
    cost = compiled_cost(lambda x, w: x @ w, jnp.ones((8, 16)), jnp.ones((16, 4)))
    assert cost.flops == 2 * 8 * 16 * 4
    assert cost.argument_bytes == 4 * (8 * 16 + 16 * 4)
    assert cost.output_bytes == 4 * 8 * 4


def test_collectives_parses_combined_and_async_ops():
    text = "\n".join(
        [
            "  %a = (f32[4,2]{1,0}, f32[]) all-reduce(f32[4,2]{1,0} %x, f32[] %y), to_apply=%s",
            "  ROOT %g = f32[8,4]{1,0} all-gather-start(f32[1,4]{1,0} %p), dimensions={0}",
            "  %d = f32[8,4]{1,0} all-gather-done(f32[8,4]{1,0} %g)",
            "  %m = f32[8,4]{1,0} multiply(f32[8,4]{1,0} %d, f32[8,4]{1,0} %d)",
        ]
    )
    assert collectives(text) == [
        Collective("all-reduce", ((4, 2), ())),
        Collective("all-gather", ((8, 4),)),
    ]
