"""The fair benchmark harness: CPU accounting, validity, and a quick end-to-end run."""

import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness, procstat

ROOT = Path(__file__).resolve().parent.parent


def test_window_counts_this_process_not_others():
    with procstat.Window() as w:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            pass
    assert w.wall >= 0.3
    assert 0.05 < w.own_cores < 1.2  # one busy thread, however loaded the machine is
    assert w.other_cores >= 0.0


def _run(case, median, other):
    return {
        "case": case,
        "trainable": 10,
        "median_s": median,
        "tokens_per_step": 100,
        "step_rss_mib": 5.0,
        "first_loss": 1.0,
        "other_cores": other,
    }


def test_rounds_timed_on_a_busy_machine_are_discarded():
    mixed = harness.summarize([_run("a", 0.2, 0.01), _run("a", 0.4, 0.5), _run("a", 0.3, 0.0)], 0.2)
    assert mixed["valid"] and mixed["rounds"] == 2 and mixed["discarded"] == 1
    assert abs(mixed["median_s"] - 0.25) < 1e-12
    assert (mixed["min_s"], mixed["max_s"]) == (0.2, 0.3)
    assert mixed["tokens_per_s"] == 100 / mixed["median_s"]
    busy = harness.summarize([_run("a", 0.2, 0.3), _run("a", 0.4, 0.5)], 0.2)
    assert not busy["valid"] and "median_s" not in busy
    assert harness.summarize([_run("a", 0.2, 0.3)], float("inf"))["valid"]  # --allow-load


def test_ratios_are_taken_round_by_round_over_valid_rounds():
    runs = {
        "lora_all": [
            _run("lora_all", 0.5, 0.0),
            _run("lora_all", 0.25, 0.0),
            _run("lora_all", 1, 0),
        ],
        "peft_lora_all": [
            _run("peft_lora_all", 1.0, 0.0),
            _run("peft_lora_all", 1.0, 0.0),
            _run("peft_lora_all", 9.0, 0.9),  # busy: this round is left out of the ratio
        ],
        "full": [_run("full", 0.8, 0.0), _run("full", 0.5, 0.0), _run("full", 1.0, 0.0)],
    }
    got = {(q["case"], q["over"]): q for q in harness.ratios(runs, 0.2)}
    peer = got[("lora_all", "peft_lora_all")]
    assert (peer["rounds"], peer["min"], peer["max"]) == (2, 2.0, 4.0)
    assert peer["median"] == 3.0 and peer["kind"] == "tokens/s"
    own = got[("lora_all", "full")]
    assert own["rounds"] == 3 and own["kind"] == "step time"
    assert own["median"] == 0.625 and (own["min"], own["max"]) == (0.5, 1.0)


def test_quick_run_end_to_end():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "decoder", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("| full |", "| lora_all |", "| peft_lora_all |"):
        assert case in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "| lora_all | peft_lora_all |" in proc.stdout
    assert "error" not in proc.stdout.split("| jaxlora case")[0]
