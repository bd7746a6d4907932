#!/usr/bin/env bash
# The whole test suite: install with test extras, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh --test
$PY -m ruff check .
$PY -m ruff format --check .
HF_HUB_OFFLINE=1 $PY -m pytest -q -p no:cacheprovider "$@"
