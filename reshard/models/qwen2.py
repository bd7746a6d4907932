"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases (always, whatever attention_bias says)
and a sliding window from layer max_window_layers on, when use_sliding_window is set."""

from __future__ import annotations

from typing import Any

from .blocks import ATTENTION, DENSE_MLP, GLOBAL
from .config_values import get_int
from .family import WITH_VLLM, Family


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    first = get_int(config, "max_window_layers", where, default=0, minimum=0)
    return {
        "attention_bias": True,
        "o_bias": False,
        "default_sliding": tuple(i >= first for i in range(fields["num_layers"])),
    }


FAMILY = Family(
    formats=WITH_VLLM,
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    rules=GLOBAL + ATTENTION + DENSE_MLP,  # the biases are ATTENTION's optional entries
    read_config=read_config,
)
