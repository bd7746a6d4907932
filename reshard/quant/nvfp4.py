"""NVFP4 weights: fp4 e2m1 values packed two a byte along `in` (value 2i in the low nibble),
one fp8-e4m3 scale per 16 values, and one fp32 global scale per weight. Two spellings:

- ModelOpt (`quant_method: modelopt`, `quant_algo: NVFP4`, or hf_quant_config.json):
  `weight` uint8 [out, in/2], `weight_scale` [out, in/16], `weight_scale_2` (the global scale,
  multiplied), `input_scale` (W4A4).
- compressed-tensors `nvfp4-pack-quantized`: `weight_packed` uint8 [out, in/2], `weight_scale`
  [out, in/16], `weight_global_scale` (divided by), `input_global_scale` (W4A4).

A split keeps whole 16-value blocks with their scales; the global scales are whole on every
rank. Pure: no I/O, no torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .format import Format, Rule, Stored, glob_rules

MODELOPT = "nvfp4"
COMPRESSED = "ct_nvfp4"
BLOCK = 16  # values per fp8 scale
# kind -> (packed leaf, global scale leaf, input scale leaf)
LEAVES = {
    MODELOPT: ("weight", "weight_scale_2", "input_scale"),
    COMPRESSED: ("weight_packed", "weight_global_scale", "input_global_scale"),
}


def parse_modelopt(qc: dict, where: str) -> dict[str, Any]:
    """config.json's quantization_config (or hf_quant_config.json's `quantization`, merged
    into it on read) of a ModelOpt export."""
    inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
    algo = str(inner.get("quant_algo", "")).upper()
    group = inner.get("group_size", BLOCK)
    if algo not in ("NVFP4", "W4A16_NVFP4") or group != BLOCK:
        raise UnsupportedModelError(
            f"{where}: modelopt quant_algo={inner.get('quant_algo')!r} group_size={group!r}: "
            f"reshard splits ModelOpt NVFP4 (group_size {BLOCK}) only."
        )
    excluded = inner.get("exclude_modules") or inner.get("ignore") or []
    return {
        "kind": MODELOPT,
        "group_size": BLOCK,
        "input_scale": algo == "NVFP4",
        "ignore": glob_rules(excluded),
    }


def parse_compressed(group: dict, fmt: str, where: str) -> dict[str, Any]:
    w = group.get("weights") or {}
    if (
        fmt != "nvfp4-pack-quantized"
        or w.get("group_size") != BLOCK
        or not w.get("symmetric", True)
    ):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors fp4 weights (format {fmt!r}, group_size "
            f"{w.get('group_size')!r}, symmetric {w.get('symmetric', True)!r}): reshard splits "
            f"symmetric nvfp4-pack-quantized, group_size {BLOCK}."
        )
    acts = group.get("input_activations")
    return {"kind": COMPRESSED, "group_size": BLOCK, "input_scale": isinstance(acts, dict)}


def _parts(scheme) -> tuple[str, ...]:
    packed, global_scale, inputs = LEAVES[scheme.kind]
    extra = (inputs,) if scheme.input_scale else ()
    return (packed, "weight_scale", global_scale, *extra)


def _stored(scheme, out: int, inn: int, dtype: str) -> Stored:
    packed, global_scale, inputs = LEAVES[scheme.kind]
    parts = {
        packed: ("U8", (out, inn // 2)),
        "weight_scale": ("F8_E4M3", (out, -(-inn // BLOCK))),
        global_scale: ("F32", (1,)),
    }
    if scheme.input_scale:
        parts[inputs] = ("F32", (1,))
    return parts


def _part_map(scheme, part: str) -> tuple[Rule, Rule]:
    if part == LEAVES[scheme.kind][0]:
        return (0, 1), (1, 2)
    if part == "weight_scale":
        return (0, 1), (1, BLOCK)
    return None, None  # global and input scales


def _logical(scheme, stored: Stored) -> tuple[int, int]:
    out, half = stored[LEAVES[scheme.kind][0]][1]
    return out, half * 2


def _describe(scheme) -> str:
    spelling = "ModelOpt" if scheme.kind == MODELOPT else "compressed-tensors"
    return f"NVFP4 ({spelling}), fp8 scale per {BLOCK} values + global scale"


FORMATS = {
    kind: Format(
        _parts, _stored, _part_map, lambda scheme: (1, BLOCK), _logical, _describe,
        unit_name="block", main=LEAVES[kind][0],
    )
    for kind in LEAVES
}  # fmt: skip
