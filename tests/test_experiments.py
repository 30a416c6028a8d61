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


def test_qlora_variant_is_e2_lora_on_an_nf4_base():
    local, qlora = (
        config_lib.load("e2_causal_lm", "local"),
        config_lib.load("e2_causal_lm", "qlora"),
    )
    assert qlora.base_quantization == "nf4" and local.base_quantization is None
    (lora,) = qlora.methods
    assert lora == next(m for m in local.methods if m.name == "lora")
    assert (qlora.steps, qlora.batch_size, qlora.max_length) == (
        local.steps,
        local.batch_size,
        local.max_length,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (assets.available("smollm2") and assets.available("chatterbot")),
    reason="needs the SmolLM2 and chatterbot assets: bash scripts/assets.sh",
)
@pytest.mark.parametrize("quant", ["nf4", "q4_1"])
def test_causal_lm_tiny_config_on_a_quantized_base(tmp_path, quant):
    config = dataclasses.replace(config_lib.load("e2_causal_lm", "tiny"), base_quantization=quant)
    (row,) = runner.run(config, tmp_path, quiet=True)["rows"]
    assert len(row["losses"]) == 2 and row["after"]["loss"] > 0


def test_config_field_of_the_wrong_type_is_named():
    config = config_lib.load("e1_topics", "tiny")
    with pytest.raises(runner.ConfigError, match=r"ExperimentConfig.steps must be int, got '4'"):
        runner.validate(dataclasses.replace(config, steps="4"))
    methods = (config.methods[0], dataclasses.replace(config.methods[1], learning_rate="1e-3"))
    with pytest.raises(runner.ConfigError, match=r"methods\[1\].learning_rate must be float"):
        runner.validate(dataclasses.replace(config, methods=methods))
    with pytest.raises(runner.ConfigError, match=r"learning_rate must be finite"):
        bad = (dataclasses.replace(config.methods[1], learning_rate=float("nan")),)
        runner.validate(dataclasses.replace(config, methods=bad))
    with pytest.raises(runner.ConfigError, match=r"on_nonfinite must be one of"):
        runner.validate(dataclasses.replace(config, on_nonfinite="ignore"))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rank": "8", "targets": r".*attn/query/kernel"}, "rank must be a positive integer"),
        ({"rank": 2, "targets": r".*attn/query/kernel", "rnak": 2}, "rnak"),
        ({"rank": 2, "targets": r".*/nothing/kernel"}, "matched no leaf"),
        ({"rank": 2, "alpha": float("nan"), "targets": r".*attn/query/kernel"}, "alpha"),
    ],
)
def test_every_method_is_built_before_the_first_one_trains(tmp_path, kwargs, error):
    config = config_lib.load("e1_topics", "tiny")
    methods = (config.methods[2], MethodConfig("lora", kwargs=kwargs, label="bad"))
    config = dataclasses.replace(config, methods=methods)
    with pytest.raises(runner.ConfigError, match=rf"method 'bad' .*{error}"):
        runner.run(config, tmp_path, quiet=True)
    assert not (tmp_path / config.name / "lora").exists()  # the first never started


def _exploding(config, policy):
    # warm-up from 0, then a learning rate of 1e38: step 2 moves the adapters to ~1e38
    # (finite), so step 3's forward pass overflows
    lora = dataclasses.replace(config.methods[2], learning_rate=1e38)
    return dataclasses.replace(config, methods=(lora,), checkpoint_every=1, on_nonfinite=policy)


def _checkpoint_steps(directory):
    from jaxlora.checkpoint import CheckpointManager

    with CheckpointManager(directory, read_only=True) as mgr:
        return mgr.all_steps()


def test_non_finite_training_stops_before_it_is_checkpointed(tmp_path):
    config = _exploding(config_lib.load("e1_topics", "tiny"), "stop")
    with pytest.raises(runner.NonFiniteError, match=r"lora: step 3 is not finite: loss=(nan|inf)"):
        runner.run(config, tmp_path, quiet=True)
    assert _checkpoint_steps(tmp_path / config.name / "lora" / "checkpoints") == [1, 2]


def test_non_finite_steps_skipped_or_warned_about(tmp_path):
    config = _exploding(config_lib.load("e1_topics", "tiny"), "skip")
    runner.run(config, tmp_path / "skip", quiet=True)
    ckpt = tmp_path / "skip" / config.name / "lora" / "checkpoints"
    assert _checkpoint_steps(ckpt)[-1] == config.steps  # skipped steps leave a finite state
    config = dataclasses.replace(config, on_nonfinite="warn")
    with pytest.warns(UserWarning, match=r"step 3 is not finite.*no further checkpoints"):
        runner.run(config, tmp_path / "warn", quiet=True)
    assert _checkpoint_steps(tmp_path / "warn" / config.name / "lora" / "checkpoints") == [1, 2]


def test_seeds_give_mean_and_spread_and_share_compiled_steps(tmp_path):
    config = dataclasses.replace(
        config_lib.load("e1_topics", "tiny"), max_length=32, buckets=(16, 32)
    )
    result = runner.run(config, tmp_path, methods=["lora"], quiet=True, seeds=2)
    (row,) = result["rows"]
    assert row["seeds"] == [0, 1] and [r["seed"] for r in row["runs"]] == [0, 1]
    accs = [r["after"]["accuracy"] for r in row["runs"]]
    assert row["after"]["accuracy"] == pytest.approx(np.mean(accs))
    spread = row["after_spread"]["accuracy"]
    assert spread["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (spread["min"], spread["max"]) == (min(accs), max(accs))
    runs = [
        json.loads(x)
        for x in (tmp_path / config.name / "lora" / "seed1" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    lengths = {r["length"] for r in runs if "length" in r}
    first = [
        json.loads(x)
        for x in (tmp_path / config.name / "lora" / "seed0" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    lengths |= {r["length"] for r in first if "length" in r}
    # one compile per bucket length used (the longest always, for XLA's figures), all by
    # the first seed: the second reuses them
    assert lengths <= {16, 32}
    assert row["compiles"] == len(lengths | {32})
    assert [r for r in row["runs"]][1]["seed"] == 1
    losses = np.array([[r["loss"] for r in rs if "loss" in r] for rs in (first, runs)])
    np.testing.assert_allclose(row["losses"], losses.mean(0), rtol=1e-6)
    assert not np.array_equal(losses[0], losses[1])  # the seeds really differ
    md = compare.table([result])
    assert f"{row['after']['accuracy']:.3f} ± {spread['std']:.3f}" in md
    assert f"{spread['min']:.3f}–{spread['max']:.3f}" in md and "over 2 seeds" in md
    plots = compare.plot(result, tmp_path / config.name)
    assert all(p.stat().st_size > 10_000 for p in plots)


def test_table_marks_differences_beyond_the_spread():
    def row(name, values, params=10):
        return {
            "method": name,
            "trainable_params": params,
            "method_params": params,
            "before": {"accuracy": 0.1},
            "after": {"accuracy": float(np.mean(values))},
            "after_spread": {
                "accuracy": {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)),
                    "min": min(values),
                    "max": max(values),
                }
            },
            "seeds": [0, 1],
            "trainable_bytes": 40,
        }

    result = {
        "config": {"name": "x"},
        "metric": "accuracy",
        "seeds": 2,
        "rows": [
            row("full", [0.80, 0.82], 1000),
            row("a", [0.85, 0.86]),
            row("b", [0.81, 0.83]),
        ],
    }
    md = compare.table([result])
    assert "| x | a | 10 | 10 | 0.100 | 0.855 ± 0.007 | 0.850–0.860 | +0.045 * |" in md
    assert "| +0.010 |" in md  # b's range overlaps full FT's: no star


def test_sweep_picks_the_best_dev_rate_without_the_validation_set(tmp_path):
    from experiments import sweep

    base = config_lib.load("e1_topics", "tiny")
    config = sweep.sweep_config(base, (1.0, 30.0), methods=["lora"], dev_examples=16)
    assert [m.display for m in config.methods] == ["lora@1", "lora@30"]
    assert config.eval_split == "dev"
    assert [m.learning_rate for m in config.methods] == [1e-3, pytest.approx(3e-2)]
    result = runner.run(config, tmp_path, quiet=True)
    choices = sweep.choose(result, config, (1.0, 30.0))
    tried = choices["lora"]["tried"]
    best = max(tried, key=lambda t: t["accuracy"])
    assert choices["lora"]["chosen"] == best["learning_rate"]
    assert "| lora | 0.001 |" in sweep.markdown(choices, "accuracy")
    # the dev set is training quotes outside the training subset, not the validation split
    from experiments.tasks import TASKS

    dev, val = TASKS["classification"](config), TASKS["classification"](base)
    train_texts = {tuple(x) for x in dev.train["input_ids"].tolist()}
    assert not train_texts & {tuple(x) for x in dev.eval["input_ids"].tolist()}
    assert not np.array_equal(dev.eval["input_ids"], val.eval["input_ids"])
    with pytest.raises(ValueError, match="max_train_examples"):
        sweep.sweep_config(dataclasses.replace(base, max_train_examples=None))


def test_training_subset_is_random_not_the_first_class():
    from experiments.tasks import TASKS

    task = TASKS["classification"](config_lib.load("e1_topics", "tiny"))
    assert len(task.train["labels"]) == 64
    assert len(set(task.train["labels"].tolist())) >= 4  # the loaders group by class


def test_collect_joins_method_subsets_in_config_order():
    config = config_lib.load("e1_topics", "tiny")

    def part(names, seeds=2):
        rows = [
            {"method": n, "median_step_s": s, "temp_bytes": 100 * (s or 0), "trainable_params": 1}
            for n, s in names
        ]
        # as run() records it: the config's every method, whichever subset ran
        methods = [{"name": n, "label": None} for n in ("untrained", "delta_lora", "lora")]
        return {"config": {"name": config.name, "methods": methods}, "seeds": seeds, "rows": rows}

    a, b = part([("lora", 2.0)]), part([("untrained", None), ("delta_lora", 4.0)])
    joined = compare.collect(config, [a, b])
    assert [r["method"] for r in joined["rows"]] == ["untrained", "delta_lora", "lora"]
    assert [m["name"] for m in joined["config"]["methods"]] == ["untrained", "delta_lora", "lora"]
    assert "time_vs_full" not in joined["rows"][2]  # no full FT among them
    full = part([("full", 4.0)])
    joined = compare.collect(config, [a, full])
    rows = {r["method"]: r for r in joined["rows"]}
    assert rows["lora"]["time_vs_full"] == 0.5 and rows["full"]["time_vs_full"] == 1.0
    with pytest.raises(ValueError, match="different settings"):
        compare.collect(config, [a, part([("full", 1.0)], seeds=3)])
    with pytest.raises(ValueError, match="repeated"):
        compare.collect(config, [a, a])
