"""The experiment layer end to end on a tiny config, and its fail-fast validation."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import compare
from experiments import config as config_lib
from experiments import run as runner
from experiments.config import MethodConfig
from jaxlora import assets

ROOT = pathlib.Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    not (assets.available("minilm") and assets.available("fortunes")),
    reason="needs the MiniLM and fortunes assets: bash scripts/assets.sh",
)


def test_tiny_config_end_to_end(tmp_path):
    config = config_lib.load("e1_topics", "tiny")
    result = runner.run(config, tmp_path, quiet=True)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["untrained"]["after"] == rows["untrained"]["before"]
    lora = rows["lora"]
    assert len(lora["losses"]) == config.steps
    assert lora["trainable_params"] == lora["method_params"] + 384 * 6 + 6
    assert lora["flops"] > 0 and lora["temp_bytes"] > 0
    lines = (tmp_path / config.name / "lora" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["eval"] == lora["before"]
    assert json.loads(lines[-1])["eval"] == lora["after"]
    events = list((tmp_path / config.name / "lora" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    plots = compare.plot(result, tmp_path / config.name)
    assert all(p.stat().st_size > 10_000 for p in plots)
    md = compare.table([result])
    assert "| e1_topics_tiny | lora | 11,526 |" in md


def test_interrupted_run_resumes_bit_exactly(tmp_path):
    config = dataclasses.replace(config_lib.load("e1_topics", "tiny"), checkpoint_every=2)
    methods = ["delta_lora", "lora"]
    whole = runner.run(config, tmp_path / "whole", methods=methods, quiet=True)
    runner.run(config, tmp_path / "cut", methods=methods, quiet=True, stop_after=3)
    resumed = runner.run(config, tmp_path / "cut", methods=methods, quiet=True, resume=True)
    for a, b in zip(whole["rows"], resumed["rows"]):
        assert a["losses"] == b["losses"]  # steps 1-2 from the log, 3-4 recomputed
        assert a["after"] == b["after"]
        assert b["checkpoint_bytes"] > 0
    lora = resumed["rows"][1]
    # the adapter checkpoint holds the adapters and Adam's two moments, not the base
    assert lora["checkpoint_bytes"] < 4 * lora["trainable_bytes"] + 64 * 1024


def test_unknown_method_fails_before_training():
    config = config_lib.load("e1_topics", "tiny")
    bad = dataclasses.replace(config, methods=(MethodConfig("lorra"),))
    with pytest.raises(runner.ConfigError, match=r"unknown method 'lorra'.*'lora'"):
        runner.validate(bad)


def test_impossible_mesh_fails_before_training():
    config = config_lib.load("e1_topics", "tiny")
    with pytest.raises(runner.ConfigError, match=r"mesh \{'data': 3\} does not fit 1 device"):
        runner.validate(dataclasses.replace(config, mesh={"data": 3}))


def test_missing_asset_fails_before_training(monkeypatch):
    def missing(name):
        raise assets.AssetNotFoundError(f"asset {name!r} is not installed")

    monkeypatch.setattr(assets, "path", missing)
    with pytest.raises(runner.ConfigError, match=r"asset 'minilm' is not installed"):
        runner.validate(config_lib.load("e1_topics", "tiny"))


def test_unknown_config_and_variant():
    with pytest.raises(ValueError, match="unknown experiment config 'e9'"):
        config_lib.load("e9")
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        config_lib.load("e1_topics", "huge")


def test_tiny_config_on_a_two_device_mesh_matches_one_device(tmp_path):
    # the flag only works before JAX starts, so the 2-device run is its own process
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "e1_topics",
        "--variant",
        "tiny",
        "--methods",
        "lora",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=240)
    two = json.loads((out / "e1_topics_tiny" / "results.json").read_text())["rows"][0]
    one = runner.run(
        config_lib.load("e1_topics", "tiny"), tmp_path / "one", methods=["lora"], quiet=True
    )["rows"][0]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert two["after"]["accuracy"] == one["after"]["accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (assets.available("smollm2") and assets.available("chatterbot")),
    reason="needs the SmolLM2 and chatterbot assets: bash scripts/assets.sh",
)
def test_causal_lm_tiny_config_end_to_end(tmp_path):
    config = config_lib.load("e2_causal_lm", "tiny")
    (row,) = runner.run(config, tmp_path, quiet=True)["rows"]
    assert len(row["losses"]) == 2 and row["after"]["loss"] > 0
    assert len(row["samples_before"]) == len(row["samples_after"]) == 1
    assert "<|im_end|>" not in row["samples_after"][0]
