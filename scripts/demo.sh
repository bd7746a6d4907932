#!/usr/bin/env bash
# The main job end to end, offline, on the bundled tiny Llama: install, convert at tp 2 x pp 2,
# verify (hashes, bitwise weights, generation on 4 gloo processes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
$PY -m reshard inspect examples/tiny-llama
$PY -m reshard convert examples/tiny-llama --tp 2 --pp 2 -o out/tiny-llama --force
$PY -m reshard verify out/tiny-llama --json out/tiny-llama-verify.json
