"""Tests for jaxlora.models.bert: parity with transformers' BertModel (float32)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import hf_bert, quiet_transformers, random_batch, require_asset, torch_forward

from jaxlora.models import _layers, bert, loaders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    model = hf_bert(directory)
    config, params = loaders.load_bert_safetensors(directory, pooler=True)
    return model, config, params


def test_hidden_states_and_pooler_match_transformers(tiny):
    model, config, params = tiny
    ids, mask = random_batch(0, config.vocab_size, batch=3, seq=12)
    expected = torch_forward(model, ids, mask)
    hidden = jax.jit(functools.partial(bert.apply, config=config))(params, ids, mask)
    real = mask.astype(bool)
    assert np.abs(expected.last_hidden_state.numpy()).max() > 1.0
    np.testing.assert_allclose(
        np.asarray(hidden)[real], expected.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4
    )
    pooled = bert.pooled_output(params, ids, mask, config=config)
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_token_types_match_transformers(tiny):
    import torch

    model, config, params = tiny
    ids, _ = random_batch(1, config.vocab_size, batch=2, seq=7)
    types = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], np.int32)
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids).long(), token_type_ids=torch.from_numpy(types).long()
        ).last_hidden_state.numpy()
    got = bert.apply(params, ids, config=config, token_type_ids=types)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_parameter_paths(tiny):
    _, config, params = tiny
    paths = {
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    assert {
        "embeddings/word/embedding",
        "embeddings/position/embedding",
        "embeddings/token_type/embedding",
        "embeddings/norm/scale",
        "embeddings/norm/bias",
        "layers/1/attn/query/kernel",
        "layers/1/attn/output/bias",
        "layers/1/attn_norm/scale",
        "layers/1/mlp/intermediate/kernel",
        "layers/1/mlp/output/kernel",
        "layers/1/mlp_norm/bias",
        "pooler/kernel",
    } <= paths
    assert params["layers"]["0"]["mlp"]["intermediate"]["kernel"].shape == (32, 48)
    without = bert.init_params(
        jax.random.key(0), config.__class__(**{**vars(config), "pooler": False})
    )
    assert "pooler" not in without


@pytest.fixture(scope="module")
def minilm():
    directory = require_asset("minilm")
    config, params = loaders.load_bert_safetensors(directory)
    return directory, config, params, loaders.load_tokenizer(directory)


SENTENCES = ["A man is playing a guitar on stage.", "Someone performs music with a guitar."]


def test_minilm_sentence_embeddings_match_transformers(minilm):
    import torch

    transformers = quiet_transformers()

    directory, config, params, tokenizer = minilm
    encodings = tokenizer.encode_batch([*SENTENCES, "The stock market fell sharply today."])
    length = max(len(e.ids) for e in encodings)
    ids = np.array([e.ids + [0] * (length - len(e.ids)) for e in encodings], np.int32)
    mask = np.array([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in encodings], np.int32)
    assert ids[0, 0] == 101 and 102 in ids[0]  # [CLS] ... [SEP]

    reference = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = reference(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state
        m = torch.from_numpy(mask).float()[..., None]
        expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()

    got = np.asarray(bert.sentence_embedding(params, ids, mask, config=config))
    error = np.abs(got - expected).max()
    print(f"\nMiniLM sentence-embedding max abs error vs transformers: {error:.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-4)
    similar, unrelated = got[0] @ got[1], got[0] @ got[2]
    print(f"cosine(similar)={similar:.3f} cosine(unrelated)={unrelated:.3f}")
    assert similar > unrelated + 0.3


def test_dropout_is_hf_default_and_off_without_a_key(tiny):
    _, config, params = tiny
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.1)  # HF's defaults
    ids, mask = random_batch(3, config.vocab_size, batch=2, seq=9)
    run = jax.jit(bert.apply, static_argnames="config")
    evaluation = np.asarray(run(params, ids, mask, config=config))
    off = dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.0)
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        np.asarray(run(params, ids, mask, config=off, dropout_rng=key)), evaluation
    )
    train = np.asarray(run(params, ids, mask, config=config, dropout_rng=key))
    assert not np.allclose(train, evaluation, atol=1e-3)
    np.testing.assert_array_equal(
        np.asarray(run(params, ids, mask, config=config, dropout_rng=key)), train
    )
    other = np.asarray(run(params, ids, mask, config=config, dropout_rng=jax.random.key(1)))
    assert not np.array_equal(other, train)
    assert bert.BertConfig.from_hf_config(config.to_hf_config(), pooler=config.pooler) == config


def test_attention_probability_dropout_path_matches_the_fused_kernel():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 5, 4, 8))
    k, v = (jax.random.normal(kk, (2, 5, 2, 8)) for kk in ks[1:])
    mask = _layers.attention_mask_4d(jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), 5, causal=True)
    fused = _layers.attention(q, k, v, mask)
    np.testing.assert_allclose(
        _layers.attention(q, k, v, mask, lambda p: p), fused, rtol=1e-5, atol=1e-6
    )
    # dropping every probability leaves nothing to attend to
    zero = _layers.attention(q, k, v, mask, jnp.zeros_like)
    np.testing.assert_array_equal(np.asarray(zero), 0.0)
