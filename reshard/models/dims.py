"""A weight's dims as symbols: each Rule names its tensor's dims (`("q", "hidden")`,
`("experts", "2*moe_inter", "hidden")`), and this table says what each symbol is for a model,
as (the config keys that set it, its size). `tensor_shape`, the labelled shapes of the
config-consistency errors and `synthesize_tensors` all derive from a rule's dims, so a
tensor's shape from config.json is written once.

A dim is a symbol, `N*symbol` (N times it) or a sum of those with `+`.
"""

from __future__ import annotations

from collections.abc import Callable

from . import family_of
from .family import Rule
from .hparams import HParams

Dim = tuple[str, int]  # (what config.json says, size)


def _heads_x(hp: HParams, width: str) -> str:
    return f"num_attention_heads={hp.num_heads} x {width}"


def _expert_width(hp: HParams) -> Dim:
    key = family_of(hp).expert_width_key  # Mixtral and gpt-oss say intermediate_size
    return f"{key}={hp.moe_intermediate_size}", hp.moe_intermediate_size


def _mla_qk(hp: HParams) -> str:
    return f"(qk_nope_head_dim={hp.qk_nope_head_dim} + qk_rope_head_dim={hp.head_dim})"


def _linear_k(hp: HParams) -> str:
    return (
        f"linear_num_key_heads={hp.linear_num_key_heads} x "
        f"linear_key_head_dim={hp.linear_key_head_dim}"
    )


def _linear_v(hp: HParams) -> str:
    return (
        f"linear_num_value_heads={hp.linear_num_value_heads} x "
        f"linear_value_head_dim={hp.linear_value_head_dim}"
    )


SYMBOLS: dict[str, Callable[[HParams], Dim]] = {
    "one": lambda hp: ("1", 1),
    "vocab": lambda hp: (f"vocab_size={hp.vocab_size}", hp.vocab_size),
    "hidden": lambda hp: (f"hidden_size={hp.hidden_size}", hp.hidden_size),
    "heads": lambda hp: (f"num_attention_heads={hp.num_heads}", hp.num_heads),
    "head_dim": lambda hp: (f"head_dim={hp.head_dim}", hp.head_dim),
    "q": lambda hp: (_heads_x(hp, f"head_dim={hp.head_dim}"), hp.q_size),
    "kv": lambda hp: (
        f"num_key_value_heads={hp.num_kv_heads} x head_dim={hp.head_dim}",
        hp.kv_size,
    ),
    # Qwen3-Next: q_proj holds each head's q and its output gate.
    "q_gated": lambda hp: (
        f"2 x {_heads_x(hp, f'head_dim={hp.head_dim}')} (q and its output gate)",
        2 * hp.q_size,
    ),
    "inter": lambda hp: (f"intermediate_size={hp.intermediate_size}", hp.intermediate_size),
    "moe_inter": _expert_width,
    "shared_inter": lambda hp: (
        f"shared_expert_intermediate_size={hp.shared_expert_intermediate_size}",
        hp.shared_expert_intermediate_size,
    ),
    "experts": lambda hp: (f"num_experts={hp.num_experts}", hp.num_experts),
    "routed_experts": lambda hp: (f"n_routed_experts={hp.num_experts}", hp.num_experts),
    # MLA (DeepSeek-V3): low-rank q and kv, heads of nope + rope width.
    "q_lora": lambda hp: (f"q_lora_rank={hp.q_lora_rank}", hp.q_lora_rank),
    "kv_lora": lambda hp: (f"kv_lora_rank={hp.kv_lora_rank}", hp.kv_lora_rank),
    "rope_dim": lambda hp: (f"qk_rope_head_dim={hp.head_dim}", hp.head_dim),
    "mla_q": lambda hp: (_heads_x(hp, _mla_qk(hp)), hp.q_size),
    "mla_kv_b": lambda hp: (
        _heads_x(hp, "(qk_nope_head_dim + v_head_dim)"),
        hp.num_heads * (hp.qk_nope_head_dim + hp.v_head_dim),
    ),
    "mla_v": lambda hp: (_heads_x(hp, f"v_head_dim={hp.v_head_dim}"), hp.num_heads * hp.v_head_dim),
    # Gated DeltaNet (Qwen3-Next, Qwen3.5): key and value heads of their own widths.
    "linear_k": lambda hp: (_linear_k(hp), hp.linear_key_size),
    "linear_v": lambda hp: (_linear_v(hp), hp.linear_value_size),
    "linear_v_heads": lambda hp: (
        f"linear_num_value_heads={hp.linear_num_value_heads}",
        hp.linear_num_value_heads,
    ),
    "linear_v_head_dim": lambda hp: (
        f"linear_value_head_dim={hp.linear_value_head_dim}",
        hp.linear_value_head_dim,
    ),
    "linear_kernel": lambda hp: (
        f"linear_conv_kernel_dim={hp.linear_conv_kernel_dim}",
        hp.linear_conv_kernel_dim,
    ),
}


def dim_value(hp: HParams, dim: str) -> Dim:
    """`q+2*kv` -> ("<q's keys> + 2 x <kv's keys>", q_size + 2 * kv_size)."""
    terms = [_term(hp, t) for t in dim.split("+")]
    return " + ".join(label for label, _ in terms), sum(size for _, size in terms)


def _term(hp: HParams, term: str) -> Dim:
    times, _, symbol = term.rpartition("*")
    label, size = SYMBOLS[symbol](hp)
    return (f"{times} x {label}", int(times) * size) if times else (label, size)


def labelled_shape(hp: HParams, rule: Rule) -> tuple[Dim, ...]:
    """The shape config.json implies for a tensor of `rule`, each dim with its keys."""
    return tuple(dim_value(hp, d) for d in rule.dims)


def tensor_shape(hp: HParams, rule: Rule) -> tuple[int, ...]:
    return tuple(size for _, size in labelled_shape(hp, rule))
