"""Tensor shapes from config.json alone, so `reshard plan` needs no weights.

`synthesize_tensors` lists what a checkpoint of this config holds (required entries of the
family's spec, q/k/v/o biases when the config says so, experts stored per expert), in the
order transformers saves them; each shape from its rule's dims (models/dims.py).
"""

from __future__ import annotations

from ..quant import stored_tensors
from ..quant.format import quantizes
from .dims import tensor_shape as rule_shape
from .family import Rule
from .hparams import HParams
from .rules import _expected, rules_for


def tensor_shape(hp: HParams, name: str) -> tuple[int, ...]:
    """The shape config.json implies for `name`, from the dims of the family rule it matches."""
    return rule_shape(hp, next(r for r in rules_for(hp) if r.regex.match(name)))


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
        shape = rule_shape(hp, rule_of[n])
        if scheme and _quantized(scheme, rule_of[n], n, len(shape)):
            out.update(stored_tensors(scheme, n, shape, dtype))
        else:
            out[n] = (dtype, shape)
    return out
