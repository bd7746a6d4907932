"""Qwen3-MoE: Qwen3's q/k norms, routed experts in `mlp` (no shared expert); layers in
mlp_only_layers stay dense."""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, DENSE_MLP, GLOBAL, QK_NORM, QWEN_MOE_EXPERTS
from .family import WITH_VLLM, Family
from .moe_config import read_experts


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    layers = fields["num_layers"]
    moe = read_experts(config, where, layers, family="qwen3_moe", width_key="moe_intermediate_size")
    return {**moe, "qk_norm": True}


# vLLM 0.32's Qwen3MoeSparseMoeBlock hands its router to its FusedMoE (`experts.gate`, the
# same storage); its loader keeps that, the smaller key.
VLLM_RENAMES = ((r"(?P<p>.+\.mlp)\.gate\.weight", "{p}.experts.gate.weight"),)

FAMILY = Family(
    vllm_renames=VLLM_RENAMES,
    formats=WITH_VLLM,
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    rules=GLOBAL + ATTENTION + QK_NORM + DENSE_MLP + QWEN_MOE_EXPERTS,
    read_config=read_config,
)
