"""Rotary position embeddings with the inverse-frequency formulas transformers uses for the
rope types reshard supports (default, linear, llama3, yarn, longrope up to its original
context). Pure tensor math: no modules,
no parallelism. Layout is HF's rotate_half convention (first half / second half of head_dim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..models.hparams import HParams


def compute_inv_freq(hp: HParams) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] in fp32 and the cos/sin scale, as transformers does."""
    scaling = dict(hp.rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"{hp.architecture}: rope type '{rope_type}' is not supported by the runtime "
            f"(supported: {', '.join(sorted(_ROPE_TYPES))}); config.json sets it in "
            "rope_scaling.rope_type (rope_parameters in transformers 5). convert, plan and "
            "export work; verify runs --level hashes --level weights."
        )
    return _ROPE_TYPES[rope_type](hp, scaling)


def rotary_dim(hp: HParams) -> int:
    """Leading channels of each head that rotate: head_dim x partial_rotary_factor (Phi-4-mini
    0.75), the rest pass through, as transformers' apply_rotary_pos_emb does."""
    factor = float((hp.rope_scaling or {}).get("partial_rotary_factor", 1.0))
    return int(hp.head_dim * factor)


def compute_sliding_inv_freq(hp: HParams) -> tuple[torch.Tensor, float] | None:
    """Sliding-window layers' own default rope at base sliding_rope_theta (Gemma-3), or None
    when every layer shares compute_inv_freq's."""
    if hp.sliding_rope_theta is None:
        return None
    return compute_inv_freq(
        dataclasses.replace(hp, rope_theta=hp.sliding_rope_theta, rope_scaling=None)
    )


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # inv_freq: [dim/2]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    return 1.0 / (base**exponents)


def _rope_default(hp: HParams, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(hp.rope_theta, rotary_dim(hp)), 1.0


def _rope_linear(hp: HParams, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(hp.rope_theta, rotary_dim(hp)) / float(scaling["factor"]), 1.0


def _rope_llama3(hp: HParams, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    inv_freq = _default_inv_freq(hp.rope_theta, rotary_dim(hp))
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _rope_yarn(hp: HParams, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    dim, base = rotary_dim(hp), hp.rope_theta
    original = int(scaling.get("original_max_position_embeddings") or hp.max_position_embeddings)
    factor = scaling.get("factor") or hp.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = _yarn_mscale(
            factor, scaling.get("mscale"), scaling.get("mscale_all_dim")
        )
    low, high = _yarn_correction_range(
        scaling.get("beta_fast") or 32,
        scaling.get("beta_slow") or 1,
        dim,
        base,
        original,
        scaling.get("truncate", True),
    )
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1 - _linear_ramp(low, high, dim // 2)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get(factor, mscale) / get(factor, mscale_all_dim)
    return get(factor)


def _yarn_correction_range(
    fast: float, slow: float, dim: int, base: float, original: int, truncate: bool
) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, n: int) -> torch.Tensor:
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return torch.clamp((torch.arange(n, dtype=torch.float32) - low) / (high - low), 0, 1)


def _rope_longrope(hp: HParams, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    # Phi-3.5 / Phi-4-mini: one factor per frequency, short_factor up to the original context.
    # Past it transformers switches every position to long_factor and recomputes the cache;
    # the runtime does not, and refuses such runs (rope_position_limit).
    dim = rotary_dim(hp)
    short, original = scaling.get("short_factor"), scaling.get("original_max_position_embeddings")
    if not isinstance(short, list) or len(short) != dim // 2 or not original:
        raise UnsupportedModelError(
            f"{hp.architecture}: rope type 'longrope' needs rope_scaling.short_factor ({dim // 2} "
            "numbers, one per rotary frequency) and original_max_position_embeddings; "
            f"config.json has {str(short)[:40]} and {original}. Fix config.json."
        )
    original = int(original)
    factor = scaling.get("factor") or hp.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None and factor <= 1:
        attention_factor = 1.0
    elif attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short_t = torch.tensor(short, dtype=torch.float32)
    return 1.0 / (short_t * hp.rope_theta**exponents), float(attention_factor)


def rope_position_limit(hp: HParams) -> int | None:
    """Sequence length up to which the runtime's rope equals transformers' (None: any)."""
    scaling = hp.rope_scaling or {}
    original = scaling.get("original_max_position_embeddings")
    if scaling.get("rope_type") == "longrope" and original:
        return int(original)
    return None  # any length, or a longrope compute_inv_freq refuses


_ROPE_TYPES = {
    "default": _rope_default,
    "linear": _rope_linear,
    "llama3": _rope_llama3,
    "yarn": _rope_yarn,
    "longrope": _rope_longrope,
}


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim] for integer positions [B, S]; computed in fp32, then cast."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, hd]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, hd]; cos/sin: [B, S, rd]. Partial rotary (rd < hd): the first rd
    channels rotate, the rest pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        rot, rest = x[..., :rd], x[..., rd:]
        return torch.cat(((rot * cos) + (rotate_half(rot) * sin), rest), dim=-1)
    return (x * cos) + (rotate_half(x) * sin)
