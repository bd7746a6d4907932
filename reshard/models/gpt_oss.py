"""gpt-oss (GptOssForCausalLM): Llama's attention with q/k/v/o biases and a learned per-head
`sinks` logit (split with the q heads), sliding-window layers alternating with full ones,
yarn rope; every layer an MoE with a biased `router` and experts stacked in 3-D tensors
stored [E, in, out] with per-expert biases, gate and up interleaved in the columns of
`gate_up_proj` (a rank's slice keeps whole gate/up pairs), and a clamped SwiGLU. Config
defaults are transformers' GptOssConfig's. MXFP4 experts (`*_blocks` / `*_scales`) are
quant/mxfp4.py's.
"""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, GLOBAL
from .config_values import get_bool, get_float, get_int
from .family import WITH_VLLM, Family, Features, Rule

_MLP = "model.layers.{layer}.mlp."

LAYER = (
    # One logit per q head: split exactly like q_proj's heads.
    Rule("model.layers.{layer}.self_attn.sinks", "column", "layer", heads="head", dims=("heads",)),
    Rule(_MLP + "router.weight", "replicate", "moe", dims=("experts", "hidden")),
    Rule(_MLP + "router.bias", "replicate", "moe", dims=("experts",)),
    # [E, H, 2I]: columns 2i, 2i+1 are gate_i, up_i, so a contiguous cut in units of 2 keeps
    # each rank's pairs together; [E, 2I] bias alike.
    Rule(_MLP + "experts.gate_up_proj",
         "stacked_expert", "moe", group="stacked", expert_split=(2, 2),
         dims=("experts", "hidden", "2*moe_inter")),
    Rule(_MLP + "experts.gate_up_proj_bias",
         "stacked_expert", "moe", group="stacked", expert_split=(1, 2),
         dims=("experts", "2*moe_inter")),
    Rule(_MLP + "experts.down_proj",
         "stacked_expert", "moe", group="stacked", expert_split=(1, 1),
         dims=("experts", "moe_inter", "hidden")),  # [E, I, H]: rows of I
    # [E, H], whole on each rank holding the expert; added by its expert-tp rank 0 only.
    Rule(_MLP + "experts.down_proj_bias",
         "stacked_expert", "moe", group="stacked", dims=("experts", "hidden")),
)  # fmt: skip

# transformers' GptOssConfig rope when config.json has none.
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    layers = fields["num_layers"]
    bias = get_bool(config, "attention_bias", where, default=True)
    out = {
        "num_experts": get_int(config, "num_local_experts", where, default=128),
        "num_experts_per_tok": get_int(config, "num_experts_per_tok", where, default=4),
        "moe_intermediate_size": get_int(config, "intermediate_size", where, default=2880),
        "moe_layers": tuple(range(layers)),
        "router_scoring": "topk_softmax",
        "attention_bias": bias,
        "o_bias": bias,
        "swiglu_limit": get_float(config, "swiglu_limit", where, default=7.0, positive=True),
        "swiglu_alpha": get_float(config, "swiglu_alpha", where, default=1.702, positive=True),
        # Without layer_types: even layers slide, odd ones are full.
        "default_sliding": tuple(i % 2 == 0 for i in range(layers)),
    }
    if config.get("torch_dtype") is None and config.get("dtype") is None:
        out["torch_dtype"] = "bfloat16"  # the released checkpoints' float tensors; no key says so
    if "sliding_window" not in config:
        out["sliding_window"] = 128
    if not config.get("rope_parameters") and not config.get("rope_scaling"):
        out["rope_theta"] = get_float(config, "rope_theta", where, default=150000.0)
        out["rope_scaling"] = dict(DEFAULT_ROPE)
    return out


_EXPERTS = r"(?P<p>.+\.mlp\.experts)\."
# vLLM 0.32's GptOssModel names, recorded from its loader (tests/golden/vllm/gpt_oss-tp2.json).
VLLM_RENAMES = (
    (r"(?P<p>.+)\.self_attn\.(?P<rest>.+)", "{p}.attn.{rest}"),
    (r"model\.embed_tokens\.weight", "model.embedding.weight"),
    (_EXPERTS + r"gate_up_proj", "{p}.routed_experts.w13_weight"),
    (_EXPERTS + r"gate_up_proj_bias", "{p}.routed_experts.w13_bias"),
    (_EXPERTS + r"down_proj", "{p}.routed_experts.w2_weight"),
    (_EXPERTS + r"down_proj_bias", "{p}.routed_experts.w2_bias"),
)

FAMILY = Family(
    formats=WITH_VLLM,
    vllm_renames=VLLM_RENAMES,
    # vLLM holds each rank's experts [E, out, in] (w13 rows still interleave gate and up) and
    # adds the down projection's bias on an expert's first TP rank only.
    vllm_transposed=(r".+\.routed_experts\.w(13|2)_weight",),
    vllm_first_rank_bias=(r".+\.routed_experts\.w2_bias",),
    name="gpt_oss",
    architectures=("GptOssForCausalLM",),
    rules=GLOBAL + ATTENTION + LAYER,
    read_config=read_config,
    expert_width_key="intermediate_size",
    features=Features(
        attention_sinks=True, router="router", stacked_experts=True, norm_scale_fp32=True
    ),
)
