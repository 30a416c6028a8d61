#!/usr/bin/env bash
# Creates (or refreshes) the project venv and installs jaxlora with what the caller needs.
# Sourced by scripts/run.sh (the `experiments` extra) and scripts/test.sh (`test`):
#   source scripts/setup.sh [experiments|test]
# Re-installs only when pyproject.toml or requirements-assets.txt changed (a stamp file
# records their hash), so a second run starts in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXLORA_VENV:-$ROOT/.venv}"
EXTRA="${1:-experiments}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.jaxlora-${EXTRA}.stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-assets.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing jaxlora[$EXTRA] into $VENV" >&2
  # torch is pinned to a local CPU build in the test extra; never let pip pick another
  python -m pip install -q -e "$ROOT[$EXTRA]"
  bash "$ROOT/scripts/assets.sh"
  echo "$want" > "$stamp"
fi
cd "$ROOT"
