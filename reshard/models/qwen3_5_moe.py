"""Qwen3.5 MoE text model (Qwen3_5MoeForCausalLM): Qwen3-Next's hybrid (gated DeltaNet beside
gated attention, MoE with a gated shared expert on every layer) with the DeltaNet inputs
stored apart (`in_proj_qkv` as [q; k; v], `in_proj_z`, `in_proj_b`, `in_proj_a`) rather than
grouped per key head. The released multimodal checkpoints
(Qwen3_5MoeForConditionalGeneration, `model.language_model.` names, a vision tower) are not
read. Config keys and defaults are transformers' Qwen3_5MoeTextConfig's: the top-k weights
are always renormalised, every layer is MoE.
"""

from __future__ import annotations

from typing import Any

from .blocks import GLOBAL, QWEN_MOE_EXPERTS
from .deltanet import LINEAR_ATTENTION_SPLIT
from .family import WITH_VLLM, Family, Features
from .qwen2_moe import SHARED_EXPERT
from .qwen3_next import GATED_ATTENTION, NORMS, VLLM_FLOAT32, VLLM_RENAMES
from .qwen3_next import read_config as read_qwen3_next


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {**read_qwen3_next(config, where, fields), "norm_topk_prob": True}


FAMILY = Family(
    formats=WITH_VLLM,  # vLLM stacks [qkv; z] and [b; a] (layout/formats/vllm.py)
    vllm_renames=VLLM_RENAMES,
    vllm_float32=VLLM_FLOAT32,
    name="qwen3_5_moe",
    architectures=("Qwen3_5MoeForCausalLM",),
    rules=GLOBAL
    + NORMS
    + GATED_ATTENTION
    + LINEAR_ATTENTION_SPLIT
    + QWEN_MOE_EXPERTS
    + SHARED_EXPERT,
    read_config=read_config,
    features=Features(norm_adds_one=True, attention_output_gate=True),
)
