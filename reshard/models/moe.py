"""Mixture-of-experts families: Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE (q/k norms).

Routed experts come either per expert (what transformers saves to disk) or fused as 3-D
tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], transformers 5's
in-memory layout, which some exporters write). Each MoE layer must hold exactly one form.
"""

from .rules import Rule
from .llama import ATTENTION, DENSE_MLP, GLOBAL
from .qwen import QK_NORM


def _fused(prefix: str) -> tuple[Rule, ...]:
    return (
        Rule(prefix + ".experts.gate_up_proj", "fused_expert_column", "moe", group="fused"),
        Rule(prefix + ".experts.down_proj", "fused_expert_row", "moe", group="fused"),
    )


MIXTRAL_EXPERTS = (
    Rule("model.layers.{layer}.block_sparse_moe.gate.weight", "replicate", "moe"),
    Rule(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "expert_column", "expert", group="split",
    ),
    Rule(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "expert_column", "expert", group="split",
    ),
    Rule(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
        "expert_row", "expert", group="split",
    ),
    *_fused("model.layers.{layer}.block_sparse_moe"),
)  # fmt: skip

QWEN_MOE_EXPERTS = (
    Rule("model.layers.{layer}.mlp.gate.weight", "replicate", "moe"),
    Rule(
        "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        "expert_column", "expert", group="split",
    ),
    Rule(
        "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
        "expert_column", "expert", group="split",
    ),
    Rule(
        "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
        "expert_row", "expert", group="split",
    ),
    *_fused("model.layers.{layer}.mlp"),
)  # fmt: skip

# Qwen2-MoE: a shared expert on every MoE layer, split like a dense MLP, scaled by a
# sigmoid gate that stays whole.
QWEN2_SHARED = (
    Rule("model.layers.{layer}.mlp.shared_expert.gate_proj.weight", "column", "moe"),
    Rule("model.layers.{layer}.mlp.shared_expert.up_proj.weight", "column", "moe"),
    Rule("model.layers.{layer}.mlp.shared_expert.down_proj.weight", "row", "moe"),
    Rule("model.layers.{layer}.mlp.shared_expert_gate.weight", "replicate", "moe"),
)

MIXTRAL_RULES = GLOBAL + ATTENTION + MIXTRAL_EXPERTS
QWEN2_MOE_RULES = GLOBAL + ATTENTION + DENSE_MLP + QWEN_MOE_EXPERTS + QWEN2_SHARED
QWEN3_MOE_RULES = GLOBAL + ATTENTION + QK_NORM + DENSE_MLP + QWEN_MOE_EXPERTS
