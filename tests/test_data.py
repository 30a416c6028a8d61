"""Tests for jaxlora.data: parsing, deterministic splits, padding and resumable batches."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from _model_fixtures import require_asset

from jaxlora import data
from jaxlora.models import loaders


def test_read_fortune_file_parses_separators_and_overstrike(tmp_path):
    path = tmp_path / "topic"
    path.write_text("first\nquote\n%\n\n%\n_\bb_\bo_\bl_\bd text\n%\nlast\n")
    assert data.read_fortune_file(path) == ["first\nquote", "bold text", "last"]


def test_split_is_deterministic_stratified_and_disjoint():
    items = [(f"t{i}", i % 3) for i in range(60)]
    groups = [label for _, label in items]
    train, val = data.train_validation_split(items, validation_fraction=0.2, seed=1, groups=groups)
    again = data.train_validation_split(items, validation_fraction=0.2, seed=1, groups=groups)
    other = data.train_validation_split(items, validation_fraction=0.2, seed=2, groups=groups)
    assert (train, val) == again
    assert val != other[1]
    assert sorted(train + val) == sorted(items)
    assert collections.Counter(label for _, label in val) == {0: 4, 1: 4, 2: 4}


def test_batches_resume_exactly_and_cover_each_epoch():
    examples = {"x": np.arange(10), "y": np.arange(10) * 2}
    stream = data.Batches(examples, batch_size=3, seed=7)
    run = [next(stream) for _ in range(7)]
    assert stream.position == 7 and stream.steps_per_epoch == 3
    for position in (0, 4, 6):
        resumed = data.Batches(examples, batch_size=3, seed=7, position=position)
        for expected in run[position:]:
            np.testing.assert_array_equal(next(resumed)["x"], expected["x"])
    epoch0 = np.concatenate([b["x"] for b in run[:3]])
    assert len(set(epoch0.tolist())) == 9  # a permutation, minus the dropped remainder
    assert all(np.array_equal(b["y"], b["x"] * 2) for b in run)
    assert not np.array_equal(run[0]["x"], run[3]["x"])  # a new order every epoch
    ordered = data.Batches(examples, batch_size=5, seed=0, shuffle=False)
    assert next(ordered)["x"].tolist() == [0, 1, 2, 3, 4]


def test_batches_reject_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        data.Batches({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.Batches({"a": np.zeros(3)}, batch_size=4, seed=0)


def test_sequential_batches_cover_all_examples_once():
    examples = {"x": np.arange(7)}
    batches = list(data.sequential_batches(examples, 3))
    assert [b["x"].shape for b in batches] == [(3,)] * 3
    covered = np.concatenate([b["x"][b["valid"] == 1] for b in batches])
    assert covered.tolist() == list(range(7))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return loaders.load_tokenizer(require_asset("minilm"))


def test_fortune_topics(minilm_tokenizer):
    require_asset("fortunes")
    train, val = data.fortune_topics(seed=0)
    assert (train, val) == data.fortune_topics(seed=0)
    assert not {t for t, _ in train} & {t for t, _ in val}
    counts = collections.Counter(label for _, label in train + val)
    assert sorted(counts) == list(range(len(data.TOPICS)))
    assert min(counts.values()) > 100  # love and sports, the smallest, have ~150 quotes
    assert abs(len(val) / (len(train) + len(val)) - 0.2) < 0.01

    encoded = data.encode_classification(val, minilm_tokenizer, max_length=32)
    assert encoded["input_ids"].shape == (len(val), 32)
    assert encoded["input_ids"].dtype == np.int32
    assert (encoded["input_ids"][:, 0] == 101).all()  # [CLS]
    lengths = encoded["attention_mask"].sum(1)
    last = encoded["input_ids"][np.arange(len(val)), lengths - 1]
    assert (last == 102).all()  # [SEP] survives truncation
    assert (encoded["input_ids"][encoded["attention_mask"] == 0] == 0).all()
    np.testing.assert_array_equal(encoded["labels"], [label for _, label in val])


def test_causal_lm_texts_and_dialogues(minilm_tokenizer):
    path = require_asset("smollm2")
    require_asset("chatterbot")
    tokenizer = loaders.load_gguf_tokenizer(path)
    pairs = data.load_dialogues(["computers", "greetings"])
    assert len(pairs) > 40 and all(p and r for p, r in pairs)
    assert pairs == data.load_dialogues(["greetings", "computers"])
    with pytest.raises(FileNotFoundError, match="klingon"):
        data.load_dialogues(["klingon"])

    encoded = data.encode_dialogues(pairs[:8], tokenizer, max_length=96, pad_id=2)
    ids, mask, loss = encoded["input_ids"], encoded["attention_mask"], encoded["loss_mask"]
    assert ids.shape == mask.shape == loss.shape == (8, 96)
    assert ((loss == 1) <= (mask == 1)).all()
    row = ids[0][mask[0] == 1].tolist()
    text = tokenizer.decode(row, skip_special_tokens=False)
    assert text == data.CHATML[0].format(prompt=pairs[0][0]) + data.CHATML[1].format(
        response=pairs[0][1]
    )
    response = tokenizer.decode(ids[0][loss[0] == 1].tolist(), skip_special_tokens=False)
    assert response == pairs[0][1] + "<|im_end|>\n"

    texts = data.encode_texts(["Hello there.", "A longer sentence " * 20], tokenizer, max_length=16)
    assert texts["attention_mask"].sum(1).tolist() == [3, 16]
    np.testing.assert_array_equal(texts["loss_mask"], texts["attention_mask"])
    with_eos = data.encode_texts(["Hello there."], tokenizer, max_length=16, eos_id=2)
    assert with_eos["input_ids"][0, 3] == 2


def _ragged(n=23, max_length=20, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_length + 1, n)
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, 50, (n, max_length)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": np.arange(n)}, lengths


def test_bucket_lengths_are_capped_at_max_length():
    assert data.bucket_lengths(64) == (16, 32, 48, 64)
    assert data.bucket_lengths(40, (32, 16, 64, 16)) == (16, 32, 40)
    assert data.bucket_lengths(8) == (8,)
    with pytest.raises(ValueError, match="positive integers"):
        data.bucket_lengths(8, (0, 4))


def test_bucketed_batches_pad_to_the_next_bucket_and_mask_correctly():
    examples, lengths = _ragged()
    it = data.BucketedBatches(examples, batch_size=4, seed=3, buckets=(5, 10, 15))
    assert it.buckets == (5, 10, 15, 20) and it.steps_per_epoch == 6
    for position in range(3 * it.steps_per_epoch):
        b = it.batch_at(position)
        length = b["input_ids"].shape[1]
        assert b["attention_mask"].shape == (4, length) and length in it.buckets
        real = b["labels"][b["valid"] == 1]
        longest = lengths[real].max()
        # the smallest bucket that holds the batch's longest example
        assert length == min(x for x in it.buckets if x >= longest)
        for row, label in zip(range(4), b["labels"]):
            # the real tokens and mask of the example, cut only where it was padding
            np.testing.assert_array_equal(
                b["input_ids"][row], examples["input_ids"][label, :length]
            )
            assert b["attention_mask"][row].sum() == lengths[label]
            assert (examples["attention_mask"][label, length:] == 0).all()


def test_bucketed_batches_cover_each_epoch_once_and_resume_exactly():
    examples, _ = _ragged(n=37)
    it = data.BucketedBatches(examples, batch_size=5, seed=1, buckets=(4, 8, 12))
    spe = it.steps_per_epoch
    assert spe == 8
    run = [next(it) for _ in range(3 * spe)]
    epochs = []
    for e in range(3):
        batches = run[e * spe : (e + 1) * spe]
        seen = np.concatenate([b["labels"][b["valid"] == 1] for b in batches])
        assert sorted(seen.tolist()) == list(range(37))  # each example exactly once
        assert sum(int((b["valid"] == 0).sum()) for b in batches) == 5 * spe - 37
        epochs.append([b["labels"].tolist() for b in batches])
    assert epochs[0] != epochs[1]  # a fresh order every epoch
    for position in (0, 5, spe, 2 * spe + 3):
        resumed = data.BucketedBatches(
            examples, batch_size=5, seed=1, buckets=(4, 8, 12), position=position
        )
        for expected in run[position:]:
            got = next(resumed)
            assert got.keys() == expected.keys()
            for k in got:
                np.testing.assert_array_equal(got[k], expected[k])
    other = data.BucketedBatches(examples, batch_size=5, seed=2, buckets=(4, 8, 12))
    assert [next(other)["labels"].tolist() for _ in range(spe)] != epochs[0]
    with pytest.raises(ValueError, match="2-D 'attention_mask'"):
        data.BucketedBatches({"x": np.zeros(4)}, batch_size=2, seed=0)


def test_bucketed_sequential_batches_cover_all_examples_once():
    examples, _ = _ragged(n=11)
    batches = list(data.bucketed_sequential_batches(examples, 4, (8, 16)))
    seen = np.concatenate([b["labels"][b["valid"] == 1] for b in batches])
    assert sorted(seen.tolist()) == list(range(11))
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    small = list(data.bucketed_sequential_batches(_ragged(n=3)[0], 8, (8, 16)))
    assert len(small) == 1 and small[0]["valid"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_bucketed_loss_equals_the_unbucketed_loss_on_the_same_examples():
    # a tiny random BERT classifier: each bucketed batch (cut to its bucket, short batches
    # filled with valid=0 rows) gives the same valid-weighted loss as the same real
    # examples padded to max_length, computed independently
    import jax
    import jax.numpy as jnp

    from jaxlora.models import bert

    config = bert.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    params = bert.init_params(jax.random.key(0), config)
    head = 0.1 * jax.random.normal(jax.random.key(1), (16, 3))
    examples, _ = _ragged(n=13, max_length=20)
    examples["labels"] = examples["labels"] % 3

    @jax.jit
    def per_example_nll(batch):
        hidden = bert.apply(params, batch["input_ids"], batch["attention_mask"], config=config)
        logp = jax.nn.log_softmax(bert.mean_pool(hidden, batch["attention_mask"]) @ head)
        return -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]

    def weighted(batch):
        w = batch["valid"].astype(np.float32)
        return float(jnp.sum(per_example_nll(batch) * w) / jnp.sum(w))

    it = data.BucketedBatches(examples, batch_size=4, seed=0, buckets=(6, 12))
    shapes = set()
    for position in range(it.steps_per_epoch):
        b = it.batch_at(position)
        shapes.add(b["input_ids"].shape[1])
        real = b["labels"][b["valid"] == 1]  # labels are the example indices mod 3
        idx = it.indices(position)[0][b["valid"] == 1]
        full = {k: v[idx] for k, v in examples.items()}
        np.testing.assert_array_equal(full["labels"], real)
        unbucketed = float(jnp.mean(per_example_nll(full)))
        np.testing.assert_allclose(weighted(b), unbucketed, rtol=2e-6)
    assert len(shapes) > 1  # the batches really were padded to different lengths
