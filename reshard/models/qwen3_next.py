"""Qwen3-Next (Qwen3NextForCausalLM): a hybrid of gated DeltaNet linear-attention layers
(`linear_attn`) and gated softmax attention (every full_attention_interval-th layer; q_proj
holds [q_h; gate_h] per head), MoE on every layer with a sigmoid-gated shared expert, norms
scaling by (1 + weight), a quarter of each head rotating.
Linear layers' rules and shapes: models/deltanet.py. Config keys and defaults are
transformers' Qwen3NextConfig's.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .blocks import DENSE_MLP, GLOBAL, QWEN_MOE_EXPERTS
from .config_values import FIX, get_bool, get_dict, get_float, get_int
from .deltanet import LINEAR_ATTENTION
from .family import WITH_VLLM, Family, Features, Rule
from .moe_config import read_experts
from .qwen2_moe import SHARED_EXPERT
from .qwen2_moe import VLLM_RENAMES as SHARED_EXPERT_RENAMES
from .qwen3_moe import VLLM_RENAMES as ROUTER_RENAMES

NORMS = (
    Rule("model.layers.{layer}.input_layernorm.weight", "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
)  # fmt: skip

GATED_ATTENTION = (
    Rule("model.layers.{layer}.self_attn.q_proj.weight",
         "column", "attention", heads="q_gated", dims=("q_gated", "hidden")),
    Rule("model.layers.{layer}.self_attn.k_proj.weight",
         "column", "attention", heads="kv", dims=("kv", "hidden")),
    Rule("model.layers.{layer}.self_attn.v_proj.weight",
         "column", "attention", heads="kv", dims=("kv", "hidden")),
    Rule("model.layers.{layer}.self_attn.o_proj.weight",
         "row", "attention", heads="q", dims=("hidden", "q")),
    Rule("model.layers.{layer}.self_attn.q_norm.weight",
         "replicate", "attention", dims=("head_dim",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight",
         "replicate", "attention", dims=("head_dim",)),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    layers = fields["num_layers"]
    moe = read_experts(
        config, where, layers, family="qwen3_next", width_key="moe_intermediate_size"
    )
    return {
        **moe,
        **read_linear(config, where),
        "norm_topk_prob": get_bool(config, "norm_topk_prob", where, default=True),
        "shared_expert_intermediate_size": get_int(
            config, "shared_expert_intermediate_size", where, default=512, minimum=0
        ),
        "head_dim": get_int(config, "head_dim", where, default=256),
        "qk_norm": True,
        "sliding_window": None,  # Qwen3NextConfig has no window
        "rope_scaling": read_partial_rotary(config, where, fields["rope_scaling"], 0.25),
        "layer_types": read_hybrid_layers(config, where, layers),
        # The released checkpoints carry one multi-token-prediction layer under `mtp.`;
        # transformers ignores it, convert skips it (--keep-mtp writes it).
        "num_mtp_layers": 1,
    }


def read_linear(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Gated DeltaNet sizes; value heads come in whole groups per key head."""
    out = {
        "linear_num_key_heads": get_int(config, "linear_num_key_heads", where, default=16),
        "linear_num_value_heads": get_int(config, "linear_num_value_heads", where, default=32),
        "linear_key_head_dim": get_int(config, "linear_key_head_dim", where, default=128),
        "linear_value_head_dim": get_int(config, "linear_value_head_dim", where, default=128),
        "linear_conv_kernel_dim": get_int(config, "linear_conv_kernel_dim", where, default=4),
    }
    if out["linear_num_value_heads"] % out["linear_num_key_heads"]:
        raise CheckpointError(
            f"{where}: linear_num_value_heads={out['linear_num_value_heads']} is not a "
            f"multiple of linear_num_key_heads={out['linear_num_key_heads']}; each key head "
            f"serves a whole group of value heads. {FIX}"
        )
    return out


def read_hybrid_layers(config: dict[str, Any], where: str, layers: int) -> tuple[str, ...]:
    """layer_types if given (hparams checked its entries), else every
    full_attention_interval-th layer full and the rest linear, as the config class does."""
    types = config.get("layer_types")
    if types:
        if "sliding_attention" in types:
            raise CheckpointError(
                f"{where}: 'layer_types' lists sliding_attention; Qwen3-Next layers are "
                f"linear_attention or full_attention. {FIX}"
            )
        return tuple(types)
    interval = get_int(config, "full_attention_interval", where, default=4)
    return tuple(
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)
    )


def read_partial_rotary(
    config: dict[str, Any], where: str, scaling: dict | None, default: float
) -> dict | None:
    """partial_rotary_factor at the top level, or inside rope_parameters (transformers 5)."""
    params = get_dict(config, "rope_parameters", where)
    holder = params if params and "partial_rotary_factor" in params else config
    factor = get_float(holder, "partial_rotary_factor", where, default=default, positive=True)
    scaling = dict(scaling or {})
    scaling.pop("partial_rotary_factor", None)
    if factor == 1.0:
        return scaling or None
    return {"rope_type": "default", **scaling, "partial_rotary_factor": factor}


# vLLM 0.32 keeps the shared expert and the router inside its FusedMoE (as Qwen2-MoE's and
# Qwen3-MoE's), and the DeltaNet decay A_log in float32.
VLLM_RENAMES = SHARED_EXPERT_RENAMES + ROUTER_RENAMES
VLLM_FLOAT32 = (r".+\.linear_attn\.A_log",)

FAMILY = Family(
    formats=WITH_VLLM,
    vllm_renames=VLLM_RENAMES,
    vllm_float32=VLLM_FLOAT32,
    name="qwen3_next",
    architectures=("Qwen3NextForCausalLM",),
    rules=GLOBAL
    + NORMS
    + GATED_ATTENTION
    + LINEAR_ATTENTION
    + DENSE_MLP
    + QWEN_MOE_EXPERTS
    + SHARED_EXPERT,
    read_config=read_config,
    features=Features(norm_adds_one=True, attention_output_gate=True),
)
