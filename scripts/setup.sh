#!/usr/bin/env bash
# Install reshard into the active Python (`--test` adds the test extras). When no torch is
# importable, the CPU wheel goes in first: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PY -m pip install -q -e ".[test]"
else
  $PY -m pip install -q -e .
fi
