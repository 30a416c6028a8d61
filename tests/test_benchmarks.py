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


def test_a_round_with_a_busy_machine_invalidates_the_case():
    quiet = harness.summarize([_run("a", 0.2, 0.01), _run("a", 0.4, 0.05)], 0.2)
    busy = harness.summarize([_run("a", 0.2, 0.01), _run("a", 0.4, 0.5)], 0.2)
    assert quiet["valid"] and not busy["valid"]
    assert abs(quiet["median_s"] - 0.3) < 1e-12
    assert (quiet["min_s"], quiet["max_s"]) == (0.2, 0.4)
    assert quiet["tokens_per_s"] == 100 / quiet["median_s"]


def test_ratios_are_peer_time_over_ours():
    rows = {
        "lora_all": harness.summarize([_run("lora_all", 0.5, 0.0)], 0.2),
        "peft_lora_all": harness.summarize([_run("peft_lora_all", 1.0, 0.0)], 0.2),
        "full": harness.summarize([_run("full", 0.8, 0.0)], 0.2),
    }
    ratios = {(a, b): v for a, b, v in harness._ratio_rows(rows)}
    assert ratios[("lora_all", "peft_lora_all")] == 2.0
    assert ratios[("lora_all", "full (time ratio)")] == 0.625


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
