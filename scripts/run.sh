#!/usr/bin/env bash
# The main job: experiment E1 (all-MiniLM-L6-v2 on fortune topics) for every method, with 2
# seeds each, on this machine's CPU, from the offline assets. Prints the results table (mean
# ± std over the seeds, min–max, and whether each method's difference to full fine-tuning
# exceeds the spread); writes it with the plots under results/ (or the directory given as
# the first argument). SEEDS=3 bash scripts/run.sh runs three (about 1.4x the time).
set -euo pipefail
source "$(dirname "$0")/setup.sh" experiments
export HF_HUB_OFFLINE=1
python -m experiments.compare --configs e1_topics --variant local --seeds "${SEEDS:-2}" \
  --out "${1:-results}"
