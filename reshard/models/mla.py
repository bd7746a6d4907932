"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) as data: its tensor rules, each with
its dims (models/dims.py).

MLA's down-projections (q_a, kv_a_with_mqa) and their norms are small and replicated; the
up-projections (q_b / q_proj, kv_b) split by heads on dim 0 and o_proj by heads on dim 1.
"""

from __future__ import annotations

from .family import Rule

_ATTN = "model.layers.{layer}.self_attn."

MLA_RULES = (
    Rule("model.layers.{layer}.input_layernorm.weight", "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
    # q_lora_rank set (V3, R1): a low-rank q; q_lora_rank null (V2-Lite): one q_proj.
    Rule(_ATTN + "q_a_proj.weight", "replicate", "layer", optional=True, dims=("q_lora", "hidden")),
    Rule(_ATTN + "q_a_layernorm.weight", "replicate", "layer", optional=True, dims=("q_lora",)),
    Rule(_ATTN + "q_b_proj.weight",
         "column", "layer", heads="qk", optional=True, dims=("mla_q", "q_lora")),
    Rule(_ATTN + "q_proj.weight",
         "column", "layer", heads="qk", optional=True, dims=("mla_q", "hidden")),
    Rule(_ATTN + "kv_a_proj_with_mqa.weight",
         "replicate", "layer", dims=("kv_lora+rope_dim", "hidden")),
    Rule(_ATTN + "kv_a_layernorm.weight", "replicate", "layer", dims=("kv_lora",)),
    Rule(_ATTN + "kv_b_proj.weight", "column", "layer", heads="kv_b", dims=("mla_kv_b", "kv_lora")),
    Rule(_ATTN + "o_proj.weight", "row", "layer", heads="v", dims=("hidden", "mla_v")),
    # attention_bias=true: biases on the a-projections and o_proj, all kept whole.
    Rule(_ATTN + "q_a_proj.bias", "replicate", "layer", optional=True, dims=("q_lora",)),
    Rule(_ATTN + "kv_a_proj_with_mqa.bias",
         "replicate", "layer", optional=True, dims=("kv_lora+rope_dim",)),
    Rule(_ATTN + "o_proj.bias", "replicate", "layer", optional=True, dims=("hidden",)),
)  # fmt: skip
