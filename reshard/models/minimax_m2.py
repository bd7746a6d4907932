"""MiniMax-M2 (MiniMaxM2ForCausalLM): Llama's attention with q_norm / k_norm over the whole
projection (all heads at once: split with their heads, the statistic averaged over the TP
group at run time), a partial rotary (`rotary_dim` of head_dim), and every layer MoE in
`block_sparse_moe` like Mixtral (experts w1 gate, w3 up, w2 down, intermediate_size wide),
routed by sigmoid scores plus a selection bias (`e_score_correction_bias`, on the block) with
the top-k weights renormalised: DeepSeek's router with one group. Config keys and defaults are
transformers' MiniMaxM2Config's (released checkpoints: FP8 blocks, handled by quant/).
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .blocks import ATTENTION, GLOBAL
from .config_values import get_dict, get_float, get_int, get_str
from .family import WITH_VLLM, Family, Features, Rule
from .mixtral import MIXTRAL_EXPERTS
from .moe_config import read_experts

NORMS_AND_BIAS = (
    # One weight per channel of the projection: split with the heads it scales.
    Rule("model.layers.{layer}.self_attn.q_norm.weight", "column", "layer", heads="q", dims=("q",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight",
         "column", "layer", heads="kv", dims=("kv",)),
    Rule("model.layers.{layer}.block_sparse_moe.e_score_correction_bias",
         "replicate", "moe", dims=("experts",)),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    moe = read_experts(
        config, where, fields["num_layers"], family="minimax_m2", width_key="intermediate_size"
    )
    scoring = get_str(config, "scoring_func", where, default="sigmoid")
    if scoring != "sigmoid":
        raise UnsupportedModelError(
            f"{where}: scoring_func '{scoring}'; MiniMax-M2's router is sigmoid (transformers "
            "hard-codes it). Check config.json."
        )
    head_dim = get_int(config, "head_dim", where, default=128)
    return {
        **moe,
        "head_dim": head_dim,
        "norm_topk_prob": True,  # transformers always renormalises the top-k weights
        "router_scoring": "sigmoid",
        "routed_scaling_factor": get_float(
            config, "routed_scaling_factor", where, default=1.0, positive=True
        ),
        "qk_norm": True,
        "rope_scaling": _partial_rotary(config, where, fields["rope_scaling"], head_dim),
    }


def _partial_rotary(config: dict, where: str, scaling: dict | None, head_dim: int) -> dict | None:
    """partial_rotary_factor (transformers 5's rope_parameters), else rotary_dim / head_dim
    (the released configs' key), as MiniMaxM2Config converts it."""
    params = get_dict(config, "rope_parameters", where) or {}
    if "partial_rotary_factor" in params:
        factor = get_float(params, "partial_rotary_factor", where, default=1.0, positive=True)
    elif config.get("rotary_dim") is not None:
        factor = get_int(config, "rotary_dim", where) / head_dim
    else:
        factor = get_float(config, "partial_rotary_factor", where, default=1.0, positive=True)
    scaling = {k: v for k, v in (scaling or {}).items() if k != "partial_rotary_factor"}
    if factor == 1.0:
        return scaling or None
    return {"rope_type": "default", **scaling, "partial_rotary_factor": factor}


FAMILY = Family(
    formats=WITH_VLLM,
    # vLLM 0.32 runs MiniMax-M2's sigmoid router in float32: its weight and correction bias
    vllm_float32=(r".+\.block_sparse_moe\.(gate\.weight|e_score_correction_bias)",),
    name="minimax_m2",
    architectures=("MiniMaxM2ForCausalLM",),
    rules=GLOBAL + ATTENTION + NORMS_AND_BIAS + MIXTRAL_EXPERTS,
    read_config=read_config,
    features=Features(
        moe_blocks=("block_sparse_moe", "mlp"),
        expert_names=("w1", "w3", "w2"),
        router_fp32_weights=True,
        qk_norm_over_heads=True,
        correction_bias="e_score_correction_bias",
    ),
)
