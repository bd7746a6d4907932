#!/usr/bin/env bash
# The whole test suite: install with test extras, lint, then pytest.
#   bash scripts/test.sh [PYTEST ARGS]
#   bash scripts/test.sh --cpu-kernels [PYTEST ARGS]   (also what CI=true does)
#   RESHARD_SKIP_ENGINE=1 bash scripts/test.sh          (without the vLLM engine tier)
# --cpu-kernels then re-runs the float-sensitive tests (marker float_sensitive, see
# tests/conftest.py) under ATEN_CPU_CAPABILITY=default and =avx2: torch picks other CPU kernels
# (other summation orders), which is what another machine does; tolerances must hold on all of
# them (tests/tolerances.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KERNELS=0
if [[ "${1:-}" == "--cpu-kernels" ]]; then
    KERNELS=1
    shift
fi
[[ "${CI:-}" == "true" ]] && KERNELS=1
bash scripts/setup.sh --test
# The engine tier (tests/test_vllm_engine.py) runs vLLM's CPU build from its own cached venv.
if [[ "${RESHARD_SKIP_ENGINE:-}" != "1" ]]; then
    RESHARD_VLLM_PYTHON=$(bash scripts/setup_vllm.sh)
    export RESHARD_VLLM_PYTHON
fi
$PY -m ruff check .
$PY -m ruff format --check .
HF_HUB_OFFLINE=1 $PY -m pytest -q -p no:cacheprovider "$@"
if [[ $KERNELS == 1 ]]; then
    for capability in default avx2; do
        echo "--- float-sensitive tests under ATEN_CPU_CAPABILITY=$capability"
        ATEN_CPU_CAPABILITY=$capability HF_HUB_OFFLINE=1 \
            $PY -m pytest -q -p no:cacheprovider -m float_sensitive tests/
    done
fi
