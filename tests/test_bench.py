"""Smoke test of ``scripts/bench.py --quick``: structure and XLA flop ratios, never wall time.

The machine is shared and timing is noisy, so nothing here reads a step time; flops and
XLA's memory figures are deterministic for a program and backend, and the step-0 losses
show that every contestant trains the same model on the same batch.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # bench.py imports its sibling scripts by name

import bench  # noqa: E402

CASES = ["full", "lora attention", "lora all-linear"]
PEERS = ["peft attention", "qwix all-linear"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("qwix")
    out = tmp_path_factory.mktemp("bench") / "results"
    cases = ",".join(CASES + PEERS)
    argv = ["--quick", "--no-rss", "--steps", "2", "--warmup", "1", "--cases", cases]
    res = bench.main([*argv, "--out", str(out)])
    return res, out


def test_every_case_ran_with_timings(result):
    res, _ = result
    assert res["errors"] == {}
    rows = {r["case"]: r for r in res["rows"]}
    assert list(rows) == CASES + PEERS
    for r in rows.values():
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["tokens_per_s"] > 0
    assert set(res["peer_ratios"]) == {"peft attention", "qwix all-linear"}


def test_all_contestants_train_the_same_model(result):
    # every method starts from ΔW = 0, so step 0 is the base model's loss on the batch
    res, _ = result
    losses = [r["step0_loss"] for r in res["rows"]]
    assert max(losses) - min(losses) < 1e-4, losses


def test_flop_ratios(result):
    rows = {r["case"]: r for r in result[0]["rows"]}
    assert rows["full"]["flops_ratio"] == 1.0
    assert rows["lora attention"]["flops_ratio"] <= 0.70
    # at d = 128 a rank-8 branch is 6% of each kernel, so all-linear sits a little higher
    assert rows["lora all-linear"]["flops_ratio"] <= 0.75
    # Qwix computes the same unmerged products; jaxlora must not do more work
    assert rows["lora all-linear"]["flops"] <= rows["qwix all-linear"]["flops"] * 1.01
    for name in ("lora attention", "lora all-linear"):
        assert rows[name]["xla_mem_ratio"] < 1.0
    assert rows["peft attention"]["flops"] is None  # torch: no XLA figures


def test_outputs_written(result):
    res, out = result
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    md = out.with_suffix(".md").read_text()
    assert "| lora all-linear |" in md and "| target | measured | bound | met |" in md
    assert {t["target"] for t in res["targets"]} >= {"LoRA all-linear tokens/s / Qwix"}


def test_peak_rss_is_measured_in_a_fresh_process():
    argv = ["--preset", "tiny", "--dtype", "float32", "--batch", "2", "--seq", "32"]
    got = bench.rss_in_subprocess("lora all-linear", argv)
    assert isinstance(got, dict), got
    assert got["step_peak"] >= got["after_free"] >= 0
    assert got["step"] == pytest.approx(got["step_peak"] - got["after_free"])


def test_bfloat16_path_on_a_tiny_config():
    # the --gpu path (bfloat16 weights and activations) exercised on CPU
    res = bench.run(
        bench.parse_args(
            ["--preset", "tiny", "--dtype", "bfloat16", "--no-rss", "--steps", "1", "--warmup", "1",
             "--cases", "full,lora all-linear,qwix attention", "--peak-tflops", "1"]
        )
    )  # fmt: skip
    assert res["errors"] == {} and res["config"]["dtype"] == "bfloat16"
    assert all(r["mfu"] > 0 for r in res["rows"])
    assert res["rows"][1]["flops_ratio"] < 1.0
