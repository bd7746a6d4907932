"""Gated DeltaNet linear attention (Qwen3-Next's `linear_attn`) as data: its tensor rules and
the shapes config.json implies for them.

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

from typing import TYPE_CHECKING

from .family import Rule

if TYPE_CHECKING:
    from .hparams import HParams

_LINEAR = "model.layers.{layer}.linear_attn."

_COMMON = (
    Rule(
        _LINEAR + "conv1d.weight",
        "fused_column",
        "linear",
        fused=("linear_k", "linear_k", "linear_v"),
    ),
    Rule(_LINEAR + "A_log", "column", "linear", heads="linear_group"),
    Rule(_LINEAR + "dt_bias", "column", "linear", heads="linear_group"),
    Rule(_LINEAR + "norm.weight", "replicate", "linear"),
    Rule(_LINEAR + "out_proj.weight", "row", "linear", heads="linear_v"),
)

# Qwen3-Next: projections stored grouped per key head.
LINEAR_ATTENTION = (
    Rule(_LINEAR + "in_proj_qkvz.weight", "column", "linear", heads="linear_qkvz"),
    Rule(_LINEAR + "in_proj_ba.weight", "column", "linear", heads="linear_ba"),
    *_COMMON,
)

# Qwen3.5: q/k/v stored as [q; k; v] like the conv's channels (re-cut per part, as vLLM's
# four-part qkvz loader does), z, b and a as their own tensors.
LINEAR_ATTENTION_SPLIT = (
    Rule(_LINEAR + "in_proj_qkv.weight", "fused_column", "linear",
         fused=("linear_k", "linear_k", "linear_v")),
    Rule(_LINEAR + "in_proj_z.weight", "column", "linear", heads="linear_v"),
    Rule(_LINEAR + "in_proj_b.weight", "column", "linear", heads="linear_group"),
    Rule(_LINEAR + "in_proj_a.weight", "column", "linear", heads="linear_group"),
    *_COMMON,
)  # fmt: skip


def linear_shapes(hp: HParams) -> dict[str, tuple[tuple[str, int], ...]]:
    """Leaf name under `linear_attn.` -> shape config.json implies, each dim labelled."""
    hidden = (f"hidden_size={hp.hidden_size}", hp.hidden_size)
    k_heads = f"linear_num_key_heads={hp.linear_num_key_heads}"
    v_heads = (f"linear_num_value_heads={hp.linear_num_value_heads}", hp.linear_num_value_heads)
    k = f"{k_heads} x linear_key_head_dim={hp.linear_key_head_dim}"
    v = f"{v_heads[0]} x linear_value_head_dim={hp.linear_value_head_dim}"
    ks, vs = hp.linear_key_size, hp.linear_value_size
    kernel = (f"linear_conv_kernel_dim={hp.linear_conv_kernel_dim}", hp.linear_conv_kernel_dim)
    return {
        "in_proj_qkvz.weight": ((f"2 x {k} + 2 x {v}", 2 * ks + 2 * vs), hidden),
        "in_proj_ba.weight": ((f"2 x {v_heads[0]}", 2 * hp.linear_num_value_heads), hidden),
        "in_proj_qkv.weight": ((f"2 x {k} + {v}", 2 * ks + vs), hidden),
        "in_proj_z.weight": ((v, vs), hidden),
        "in_proj_b.weight": (v_heads, hidden),
        "in_proj_a.weight": (v_heads, hidden),
        "conv1d.weight": ((f"2 x {k} + {v}", 2 * ks + vs), ("1", 1), kernel),
        "A_log": (v_heads,),
        "dt_bias": (v_heads,),
        "norm.weight": ((f"linear_value_head_dim={hp.linear_value_head_dim}",
                         hp.linear_value_head_dim),),
        "out_proj.weight": (hidden, (v, vs)),
    }  # fmt: skip


def linear_leaf(name: str) -> str | None:
    """`in_proj_qkvz.weight` for `model.layers.3.linear_attn.in_proj_qkvz.weight`."""
    _, sep, leaf = name.partition(".linear_attn.")
    return leaf if sep else None
