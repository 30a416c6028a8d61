#!/usr/bin/env bash
# The test command: lint, then the test-suite (doctests included) in the project venv.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m slow  or  -k adapt.
set -euo pipefail
source "$(dirname "$0")/setup.sh" test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
ruff format --check .
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
