"""jaxlora.profiling: XLA's cost figures of a compiled program and its collectives."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlora.profiling import Collective, collective_bytes, collectives, compiled_cost


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


def test_collective_bytes_weights_loops_by_their_trip_counts():
    # an outer loop of 3 around an inner loop of 4; a reduce-scatter counts its operand
    trip = '"known_trip_count":{{"n":"{}"}}'
    text = "\n".join(
        [
            "%inner (p: f32[2,4]) -> f32[2,4] {",
            "  %ag = f32[16,4]{1,0} all-gather(f32[2,4]{1,0} %p), dimensions={0}",
            "}",
            "%outer (p: f32[2,4]) -> f32[2,4] {",
            "  %w = f32[2,4] while(f32[2,4] %p), condition=%c1, body=%inner, "
            f"backend_config={{{trip.format(4)}}}",
            "  %rs = bf16[1,4]{1,0} reduce-scatter(bf16[8,4]{1,0} %q), dimensions={0}",
            "}",
            "ENTRY %main (p: f32[2,4]) -> f32[2,4] {",
            "  %w = f32[2,4] while(f32[2,4] %p), condition=%c0, body=%outer, "
            f"backend_config={{{trip.format(3)}}}",
            "  %ar = f32[5]{0} all-reduce(f32[5]{0} %x), to_apply=%add",
            "  %ag2 = (f32[1,4]{1,0}, f32[8,4]{1,0}) all-gather-start(f32[1,4]{1,0} %y)",
            "}",
        ]
    )
    assert collective_bytes(text) == {
        "all-gather": 3 * 4 * 16 * 4 * 4 + 8 * 4 * 4,  # the async start counts its result
        "reduce-scatter": 3 * 8 * 4 * 2,
        "all-reduce": 5 * 4,
    }
