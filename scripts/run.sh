#!/usr/bin/env bash
# The main job: experiment E1 (all-MiniLM-L6-v2 on fortune topics) for every method, on
# this machine's CPU, from the offline assets. Prints the results table; writes it with the
# plots under results/ (or the directory given as the first argument).
set -euo pipefail
source "$(dirname "$0")/setup.sh" experiments
export HF_HUB_OFFLINE=1
python -m experiments.compare --configs e1_topics --variant local --out "${1:-results}"
