"""Qwen2-MoE / Qwen1.5-MoE: q/k/v biases (qkv_bias, default on), routed experts plus a
shared expert on every MoE layer, split like a dense MLP and scaled by a sigmoid gate that
stays whole; sliding window on odd-numbered layers below max_window_layers."""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, DENSE_MLP, GLOBAL, QWEN_MOE_EXPERTS
from .config_values import get_bool, get_int
from .family import WITH_VLLM, Family, Rule
from .moe_config import read_experts

SHARED_EXPERT = (
    Rule("model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
         "column", "moe", dims=("shared_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.shared_expert.up_proj.weight",
         "column", "moe", dims=("shared_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.shared_expert.down_proj.weight",
         "row", "moe", dims=("hidden", "shared_inter")),
    Rule("model.layers.{layer}.mlp.shared_expert_gate.weight",
         "replicate", "moe", dims=("one", "hidden")),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    layers = fields["num_layers"]
    first = get_int(config, "max_window_layers", where, default=0, minimum=0)
    moe = read_experts(config, where, layers, family="qwen2_moe", width_key="moe_intermediate_size")
    shared = get_int(config, "shared_expert_intermediate_size", where, default=0, minimum=0)
    return {
        **moe,
        "shared_expert_intermediate_size": shared,
        "attention_bias": get_bool(config, "qkv_bias", where, default=True)
        or get_bool(config, "attention_bias", where, default=False),
        "o_bias": False,
        "default_sliding": tuple((i + 1) % 2 == 1 and i < first for i in range(layers)),
    }


# vLLM 0.32's Qwen2MoeSparseMoeBlock also registers its shared expert inside its FusedMoE
# (`experts._shared_experts._layer`, the same storage); its loader keeps that, the smaller key.
VLLM_RENAMES = (
    (r"(?P<p>.+\.mlp)\.shared_expert\.(?P<rest>.+)", "{p}.experts._shared_experts._layer.{rest}"),
    (
        r"(?P<p>.+\.mlp)\.shared_expert_gate\.weight",
        "{p}.experts._shared_experts._layer.expert_gate.weight",
    ),
)

FAMILY = Family(
    vllm_renames=VLLM_RENAMES,
    formats=WITH_VLLM,
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    rules=GLOBAL + ATTENTION + DENSE_MLP + QWEN_MOE_EXPERTS + SHARED_EXPERT,
    read_config=read_config,
)
