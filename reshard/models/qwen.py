"""Qwen2 (q/k/v biases, optional sliding window) and Qwen3 (per-head q_norm / k_norm)."""

from .rules import Rule
from .llama import ATTENTION, DENSE_MLP, GLOBAL

QK_NORM = (
    Rule("model.layers.{layer}.self_attn.q_norm.weight", "replicate", "layer"),
    Rule("model.layers.{layer}.self_attn.k_norm.weight", "replicate", "layer"),
)

# Qwen2's q/k/v biases are in the optional entries of ATTENTION; the runtime reads their
# presence from the tensors.
QWEN2_RULES = GLOBAL + ATTENTION + DENSE_MLP
QWEN3_RULES = GLOBAL + ATTENTION + QK_NORM + DENSE_MLP
