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
