"""Tests for jaxlora.models.llama: parity with transformers' LlamaForCausalLM (float32)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import hf_llama, random_batch, torch_forward
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxlora.keypaths import path_str
from jaxlora.models import llama, loaders
from jaxlora.sharding import param_specs

# (name, transformers config overrides, jaxlora config overrides)
CASES = [
    ("gqa_untied", dict(), dict()),
    ("gqa_tied_scan", dict(tie_word_embeddings=True), dict(scan_layers=True)),
    ("mha_scan_remat", dict(num_key_value_heads=4), dict(scan_layers=True, remat=True)),
    ("gqa1_tied_remat", dict(num_key_value_heads=1, tie_word_embeddings=True), dict(remat=True)),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    name, hf_overrides, overrides = request.param
    directory = tmp_path_factory.mktemp(name)
    model = hf_llama(directory, **hf_overrides)
    config, params = loaders.load_llama_safetensors(directory, **overrides)
    return model, config, params


def test_logits_match_transformers(case):
    model, config, params = case
    ids, mask = random_batch(0, config.vocab_size)
    expected = torch_forward(model, ids, mask).logits.numpy()
    fn = jax.jit(functools.partial(llama.apply, config=config))
    got = np.asarray(fn(params, ids, mask))
    real = mask.astype(bool)  # padded queries are don't-cares
    assert np.abs(expected).max() > 1.0, "logits too small for a meaningful comparison"
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_loss_matches_transformers(case):
    import torch

    model, config, params = case
    ids, _ = random_batch(1, config.vocab_size, seq=9)
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()
        )
    got = llama.causal_lm_loss(llama.apply(params, ids, config=config), ids)
    np.testing.assert_allclose(float(got), float(expected.loss), rtol=1e-5)


def test_greedy_generation_matches_transformers(case):
    import torch

    model, config, params = case
    prompt = np.array([[5, 17, 42, 8]], np.int32)
    with torch.no_grad():
        expected = model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)).long(),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    got = llama.generate(params, config, prompt, 6)
    np.testing.assert_array_equal(got, expected)


def _paths(tree):
    return {
        "/".join(str(k.key) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_parameter_paths():
    c = llama.LlamaConfig(
        vocab_size=13,
        hidden_size=8,
        intermediate_size=12,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    paths = _paths(
        jax.eval_shape(functools.partial(llama.init_params, config=c), jax.random.key(0))
    )
    expected = {"embed/embedding": (13, 8), "final_norm/scale": (8,), "lm_head/kernel": (8, 13)}
    for i in ("0", "1"):
        expected |= {
            f"layers/{i}/attn/q_proj/kernel": (8, 8),
            f"layers/{i}/attn/k_proj/kernel": (8, 4),
            f"layers/{i}/attn/v_proj/kernel": (8, 4),
            f"layers/{i}/attn/o_proj/kernel": (8, 8),
            f"layers/{i}/mlp/gate_proj/kernel": (8, 12),
            f"layers/{i}/mlp/up_proj/kernel": (8, 12),
            f"layers/{i}/mlp/down_proj/kernel": (12, 8),
            f"layers/{i}/input_norm/scale": (8,),
            f"layers/{i}/post_attn_norm/scale": (8,),
        }
    assert paths == expected

    scanned = dataclasses.replace(c, scan_layers=True, tie_embeddings=True)
    paths = _paths(
        jax.eval_shape(functools.partial(llama.init_params, config=scanned), jax.random.key(0))
    )
    assert "lm_head/kernel" not in paths
    assert paths["layers/attn/q_proj/kernel"] == (2, 8, 8)
    assert paths["layers/mlp/down_proj/kernel"] == (2, 12, 8)
    assert paths["layers/input_norm/scale"] == (2, 8)


def test_scanned_gradients_match_unscanned(tmp_path):
    hf_llama(tmp_path)
    config, params = loaders.load_llama_safetensors(tmp_path)
    scan_config, scan_params = loaders.load_llama_safetensors(
        tmp_path, scan_layers=True, remat=True
    )
    ids, mask = random_batch(2, config.vocab_size)

    def loss(p, c):
        return llama.causal_lm_loss(llama.apply(p, ids, mask, config=c), ids, mask)

    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, config)
    scan_grads = jax.jit(jax.grad(loss), static_argnums=1)(scan_params, scan_config)
    for name in ("q_proj", "k_proj", "o_proj"):
        stacked = jnp.stack([grads["layers"][str(i)]["attn"][name]["kernel"] for i in range(3)])
        np.testing.assert_allclose(
            scan_grads["layers"]["attn"][name]["kernel"], stacked, atol=1e-5, rtol=1e-4
        )


def test_hf_config_round_trip_and_errors():
    hf = {
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},
        "tie_word_embeddings": True,
    }
    c = llama.LlamaConfig.from_hf_config(hf)
    assert (c.rope_theta, c.num_kv_heads, c.head_dim, c.tie_embeddings) == (500.0, 1, 4, True)
    assert llama.LlamaConfig.from_hf_config(c.to_hf_config()) == c
    with pytest.raises(ValueError, match="rope scaling"):
        llama.LlamaConfig.from_hf_config(
            {**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}
        )
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(c, num_kv_heads=3)


_TINY = llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.mark.parametrize("scan", [False, True])
def test_partition_rule_presets(scan):
    config = dataclasses.replace(_TINY, scan_layers=scan)
    shapes = jax.eval_shape(functools.partial(llama.init_params, config=config), jax.random.key(0))
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    lead = (None,) if scan else ()
    layer = (lambda p: f"layers/{p}") if scan else (lambda p: f"layers/1/{p}")
    expect = {
        "fsdp": {
            "attn/q_proj/kernel": ("fsdp", None),
            "attn/o_proj/kernel": (None, "fsdp"),
            "mlp/down_proj/kernel": (None, "fsdp"),
            "input_norm/scale": (None,),
        },
        "fsdp_tp": {
            "attn/k_proj/kernel": ("fsdp", "tensor"),
            "attn/o_proj/kernel": ("tensor", "fsdp"),
            "mlp/up_proj/kernel": ("fsdp", "tensor"),
            "post_attn_norm/scale": (None,),
        },
    }
    for preset, kernels in expect.items():
        specs = param_specs(shapes, llama.partition_rules(preset), mesh)
        flat = {path_str(k): s for k, s in jax.tree_util.tree_leaves_with_path(specs)}
        for path, spec in kernels.items():
            assert flat[layer(path)] == P(*lead, *spec), (preset, path)
        assert flat["final_norm/scale"] == P(None)
        top = {"fsdp": (("fsdp", None), (None, "fsdp")), "fsdp_tp": (("fsdp", "tensor"),) * 2}
        assert flat["lm_head/kernel"] == P(*top[preset][0])
    dp = param_specs(shapes, llama.partition_rules("dp"), mesh)
    assert all(all(e is None for e in s) for s in jax.tree_util.tree_leaves(dp))
    with pytest.raises(ValueError, match="unknown preset"):
        llama.partition_rules("zero3")
