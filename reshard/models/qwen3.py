"""Qwen3: Llama's layout with a per-head RMSNorm on q and k (q_norm / k_norm)."""

from .blocks import ATTENTION, DENSE_MLP, GLOBAL, QK_NORM
from .family import WITH_VLLM, Family

FAMILY = Family(
    formats=WITH_VLLM,
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    rules=GLOBAL + ATTENTION + QK_NORM + DENSE_MLP,
    read_config=lambda config, where, fields: {"qk_norm": True},
)
