"""Gemma-3 text (Gemma3ForCausalLM, the 1B and text-only exports): Gemma-2's layout and math
plus per-head q_norm / k_norm ((1 + weight) style), a rope base of its own for the
sliding-window layers, and five sliding layers to each global one by default. Final-logit
soft-capping only when configured; attention soft-capping never (transformers' Gemma3Attention
ignores attn_logit_softcapping, and transformers is the reference)."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .blocks import ATTENTION, DENSE_MLP, GLOBAL, QK_NORM
from .config_values import FIX, get_dict, get_float, get_int, get_str
from .family import WITH_VLLM, Family
from .gemma2 import GEMMA_FEATURES, SANDWICH_NORMS, read_cap, read_common

GLOBAL_THETA = 1_000_000.0  # Gemma3TextConfig's defaults: global and sliding-layer rope bases
LOCAL_THETA = 10_000.0


def read_config(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    pattern = get_int(config, "sliding_window_pattern", where, default=6)
    return {
        **read_common(config, where),
        **_read_rope(config, where),
        "qk_norm": True,
        "final_logit_softcapping": read_cap(config, "final_logit_softcapping", where, None),
        # Without layer_types: every pattern-th layer is global, the others slide.
        "default_sliding": tuple((i + 1) % pattern != 0 for i in range(fields["num_layers"])),
    }


def _read_rope(config: dict[str, Any], where: str) -> dict[str, Any]:
    """transformers 5: rope_parameters {"full_attention": {...}, "sliding_attention": {...}}
    (hparams.py reads the first as the model's rope); 4.x: rope_theta (+ rope_scaling) for
    global layers and rope_local_base_freq for sliding ones."""
    params = get_dict(config, "rope_parameters", where) or {}
    full = get_dict(params, "full_attention", where) or {}
    sliding = get_dict(params, "sliding_attention", where)
    out = {}
    if not any("rope_theta" in d for d in (config, params, full)):
        out["rope_theta"] = GLOBAL_THETA
    if sliding is None:
        local = get_float(config, "rope_local_base_freq", where, default=LOCAL_THETA, positive=True)
        return {**out, "sliding_rope_theta": local}
    rope_type = get_str(sliding, "rope_type", where, default="default")
    if rope_type != "default":
        raise UnsupportedModelError(
            f"{where}: rope_parameters.sliding_attention has rope_type '{rope_type}'; the "
            f"runtime scales the rope of global layers only (sliding layers: 'default'). {FIX}"
        )
    theta = get_float(sliding, "rope_theta", where, default=LOCAL_THETA, positive=True)
    return {**out, "sliding_rope_theta": theta}


FAMILY = Family(
    formats=WITH_VLLM,
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    rules=GLOBAL + ATTENTION + QK_NORM + SANDWICH_NORMS + DENSE_MLP,
    read_config=read_config,
    features=GEMMA_FEATURES,
)
