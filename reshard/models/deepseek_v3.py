"""DeepSeek-V3 / R1 (and Kimi-K2, same layout): multi-head latent attention (models/mla.py),
dense layers below first_k_dense_replace, routed experts with a grouped sigmoid router and
shared experts. The multi-token-prediction layer (index num_hidden_layers) is matched in
rules.py and skipped."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .blocks import DENSE_MLP, GLOBAL, QWEN_MOE_EXPERTS
from .config_values import FIX, get_bool, get_float, get_int
from .family import WITH_VLLM, Family, Features, Rule
from .mla import MLA_RULES

ROUTER_AND_SHARED = (
    # fp32 in the checkpoint (transformers keeps gate.weight and the bias in fp32).
    Rule("model.layers.{layer}.mlp.gate.e_score_correction_bias",
         "replicate", "moe", dims=("routed_experts",)),
    Rule("model.layers.{layer}.mlp.shared_experts.gate_proj.weight",
         "column", "moe", dims=("shared_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.shared_experts.up_proj.weight",
         "column", "moe", dims=("shared_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.shared_experts.down_proj.weight",
         "row", "moe", dims=("hidden", "shared_inter")),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {**read_grouped_experts(config, where, fields["num_layers"]), **_read_mla(config, where)}


def read_grouped_experts(
    config: dict[str, Any], where: str, layers: int, *, dense: int = 3, scale: float = 2.5
) -> dict[str, Any]:
    """transformers' DeepseekV3Config names and defaults (GLM-4.5 reads the same keys with
    its own `dense` and `scale` defaults): layers from first_k_dense_replace on are MoE;
    n_shared_experts shared experts act as one MLP n_shared x moe_intermediate_size wide;
    experts come in n_group groups."""
    experts = get_int(config, "n_routed_experts", where)
    top_k = get_int(config, "num_experts_per_tok", where)
    width = get_int(config, "moe_intermediate_size", where)
    groups = get_int(config, "n_group", where, default=1) if config.get("n_group") else 1
    keep = get_int(config, "topk_group", where, default=1) if config.get("topk_group") else 1
    if experts % groups or keep > groups or top_k > experts * keep // groups:
        raise CheckpointError(
            f"{where}: n_routed_experts={experts} must split into n_group={groups} equal "
            f"groups, topk_group={keep} <= n_group and num_experts_per_tok={top_k} <= the "
            f"experts of the kept groups. {FIX}"
        )
    dense = get_int(config, "first_k_dense_replace", where, default=dense, minimum=0)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": width
        * get_int(config, "n_shared_experts", where, default=1, minimum=0),
        "norm_topk_prob": get_bool(config, "norm_topk_prob", where, default=True),
        "moe_layers": tuple(range(dense, layers)),
        "router_scoring": "sigmoid",
        "n_group": groups,
        "topk_group": keep,
        "routed_scaling_factor": get_float(
            config, "routed_scaling_factor", where, default=scale, positive=True
        ),
    }


def _read_mla(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Multi-head latent attention sizes. head_dim is the rope part (qk_rope_head_dim), as
    transformers sets it; q_lora_rank null means one plain q_proj."""
    q_rank = config.get("q_lora_rank")
    arch = "DeepseekV3ForCausalLM"
    return {
        "head_dim": get_int(config, "qk_rope_head_dim", where, arch=arch),
        "q_lora_rank": 0 if q_rank is None else get_int(config, "q_lora_rank", where),
        "kv_lora_rank": get_int(config, "kv_lora_rank", where),
        "qk_nope_head_dim": get_int(config, "qk_nope_head_dim", where),
        "v_head_dim": get_int(config, "v_head_dim", where),
        "rope_interleave": get_bool(config, "rope_interleave", where, default=True),
        "num_mtp_layers": get_int(config, "num_nextn_predict_layers", where, default=0, minimum=0),
    }


# vLLM 0.32's DeepseekV2 model registers MLA's projections twice (self_attn and its
# mla_attn wrapper) and the shared experts and router inside its FusedMoE: its loader keeps
# the smaller key of each pair. (q_proj, used when q_lora_rank is null, follows the same rule.)
VLLM_RENAMES = (
    (r"(?P<p>.+\.self_attn)\.(?P<m>o_proj|q_a_layernorm|q_b_proj|q_proj)\.weight",
     "{p}.mla_attn.{m}.weight"),
    (r"(?P<p>.+\.self_attn)\.attn\.(?P<s>_\w+_scale)", "{p}.mla_attn.mla_attn.{s}"),
    (r"(?P<p>.+\.mlp)\.shared_experts\.(?P<rest>.+)", "{p}.experts._shared_experts._layer.{rest}"),
    (r"(?P<p>.+\.mlp)\.gate\.(?P<w>weight|e_score_correction_bias)", "{p}.experts.gate.{w}"),
)  # fmt: skip

FAMILY = Family(
    vllm_renames=VLLM_RENAMES,
    vllm_float32=(r".+\.mlp\.gate\.e_score_correction_bias",),  # DeepseekV2MoE makes it fp32
    formats=WITH_VLLM,
    name="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    rules=GLOBAL + MLA_RULES + DENSE_MLP + QWEN_MOE_EXPERTS + ROUTER_AND_SHARED,
    read_config=read_config,
    features=Features(router_fp32_weights=True),  # sigmoid weights scaled in fp32
)
