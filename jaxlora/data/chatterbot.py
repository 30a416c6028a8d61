"""The chatterbot dialogue corpus as ``(prompt, response)`` pairs.

Each YAML file lists ``conversations``, each a list of statements. In chatterbot's own
semantics every statement answers the one before it, so a conversation of ``n`` statements
gives ``n - 1`` pairs. Files are read in sorted order, so the pair order is reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path


def load_dialogues(
    categories: Sequence[str] | None = None, directory: str | Path | None = None
) -> list[tuple[str, str]]:
    """Reads ``(prompt, response)`` pairs from the corpus.

    Args:
      categories: file stems to read (``"ai"``, ``"computers"``, ...); all by default.
      directory: a language directory of the corpus; the installed English one by default.

    Returns:
      The pairs, file by file in sorted file order.

    Raises:
      jaxlora.assets.AssetNotFoundError: if the package is not installed.
      FileNotFoundError: for an unknown category.
    """
    import yaml

    if directory is None:
        from jaxlora import assets

        directory = assets.chatterbot_dir()
    files = sorted(Path(directory).glob("*.yml"))
    if categories is not None:
        known = {f.stem: f for f in files}
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise FileNotFoundError(
                f"unknown chatterbot categories {unknown}; known {sorted(known)}"
            )
        files = [known[c] for c in sorted(categories)]
    pairs = []
    for file in files:
        for conversation in yaml.safe_load(file.read_text(encoding="utf-8"))["conversations"]:
            statements = [str(s).strip() for s in conversation]
            pairs += list(itertools.pairwise(statements))
    return pairs
