"""Deterministic splitting, fixed-length padding and resumable batching.

A data set here is a dict of equal-length numpy arrays (``input_ids``, ``attention_mask``,
``labels``, ...), padded once to a fixed length so every batch has the same shape and a
jitted step compiles once. Batch order is a pure function of ``(seed, position)``: batch
``position`` comes from epoch ``position // steps_per_epoch`` whose permutation is drawn
from ``numpy.random.default_rng([seed, epoch])``. A checkpoint therefore only needs the
integer position to resume bit-exactly, and no iterator state is ever pickled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

Examples = Mapping[str, np.ndarray]


def train_validation_split(
    items: Sequence[T],
    *,
    validation_fraction: float,
    seed: int,
    groups: Sequence[object] | None = None,
) -> tuple[list[T], list[T]]:
    """Splits items deterministically, stratified by group when groups are given.

    Args:
      items: the examples.
      validation_fraction: share of each group that goes to validation (rounded, at least
        one item per group of two or more).
      seed: the split seed; the same seed gives the same split.
      groups: a label per item; each group is split separately so that validation keeps the
        class balance of the whole set.

    Returns:
      ``(train, validation)``, each in the original item order.

    Examples:
      >>> train, val = train_validation_split(list(range(10)), validation_fraction=0.2, seed=0)
      >>> len(train), len(val), sorted(train + val) == list(range(10))
      (8, 2, True)
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    labels = list(groups) if groups is not None else [0] * len(items)
    if len(labels) != len(items):
        raise ValueError(f"{len(items)} items but {len(labels)} groups")
    rng = np.random.default_rng(seed)
    in_validation = np.zeros(len(items), bool)
    # Groups in first-seen order, so the split never depends on how labels sort.
    for group in dict.fromkeys(labels):
        members = np.flatnonzero([label == group for label in labels])
        count = round(validation_fraction * len(members))
        if validation_fraction > 0 and len(members) >= 2:
            count = max(count, 1)
        in_validation[rng.permutation(members)[:count]] = True
    train = [x for x, v in zip(items, in_validation) if not v]
    validation = [x for x, v in zip(items, in_validation) if v]
    return train, validation


def pad_to_length(
    sequences: Sequence[Sequence[int]], length: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads (or truncates) token sequences to one length.

    Args:
      sequences: token id lists.
      length: the fixed length.
      pad_id: id written into padding positions (masked out; any valid id works).

    Returns:
      ``(ids, mask)``, both int32 ``(len(sequences), length)``; mask is 1 on real tokens.

    Examples:
      >>> ids, mask = pad_to_length([[5, 6, 7], [8]], 2, pad_id=0)
      >>> ids.tolist(), mask.tolist()
      ([[5, 6], [8, 0]], [[1, 1], [1, 0]])
    """
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:length]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _num_examples(data: Examples) -> int:
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays of a data set must have equal lengths, got {sizes}")
    return next(iter(sizes.values()))


class Batches:
    """An endless, shuffled, resumable iterator of fixed-size batches.

    Every epoch is a fresh permutation of all examples; the last ``n % batch_size``
    examples of each permutation are dropped so that batch shapes never change (they are
    different examples in every epoch). ``position`` counts the batches produced so far;
    ``Batches(data, ..., position=p)`` continues exactly where a run at position ``p`` was.

    Examples:
      >>> import numpy as np
      >>> data = {"x": np.arange(10)}
      >>> it = Batches(data, batch_size=4, seed=0)
      >>> first = [next(it)["x"].tolist() for _ in range(3)]
      >>> it.position
      3
      >>> resumed = Batches(data, batch_size=4, seed=0, position=2)
      >>> next(resumed)["x"].tolist() == first[2]
      True
    """

    def __init__(
        self,
        data: Examples,
        *,
        batch_size: int,
        seed: int,
        position: int = 0,
        shuffle: bool = True,
    ):
        """Creates the iterator.

        Args:
          data: dict of equal-length arrays.
          batch_size: examples per batch; at most the number of examples.
          seed: the order seed.
          position: number of batches already consumed (from a checkpoint).
          shuffle: False keeps the data order in every epoch.
        """
        self.data = dict(data)
        self.num_examples = _num_examples(self.data)
        if not 0 < batch_size <= self.num_examples:
            raise ValueError(f"batch_size {batch_size} must be in [1, {self.num_examples}]")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per pass over the data."""
        return self.num_examples // self.batch_size

    def indices(self, position: int) -> np.ndarray:
        """Example indices of batch ``position`` (a pure function of seed and position).

        Args:
          position: the batch's index since the start of training.

        Returns:
          ``(batch_size,)`` int indices into the data.
        """
        epoch, step = divmod(position, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                if self.shuffle
                else np.arange(self.num_examples)
            )
            self._epoch_order = (epoch, order)
        order = self._epoch_order[1]
        return order[step * self.batch_size : (step + 1) * self.batch_size]

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """Batch ``position`` without moving the iterator.

        Args:
          position: the batch's index since the start of training.

        Returns:
          A dict of arrays with leading dimension ``batch_size``.
        """
        idx = self.indices(position)
        return {k: v[idx] for k, v in self.data.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch


def sequential_batches(data: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over every example, for evaluation.

    The last batch is filled up to ``batch_size`` by repeating example 0, and every batch
    has a ``valid`` array (1 for real examples) to weight metrics, so shapes stay fixed.

    Args:
      data: dict of equal-length arrays.
      batch_size: examples per batch.

    Yields:
      Dicts of arrays with leading dimension ``batch_size``, plus ``valid``.

    Examples:
      >>> import numpy as np
      >>> [b["valid"].tolist() for b in sequential_batches({"x": np.arange(3)}, 2)]
      [[1, 1], [1, 0]]
    """
    n = _num_examples(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = (idx < n).astype(np.int32)
        idx = np.where(valid == 1, idx, 0)
        yield {**{k: v[idx] for k, v in data.items()}, "valid": valid}


def bucket_lengths(max_length: int, buckets: Sequence[int] = (16, 32, 48, 64)) -> tuple[int, ...]:
    """The padded lengths a bucketed batch may have: ``buckets`` capped at ``max_length``.

    Lengths above ``max_length`` are dropped and ``max_length`` itself is always the last
    bucket, so every example fits one.

    Args:
      max_length: the length the data set is padded to.
      buckets: candidate lengths (any order).

    Returns:
      Sorted, distinct lengths ending with ``max_length``.

    Examples:
      >>> bucket_lengths(40), bucket_lengths(64), bucket_lengths(16, ())
      ((16, 32, 40), (16, 32, 48, 64), (16,))
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    bad = [b for b in buckets if not (isinstance(b, int | np.integer) and b > 0)]
    if bad:
        raise ValueError(f"bucket lengths must be positive integers, got {list(buckets)}")
    return tuple(sorted({int(b) for b in buckets if b < max_length} | {max_length}))


def sequence_lengths(mask: np.ndarray) -> np.ndarray:
    """Each row's length: one past its last nonzero mask position (0 for an empty row).

    Examples:
      >>> sequence_lengths(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])).tolist()
      [2, 1, 0]
    """
    mask = np.asarray(mask) != 0
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0)


class BucketedBatches:
    """Shuffled, resumable batches of similar-length examples, padded to a few lengths.

    A jitted step compiles once per distinct input shape. Padding every batch to the data
    set's ``max_length`` keeps one shape but wastes compute on short texts; padding each
    batch to its own longest example recompiles for nearly every batch. This pads each
    batch to the next of a few ``buckets`` lengths, so a step compiles at most
    ``len(buckets)`` times, and groups examples of similar length so that little is padded.

    Epoch ``e`` is a pure function of ``(seed, e)``: a permutation of all examples from
    ``numpy.random.default_rng([seed, e])`` is split (stably, so the shuffle survives) by the
    smallest bucket each example fits; each bucket's examples are cut into batches, the
    few left over join the next (longer) bucket, and the last left-overs make one short
    batch filled up with copies of its first example marked ``valid = 0``. The batches are
    then shuffled with the same generator. So every example appears exactly once per epoch,
    every epoch has ``ceil(n / batch_size)`` batches, and ``position`` alone resumes.

    Each batch has every sequence array (a 2-D+ array whose second axis is the padded
    length) cut to the batch's bucket length, the other arrays as they are, and ``valid``
    (int32, 1 for real examples): weight per-example losses by it.

    Examples:
      >>> import numpy as np
      >>> mask = np.array([[1] * n + [0] * (8 - n) for n in (1, 2, 7, 8, 3)])
      >>> data = {"attention_mask": mask, "labels": np.arange(5)}
      >>> it = BucketedBatches(data, batch_size=2, seed=0, buckets=(4, 8))
      >>> it.steps_per_epoch, it.buckets
      (3, (4, 8))
      >>> epoch = [next(it) for _ in range(3)]
      >>> sorted(b["attention_mask"].shape[1] for b in epoch)
      [4, 8, 8]
      >>> sorted(int(x) for b in epoch for x, v in zip(b["labels"], b["valid"]) if v)
      [0, 1, 2, 3, 4]
      >>> resumed = BucketedBatches(data, batch_size=2, seed=0, buckets=(4, 8), position=2)
      >>> next(resumed)["labels"].tolist() == epoch[2]["labels"].tolist()
      True
    """

    def __init__(
        self,
        data: Examples,
        *,
        batch_size: int,
        seed: int,
        buckets: Sequence[int] = (16, 32, 48, 64),
        position: int = 0,
        shuffle: bool = True,
        length_key: str = "attention_mask",
    ):
        """Creates the iterator.

        Args:
          data: dict of equal-length arrays; ``data[length_key]`` is the ``(n, max_length)``
            mask whose last nonzero position gives each example's length.
          batch_size: examples per batch; at most the number of examples.
          seed: the order seed.
          buckets: the padded lengths, capped at ``max_length`` (:func:`bucket_lengths`).
          position: number of batches already consumed (from a checkpoint).
          shuffle: False keeps the data order within each bucket and the bucket order.
          length_key: the mask array that gives the lengths.
        """
        self.data = dict(data)
        self.num_examples = _num_examples(self.data)
        if length_key not in self.data or np.ndim(self.data[length_key]) != 2:
            raise ValueError(
                f"BucketedBatches needs a 2-D {length_key!r} mask among the arrays, "
                f"got {sorted(self.data)}"
            )
        if not 0 < batch_size <= self.num_examples:
            raise ValueError(f"batch_size {batch_size} must be in [1, {self.num_examples}]")
        self.max_length = self.data[length_key].shape[1]
        self.buckets = bucket_lengths(self.max_length, buckets)
        self.lengths = sequence_lengths(self.data[length_key])
        # the smallest bucket each example fits
        self._bucket = np.searchsorted(np.asarray(self.buckets), self.lengths, side="left")
        self._sequence_keys = tuple(
            k for k, v in self.data.items() if np.ndim(v) >= 2 and v.shape[1] == self.max_length
        )
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self._epoch_plan: tuple[int, list[tuple[np.ndarray, int]]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per pass over the data: ``ceil(n / batch_size)``."""
        return -(-self.num_examples // self.batch_size)

    def _plan(self, epoch: int) -> list[tuple[np.ndarray, int]]:
        """Epoch ``epoch``'s batches as ``(example indices, bucket length)``, in order."""
        if self._epoch_plan is not None and self._epoch_plan[0] == epoch:
            return self._epoch_plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        n, bs = self.num_examples, self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        by_bucket = order[np.argsort(self._bucket[order], kind="stable")]
        ends = np.searchsorted(self._bucket[by_bucket], np.arange(len(self.buckets)), "right")
        groups, carry, start = [], np.zeros(0, np.int64), 0
        for end in ends:
            members = np.concatenate([carry, by_bucket[start:end]])
            full = len(members) // bs * bs
            groups += [members[k : k + bs] for k in range(0, full, bs)]
            carry, start = members[full:], end
        if len(carry):
            groups.append(carry)
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        lengths = np.asarray(self.buckets)
        plan = [(g, int(lengths[self._bucket[g].max()])) for g in groups]
        self._epoch_plan = (epoch, plan)
        return plan

    def indices(self, position: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Batch ``position`` as ``(indices, valid, length)``: ``batch_size`` example indices
        (a short batch repeats its first), their 0/1 validity and the padded length."""
        epoch, step = divmod(position, self.steps_per_epoch)
        idx, length = self._plan(epoch)[step]
        valid = np.zeros(self.batch_size, np.int32)
        valid[: len(idx)] = 1
        filled = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[0], idx.dtype)])
        return filled, valid, length

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """Batch ``position`` without moving the iterator.

        Args:
          position: the batch's index since the start of training.

        Returns:
          A dict of arrays with leading dimension ``batch_size``, sequence arrays cut to the
          batch's bucket length, plus ``valid``.
        """
        idx, valid, length = self.indices(position)
        batch = {
            k: v[idx, :length] if k in self._sequence_keys else v[idx] for k, v in self.data.items()
        }
        return {**batch, "valid": valid}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch


def bucketed_sequential_batches(
    data: Examples,
    batch_size: int,
    buckets: Sequence[int] = (16, 32, 48, 64),
    *,
    length_key: str = "attention_mask",
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every example, for evaluation, in batches padded to a few lengths.

    Examples go in order of their bucket (data order within one), so each batch is padded
    to the next bucket length of its longest example; the last batch of the pass is filled
    up as in :func:`sequential_batches`. Metrics summed with the ``valid`` weights equal
    those of :func:`sequential_batches`.

    Examples:
      >>> import numpy as np
      >>> mask = np.array([[1] * n + [0] * (8 - n) for n in (7, 1, 2)])
      >>> out = list(bucketed_sequential_batches({"attention_mask": mask}, 2, (4, 8)))
      >>> [(b["attention_mask"].shape[1], b["valid"].tolist()) for b in out]
      [(4, [1, 1]), (8, [1, 0])]
    """
    plan = BucketedBatches(
        data,
        batch_size=min(batch_size, _num_examples(data)),
        seed=0,
        buckets=buckets,
        shuffle=False,
        length_key=length_key,
    )
    if plan.batch_size != batch_size:  # fewer examples than one batch: fill up to it
        plan.batch_size = batch_size
    for position in range(plan.steps_per_epoch):
        yield plan.batch_at(position)
