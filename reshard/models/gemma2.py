"""Gemma-2: Llama's tensors plus two more norms per layer (pre_/post_feedforward_layernorm),
every norm scaling by (1 + weight), the embedding scaled by sqrt(hidden_size), tanh
soft-capping of attention scores and final logits, attention scaled by
query_pre_attn_scalar**-0.5, and sliding-window layers alternating with global ones. Config
defaults are transformers' Gemma2Config's; gemma3.py builds on these pieces."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .blocks import ATTENTION, DENSE_MLP, GLOBAL
from .config_values import get_bool, get_float, get_int, get_str
from .family import WITH_VLLM, Family, Features, Rule

SANDWICH_NORMS = (
    Rule("model.layers.{layer}.pre_feedforward_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.post_feedforward_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
)  # fmt: skip

GEMMA_FEATURES = Features(norm_adds_one=True, sandwich_norms=True, scale_embedding=True)


def read_common(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys Gemma-2 and Gemma-3 read alike, with their config classes' defaults (a
    head_dim of 256 whatever hidden_size says, tied embeddings, a 4096-token window)."""
    if get_bool(config, "use_bidirectional_attention", where, default=False):
        raise UnsupportedModelError(
            f"{where}: use_bidirectional_attention is true (an embedding model, not a causal "
            "LM); the runtime runs causal attention only. Use a Gemma causal LM checkpoint."
        )
    return {
        "head_dim": get_int(config, "head_dim", where, default=256),
        "hidden_act": get_str(config, "hidden_activation", where, default="gelu_pytorch_tanh"),
        "tie_word_embeddings": get_bool(config, "tie_word_embeddings", where, default=True),
        "query_pre_attn_scalar": get_float(
            config, "query_pre_attn_scalar", where, default=256.0, positive=True
        ),
        "sliding_window": read_window(config, where),
    }


def read_window(config: dict[str, Any], where: str) -> int | None:
    """Absent: 4096 (the config class's default); null: no window."""
    if "sliding_window" in config and config["sliding_window"] is None:
        return None
    return get_int(config, "sliding_window", where, default=4096)


def read_cap(config: dict[str, Any], key: str, where: str, default: float | None) -> float | None:
    """A soft-cap: absent gives the config class's default, null switches it off."""
    if key in config and config[key] is None:
        return None
    if key not in config:
        return default
    return get_float(config, key, where, default=0.0, positive=True)


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        **read_common(config, where),
        "attn_logit_softcapping": read_cap(config, "attn_logit_softcapping", where, 50.0),
        "final_logit_softcapping": read_cap(config, "final_logit_softcapping", where, 30.0),
        # Without layer_types: even layers slide, odd ones are global.
        "default_sliding": tuple(i % 2 == 0 for i in range(fields["num_layers"])),
    }


FAMILY = Family(
    # vLLM's Gemma-2 computes logits with the embedding itself: no lm_head module.
    vllm_renames=((r"lm_head\.weight", "model.embed_tokens.weight"),),
    formats=WITH_VLLM,
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    rules=GLOBAL + ATTENTION + SANDWICH_NORMS + DENSE_MLP,
    read_config=read_config,
    features=GEMMA_FEATURES,
)
