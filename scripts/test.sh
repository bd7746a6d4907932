#!/usr/bin/env bash
# The whole test suite: install with test extras, lint, then pytest.
#   bash scripts/test.sh [PYTEST ARGS]
#   bash scripts/test.sh --cpu-kernels [PYTEST ARGS]   (also what CI=true does)
#   RESHARD_SKIP_ENGINE=1 bash scripts/test.sh          (without the vLLM engine tier)
# --cpu-kernels then re-runs the float-sensitive tests under ATEN_CPU_CAPABILITY=default and
# =avx2: torch picks other CPU kernels (other summation orders), which is what another
# machine does; tolerances must hold on all of them (tests/tolerances.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KERNELS=0
if [[ "${1:-}" == "--cpu-kernels" ]]; then
    KERNELS=1
    shift
fi
[[ "${CI:-}" == "true" ]] && KERNELS=1
FLOAT_TESTS=(
    tests/test_runtime_model.py
    tests/test_streamed_reference.py
    tests/test_runtime_dist.py::test_expert_replicas_are_computed_exactly_once
    tests/test_runtime_dist.py::test_fused_source_runs_like_per_expert_source
    tests/test_runtime_dist.py::test_tp4_llama_from_convert
    tests/test_gemma.py::test_logits_and_greedy_ids_match_transformers
    tests/test_gemma.py::test_streamed_reference_matches_the_full_one
    tests/test_gemma.py::test_each_quirk_decides_the_output
    tests/test_gemma.py::test_final_soft_cap_bites_on_the_fixture
    tests/test_phi3.py::test_runtime_matches_transformers_at_every_position
    tests/test_phi3.py::test_default_rope_with_partial_rotary_matches_transformers
    tests/test_phi3.py::test_world_size_1_generation_is_token_exact
    tests/test_gpt_oss.py::test_logits_and_greedy_ids_match_transformers
    tests/test_gpt_oss.py::test_each_quirk_decides_the_output
    tests/test_glm4_moe.py::test_logits_and_greedy_ids_match_transformers
    tests/test_mxfp4.py::test_world_one_matches_the_dequantized_twin
    tests/test_mxfp4.py::test_dequantizer_equals_transformers_reader
    tests/test_quant_ct.py::test_channel_and_tensor_strategies_split_and_match_the_twin
    tests/test_quant_ct.py::test_w8a8_zero_points_split_with_the_rows
    tests/test_quant_ct.py::test_hf_quant_config_json_is_read_when_config_json_has_none
    tests/test_quant_ct.py::test_streamed_reference_dequantizes_like_the_full_one
    tests/test_qwen3_next.py::test_runtime_matches_transformers_at_every_position
    tests/test_qwen3_next.py::test_world_size_1_generation_is_token_exact
    tests/test_qwen3_next.py::test_streamed_reference_matches_the_full_one
    tests/test_qwen3_5_moe.py::test_runtime_matches_transformers
    tests/test_minimax_m2.py::test_runtime_matches_transformers_and_generates_token_exact
    tests/test_minimax_m2.py::test_tp_statistic_is_averaged_over_the_group
)
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
            $PY -m pytest -q -p no:cacheprovider "${FLOAT_TESTS[@]}"
    done
fi
