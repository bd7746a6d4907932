"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases (o_proj
none), optional per-head q/k norms (use_qk_norm), partial rotary (half of head_dim by
default), dense layers below first_k_dense_replace, then DeepSeek-V3's MoE: a sigmoid router
with a selection bias over groups of experts and an ungated shared expert. The routing is
deepseek_v3's data (router_scoring "sigmoid"), not a branch. The MTP layer (index
num_hidden_layers) is skipped as DeepSeek's. Defaults are transformers' Glm4MoeConfig's.
"""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, DENSE_MLP, GLOBAL, QWEN_MOE_EXPERTS
from .config_values import get_bool, get_dict, get_float, get_int
from .deepseek_v3 import ROUTER_AND_SHARED, read_grouped_experts
from .family import WITH_VLLM, Family, Features, Rule

QK_NORM = (  # use_qk_norm: true only (GLM-4.5 ships without)
    Rule("model.layers.{layer}.self_attn.q_norm.weight",
         "replicate", "layer", optional=True, dims=("head_dim",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight",
         "replicate", "layer", optional=True, dims=("head_dim",)),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    experts = read_grouped_experts(config, where, fields["num_layers"], dense=1, scale=1.0)
    params = get_dict(config, "rope_parameters", where)  # transformers 5 nests the factor
    holder = params if params and "partial_rotary_factor" in params else config
    partial = get_float(holder, "partial_rotary_factor", where, default=0.5, positive=True)
    scaling = dict(fields["rope_scaling"] or {})
    if partial != 1.0:
        scaling = {"rope_type": "default", **scaling, "partial_rotary_factor": partial}
    return {
        **experts,
        "rope_scaling": scaling or None,
        "qk_norm": get_bool(config, "use_qk_norm", where, default=False),
        "o_bias": False,  # attention_bias gives q/k/v biases only
        "num_mtp_layers": get_int(config, "num_nextn_predict_layers", where, default=1, minimum=0),
    }


# vLLM 0.32's Glm4MoE keeps the shared experts inside its FusedMoE and the correction bias on
# the routed experts, in float32 as the router weight (its sigmoid router runs in fp32).
VLLM_RENAMES = (
    (r"(?P<p>.+\.mlp)\.shared_experts\.(?P<rest>.+)", "{p}.experts._shared_experts._layer.{rest}"),
    (r"(?P<p>.+\.mlp)\.gate\.e_score_correction_bias",
     "{p}.experts.routed_experts.e_score_correction_bias"),
)  # fmt: skip

FAMILY = Family(
    formats=WITH_VLLM,
    vllm_renames=VLLM_RENAMES,
    vllm_float32=(r".+\.mlp\.gate\.(weight|e_score_correction_bias)",),  # native names
    name="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    rules=GLOBAL + ATTENTION + QK_NORM + DENSE_MLP + QWEN_MOE_EXPERTS + ROUTER_AND_SHARED,
    read_config=read_config,
    features=Features(router_fp32_weights=True),  # sigmoid weights scaled in fp32
)
