"""Mixtral: every layer MoE, experts in `block_sparse_moe` named w1 (gate), w3 (up), w2
(down), each intermediate_size wide; top-k weights always renormalised and kept in fp32."""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, GLOBAL, fused_experts
from .family import WITH_VLLM, Family, Features, Rule
from .moe_config import read_experts

MIXTRAL_EXPERTS = (
    Rule("model.layers.{layer}.block_sparse_moe.gate.weight",
         "replicate", "moe", dims=("experts", "hidden")),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
         "expert_column", "expert", group="split", dims=("moe_inter", "hidden")),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
         "expert_column", "expert", group="split", dims=("moe_inter", "hidden")),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
         "expert_row", "expert", group="split", dims=("hidden", "moe_inter")),
    *fused_experts("model.layers.{layer}.block_sparse_moe"),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    moe = read_experts(
        config, where, fields["num_layers"], family="mixtral", width_key="intermediate_size"
    )
    return {**moe, "norm_topk_prob": True}  # transformers hard-codes the renormalisation


FAMILY = Family(
    formats=WITH_VLLM,
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    rules=GLOBAL + ATTENTION + MIXTRAL_EXPERTS,
    read_config=read_config,
    expert_width_key="intermediate_size",
    features=Features(
        moe_blocks=("block_sparse_moe", "mlp"),
        expert_names=("w1", "w3", "w2"),
        router_fp32_weights=True,
    ),
)
