"""Phi-3 / Phi-3.5-mini / Phi-4-mini (Phi3ForCausalLM): Llama's decoder with q/k/v fused in
the checkpoint as `self_attn.qkv_proj` ([q; k; v] rows) and gate/up as `mlp.gate_up_proj`
([gate; up] rows). Each rank keeps the fused name and holds [q_r; k_r; v_r] / [gate_r; up_r],
as vLLM and TensorRT-LLM lay them out. Partial rotary (Phi-4-mini) and longrope's factors
(Phi-3.5, Phi-4-mini) are read here; transformers reads rope type "su" and "yarn" of this
family as "longrope".
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from .blocks import GLOBAL
from .config_values import FIX, get_dict, get_float, get_int
from .family import WITH_VLLM, Family, Features, Rule

LAYER = (
    Rule("model.layers.{layer}.input_layernorm.weight", "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.self_attn.qkv_proj.weight",
         "fused_column", "layer", fused=("q", "kv", "kv"), dims=("q+2*kv", "hidden")),
    Rule("model.layers.{layer}.self_attn.o_proj.weight",
         "row", "layer", heads="q", dims=("hidden", "q")),
    Rule("model.layers.{layer}.mlp.gate_up_proj.weight",
         "fused_column", "dense", fused=("mlp", "mlp"), dims=("2*inter", "hidden")),
    Rule("model.layers.{layer}.mlp.down_proj.weight", "row", "dense", dims=("hidden", "inter")),
    Rule("model.layers.{layer}.self_attn.rotary_emb.inv_freq", "drop", "layer", optional=True),
)  # fmt: skip


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    if fields["quantization"]:
        raise UnsupportedModelError(
            f"{where}: quantization_config ({fields['quantization'].kind}) on "
            f"{fields['architecture']}: reshard does not split quantized fused tensors "
            "(qkv_proj, gate_up_proj). Convert the unquantized checkpoint."
        )
    scaling = dict(fields["rope_scaling"] or {})
    if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
        scaling["rope_type"] = "longrope"  # transformers' Phi3Config renames both
    params = get_dict(config, "rope_parameters", where)  # transformers 5 nests the factor
    holder = params if params and "partial_rotary_factor" in params else config
    partial = get_float(holder, "partial_rotary_factor", where, default=1.0, positive=True)
    if partial != 1.0:
        scaling = {"rope_type": "default", **scaling, "partial_rotary_factor": partial}
    if scaling.get("rope_type") == "longrope":
        scaling = _longrope(config, scaling, where, fields["head_dim"] * partial)
    return {"rope_scaling": scaling or None}


def _longrope(config: dict[str, Any], scaling: dict, where: str, rotary: float) -> dict:
    """short_factor / long_factor (one number per rotary frequency) and the original context,
    which Phi-3 configs keep at the top level."""
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        original = get_int(config, "original_max_position_embeddings", where)
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        numbers = isinstance(value, list) and all(type(v) in (int, float) for v in value)
        if not numbers or len(value) != int(rotary) // 2:
            raise CheckpointError(
                f"{where}: 'rope_scaling.{key}' must list {int(rotary) // 2} numbers (one per "
                f"rotary frequency: head_dim x partial_rotary_factor / 2); it is "
                f"{str(value)[:40]}. {FIX}"
            )
    return {**scaling, "original_max_position_embeddings": original}


FAMILY = Family(
    formats=WITH_VLLM,
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    rules=GLOBAL + LAYER,
    read_config=read_config,
    features=Features(fused_qkv=True, fused_gate_up=True),
)
