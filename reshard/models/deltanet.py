"""Gated DeltaNet linear attention (Qwen3-Next's `linear_attn`) as data: its tensor rules, each
with its dims (models/dims.py).

Split on whole key heads, as vLLM 0.32 loads them (layers/mamba/gdn/qwen_gdn_linear_attn.py).
Qwen3-Next's layout:
`in_proj_qkvz` and `in_proj_ba` are stored grouped by key head ([q_g; k_g; v_g; z_g] and
[b_g; a_g] per key head g), so contiguous rows are whole groups; `conv1d` runs over
[q; k; v] channels and is re-cut per part like a fused q/k/v; `A_log` and `dt_bias` (one per
value head) and `out_proj`'s columns follow their key heads; the gated norm is per head and
replicated. Qwen3.5 stores q/k/v as one [q; k; v] tensor (cut like the conv) and z, b, a
apart (cut with their value heads).
"""

from __future__ import annotations

from .family import Rule

_LINEAR = "model.layers.{layer}.linear_attn."

_COMMON = (
    Rule(_LINEAR + "conv1d.weight",
         "fused_column", "linear", fused=("linear_k", "linear_k", "linear_v"),
         dims=("2*linear_k+linear_v", "one", "linear_kernel")),
    Rule(_LINEAR + "A_log", "column", "linear", heads="linear_group", dims=("linear_v_heads",)),
    Rule(_LINEAR + "dt_bias", "column", "linear", heads="linear_group", dims=("linear_v_heads",)),
    Rule(_LINEAR + "norm.weight", "replicate", "linear", dims=("linear_v_head_dim",)),
    Rule(_LINEAR + "out_proj.weight",
         "row", "linear", heads="linear_v", dims=("hidden", "linear_v")),
)  # fmt: skip

# Qwen3-Next: projections stored grouped per key head.
LINEAR_ATTENTION = (
    Rule(_LINEAR + "in_proj_qkvz.weight",
         "column", "linear", heads="linear_qkvz", dims=("2*linear_k+2*linear_v", "hidden")),
    Rule(_LINEAR + "in_proj_ba.weight",
         "column", "linear", heads="linear_ba", dims=("2*linear_v_heads", "hidden")),
    *_COMMON,
)  # fmt: skip

# Qwen3.5: q/k/v stored as [q; k; v] like the conv's channels (re-cut per part, as vLLM's
# four-part qkvz loader does), z, b and a as their own tensors.
LINEAR_ATTENTION_SPLIT = (
    Rule(_LINEAR + "in_proj_qkv.weight",
         "fused_column", "linear", fused=("linear_k", "linear_k", "linear_v"),
         dims=("2*linear_k+linear_v", "hidden")),
    Rule(_LINEAR + "in_proj_z.weight",
         "column", "linear", heads="linear_v", dims=("linear_v", "hidden")),
    Rule(_LINEAR + "in_proj_b.weight",
         "column", "linear", heads="linear_group", dims=("linear_v_heads", "hidden")),
    Rule(_LINEAR + "in_proj_a.weight",
         "column", "linear", heads="linear_group", dims=("linear_v_heads", "hidden")),
    *_COMMON,
)  # fmt: skip
