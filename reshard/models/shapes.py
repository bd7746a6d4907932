"""Tensor shapes from config.json alone, so `reshard plan` needs no weights.

`synthesize_tensors` lists what a checkpoint of this config holds (required entries of the
family's spec, q/k/v/o biases when the config says so, experts stored per expert), in the
order transformers saves them.
"""

from __future__ import annotations

from ..quant import stored_tensors
from ..quant.format import quantizes
from . import family_of
from .deltanet import linear_leaf, linear_shapes
from .family import Rule
from .hparams import HParams
from .mla import mla_shapes
from .rules import _expected, rules_for


def tensor_shape(hp: HParams, name: str) -> tuple[int, ...]:
    h, hd = hp.hidden_size, hp.head_dim
    last = name.rsplit(".", 2)
    leaf = ".".join(last[-2:])  # e.g. "q_proj.weight"
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (hp.vocab_size, h)
    if name.endswith(".e_score_correction_bias"):  # in the gate (DeepSeek) or the block
        return (hp.num_experts,)
    if (linear := linear_leaf(name)) is not None:
        return tuple(size for _, size in linear_shapes(hp)[linear])
    mla = mla_shapes(hp)
    if hp.is_mla and ".self_attn." in name or leaf == "gate.e_score_correction_bias":
        return tuple(size for _, size in mla[leaf])
    if "shared_experts." in name:  # DeepSeek
        return _mlp(leaf, hp.shared_expert_intermediate_size, h)
    if "shared_expert_gate" in name:
        return (1, h)
    if "shared_expert." in name:
        return _mlp(leaf, hp.shared_expert_intermediate_size, h)
    if ".experts." in name and family_of(hp).features.stacked_experts:
        return stacked_expert_shape(hp, leaf)
    if ".experts." in name:
        return _mlp(leaf, hp.moe_intermediate_size, h)
    table = {
        "q_proj.weight": (hp.q_size * _q_rows_per_head(hp), h),
        "k_proj.weight": (hp.kv_size, h),
        "v_proj.weight": (hp.kv_size, h),
        "o_proj.weight": (h, hp.q_size),
        "qkv_proj.weight": (hp.q_size + 2 * hp.kv_size, h),  # Phi-3: [q; k; v]
        "q_proj.bias": (hp.q_size,),
        "k_proj.bias": (hp.kv_size,),
        "v_proj.bias": (hp.kv_size,),
        "o_proj.bias": (h,),
        "q_norm.weight": (hp.q_size if _span_norm(hp) else hd,),
        "k_norm.weight": (hp.kv_size if _span_norm(hp) else hd,),
        "gate.weight": (hp.num_experts, h),
        "self_attn.sinks": (hp.num_heads,),  # gpt-oss
        "router.weight": (hp.num_experts, h),
        "router.bias": (hp.num_experts,),
    }
    if leaf in table:
        return table[leaf]
    if leaf.endswith("norm.weight"):
        return (h,)
    return _mlp(leaf, hp.intermediate_size, h)


def _span_norm(hp: HParams) -> bool:
    """q_norm / k_norm over all heads of the projection (MiniMax-M2), not one head."""
    return family_of(hp).features.qk_norm_over_heads


def _q_rows_per_head(hp: HParams) -> int:
    """2 when q_proj also holds each head's output gate (Qwen3-Next), else 1."""
    return 2 if family_of(hp).features.attention_output_gate else 1


# The linear layers a quantized checkpoint stores quantized (router gates, embeddings and
# lm_head stay in the checkpoint's float dtype, as in DeepSeek-V3 and Qwen3-FP8).
QUANTIZED_ROLES = ("column", "row", "expert_column", "expert_row")


def _quantized(scheme, rule: Rule, name: str, ndim: int) -> bool:
    """Stored quantized under `scheme`: 2-D linear weights, not norms (mxfp4: the stacked
    experts' only)."""
    if scheme.kind == "mxfp4":
        return rule.role == "stacked_expert" and name.endswith(("gate_up_proj", "down_proj"))
    linear = rule.role in QUANTIZED_ROLES and name.endswith(".weight") and ndim == 2
    return linear and quantizes(scheme, name.rpartition(".")[0])  # ignore / targets


def stacked_expert_shape(hp: HParams, leaf: str) -> tuple[int, ...]:
    """gpt-oss's [E, in, out] experts and their biases."""
    e, h, inner = hp.num_experts, hp.hidden_size, hp.moe_intermediate_size
    table = {
        "experts.gate_up_proj": (e, h, 2 * inner),
        "experts.gate_up_proj_bias": (e, 2 * inner),
        "experts.down_proj": (e, inner, h),
        "experts.down_proj_bias": (e, h),
    }
    return table[leaf]


def _mlp(leaf: str, inner: int, h: int) -> tuple[int, ...]:
    if leaf.split(".")[0] in ("down_proj", "w2"):
        return (h, inner)
    if leaf == "gate_up_proj.weight":  # Phi-3: [gate; up]
        return (2 * inner, h)
    return (inner, h)


def _wanted(hp: HParams, rule: Rule) -> bool:
    if rule.role == "drop" or rule.group == "fused":
        return False
    if rule.template == "lm_head.weight":
        return not hp.tie_word_embeddings
    if rule.template.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return hp.attention_bias
    if rule.template.endswith("o_proj.bias"):
        return hp.o_bias
    if rule.template.endswith(("q_norm.weight", "k_norm.weight")):
        return hp.qk_norm
    if hp.is_mla and rule.template.endswith(("q_a_proj.weight", "q_a_layernorm.weight")):
        return hp.q_lora_rank > 0
    if hp.is_mla and rule.template.endswith("q_b_proj.weight"):
        return hp.q_lora_rank > 0
    if hp.is_mla and rule.template.endswith("q_proj.weight"):
        return hp.q_lora_rank == 0
    return not rule.optional


def synthesize_tensors(hp: HParams, dtype: str = "BF16") -> dict[str, tuple[str, tuple]]:
    """Quantized linear weights come as what they are stored as (quant.stored_tensors)."""
    rule_of = {n: r for r in rules_for(hp) if _wanted(hp, r) for n in _expected(hp, r)}
    names = list(rule_of)
    order = {"model.embed_tokens.weight": (-1, ""), "model.norm.weight": (hp.num_layers, "")}
    order["lm_head.weight"] = (hp.num_layers + 1, "")

    def key(name: str):
        if name in order:
            return order[name]
        return (int(name.split(".")[2]), name)

    scheme = hp.quantization
    out: dict[str, tuple[str, tuple]] = {}
    for n in sorted(names, key=key):
        if scheme and _quantized(scheme, rule_of[n], n, len(tensor_shape(hp, n))):
            out.update(stored_tensors(scheme, n, tensor_shape(hp, n), dtype))
        else:
            out[n] = (dtype, tensor_shape(hp, n))
    return out
