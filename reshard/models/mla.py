"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) as data: its tensor rules and the
shapes config.json implies for them.

MLA's down-projections (q_a, kv_a_with_mqa) and their norms are small and replicated; the
up-projections (q_b / q_proj, kv_b) split by heads on dim 0 and o_proj by heads on dim 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .family import Rule

if TYPE_CHECKING:
    from .hparams import HParams

_ATTN = "model.layers.{layer}.self_attn."

MLA_RULES = (
    Rule("model.layers.{layer}.input_layernorm.weight", "replicate", "layer"),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", "replicate", "layer"),
    # q_lora_rank set (V3, R1): a low-rank q; q_lora_rank null (V2-Lite): one q_proj.
    Rule(_ATTN + "q_a_proj.weight", "replicate", "layer", optional=True),
    Rule(_ATTN + "q_a_layernorm.weight", "replicate", "layer", optional=True),
    Rule(_ATTN + "q_b_proj.weight", "column", "layer", heads="qk", optional=True),
    Rule(_ATTN + "q_proj.weight", "column", "layer", heads="qk", optional=True),
    Rule(_ATTN + "kv_a_proj_with_mqa.weight", "replicate", "layer"),
    Rule(_ATTN + "kv_a_layernorm.weight", "replicate", "layer"),
    Rule(_ATTN + "kv_b_proj.weight", "column", "layer", heads="kv_b"),
    Rule(_ATTN + "o_proj.weight", "row", "layer", heads="v"),
    # attention_bias=true: biases on the a-projections and o_proj, all kept whole.
    Rule(_ATTN + "q_a_proj.bias", "replicate", "layer", optional=True),
    Rule(_ATTN + "kv_a_proj_with_mqa.bias", "replicate", "layer", optional=True),
    Rule(_ATTN + "o_proj.bias", "replicate", "layer", optional=True),
)


def mla_shapes(hp: HParams) -> dict[str, tuple[tuple[str, int], ...]]:
    """Attention leaf name -> shape config.json implies, each dim labelled with its keys."""
    hidden = (f"hidden_size={hp.hidden_size}", hp.hidden_size)
    heads = f"num_attention_heads={hp.num_heads}"
    q_rank = (f"q_lora_rank={hp.q_lora_rank}", hp.q_lora_rank)
    kv_rank = (f"kv_lora_rank={hp.kv_lora_rank}", hp.kv_lora_rank)
    qk = f"(qk_nope_head_dim={hp.qk_nope_head_dim} + qk_rope_head_dim={hp.head_dim})"
    q = (f"{heads} x {qk}", hp.q_size)
    kv_b = hp.num_heads * (hp.qk_nope_head_dim + hp.v_head_dim)
    v = (f"{heads} x v_head_dim={hp.v_head_dim}", hp.num_heads * hp.v_head_dim)
    return {
        "q_a_proj.weight": (q_rank, hidden),
        "q_a_layernorm.weight": (q_rank,),
        "q_b_proj.weight": (q, q_rank),
        "q_proj.weight": (q, hidden),
        "kv_a_proj_with_mqa.weight": (
            (f"kv_lora_rank={hp.kv_lora_rank} + qk_rope_head_dim={hp.head_dim}",
             hp.kv_lora_rank + hp.head_dim),
            hidden,
        ),
        "kv_a_layernorm.weight": (kv_rank,),
        "kv_b_proj.weight": ((f"{heads} x (qk_nope_head_dim + v_head_dim)", kv_b), kv_rank),
        "o_proj.weight": (hidden, v),
        "gate.e_score_correction_bias": ((f"n_routed_experts={hp.num_experts}", hp.num_experts),),
    }  # fmt: skip
