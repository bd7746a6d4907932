"""compressed-tensors integer weights, as llm-compressor writes them:

- `pack-quantized` (W4A16, W8A16): `weight_packed` int32 [out, ceil(in / p)] holding p = 32/bits
  values a word along `in` (value i of a word at bits i*bits, offset by 2^(bits-1)),
  `weight_scale` [out, in/g] (group) / [out, 1] (channel) / [1] (tensor) in the model dtype,
  `weight_shape` int64 [2] = the logical [out, in], and with asymmetric weights
  `weight_zero_point` int32 packed p a word along `out`: [ceil(out / p), in/g or 1].
- `int-quantized` / `naive-quantized` (W8A8): `weight` int8 [out, in] + `weight_scale` (and
  `weight_zero_point` int8 beside it when asymmetric); activations quantized at run time.

A split keeps whole groups along `in`, whole words of `weight_packed` along `in` and, with
zero points, whole words of `weight_zero_point` along `out`. With `actorder: group` a
`weight_g_idx` int32 [in] names each input column's group (GPTQ act-order): a row split cuts
it with the columns and keeps scales and zero points whole (as vLLM loads them).
`weight_shape` is kept whole on every rank (it names the whole weight, as the checkpoint
does). Pure: no I/O, no torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .format import Format, Rule, Stored, ceil_div

PACKED = "ct_packed"  # pack-quantized int4 / int8
INT8 = "ct_int8"  # int-quantized / naive-quantized int8 (W8A8)
STRATEGIES = ("group", "channel", "tensor")


def parse_int(group: dict, fmt: str, where: str) -> dict[str, Any]:
    """One compressed-tensors config group with integer weights -> QuantScheme fields."""
    w = group.get("weights") or {}
    bits, strategy, g = w.get("num_bits"), w.get("strategy"), w.get("group_size")
    kind = {"pack-quantized": PACKED, "int-quantized": INT8, "naive-quantized": INT8}.get(fmt)
    what = f"{where}: compressed-tensors int weights ({fmt!r}, num_bits={bits!r}, "
    what += f"strategy={strategy!r})"
    if kind is None or (kind == PACKED and bits not in (4, 8)) or (kind == INT8 and bits != 8):
        raise UnsupportedModelError(
            f"{what}: reshard splits pack-quantized int4/int8 and int-quantized (or "
            "naive-quantized) int8 weights."
        )
    if strategy not in STRATEGIES or (strategy == "group" and not _group_ok(g, bits, kind)):
        raise UnsupportedModelError(
            f"{what} group_size={g!r}: reshard splits the group (group_size a positive "
            f"multiple of {32 // bits if kind == PACKED else 1}), channel and tensor strategies."
        )
    act_order = w.get("actorder") == "group"  # weight_g_idx: each input column's group
    if act_order and (kind != PACKED or strategy != "group"):
        raise UnsupportedModelError(
            f"{what}: actorder 'group' orders the groups of pack-quantized group weights; "
            "it cannot apply here. The quantization_config is inconsistent; re-download it."
        )
    zero_point = not w.get("symmetric", True)
    if zero_point and strategy == "tensor":
        raise UnsupportedModelError(
            f"{what}: an asymmetric per-tensor zero point is not split by reshard."
        )
    acts = group.get("input_activations")
    static = kind == INT8 and isinstance(acts, dict) and acts.get("dynamic") is False
    return {
        "kind": kind,
        "bits": bits,
        "strategy": strategy,
        "group_size": g if strategy == "group" else 0,
        "zero_point": zero_point,
        "input_scale": static,
        "desc_act": act_order,
    }


def _group_ok(g, bits: int, kind: str) -> bool:
    pack = 32 // bits if kind == PACKED else 1
    return type(g) is int and g > 0 and g % pack == 0


def _pack(scheme) -> int:
    return 32 // scheme.bits


def _scale_shape(scheme, out: int, inn: int) -> tuple[int, ...]:
    if scheme.strategy == "group":
        return (out, ceil_div(inn, scheme.group_size))
    return (out, 1) if scheme.strategy == "channel" else (1,)


def _scale_rule(scheme, out_unit: int) -> tuple[Rule, Rule]:
    """weight_scale (out_unit 1) / weight_zero_point (packed along out) per strategy."""
    if scheme.strategy == "group" and scheme.desc_act:  # g_idx names global groups
        return (0, out_unit), None
    if scheme.strategy == "group":
        return (0, out_unit), (1, scheme.group_size)
    return ((0, out_unit), None) if scheme.strategy == "channel" else (None, None)


# --- pack-quantized -----------------------------------------------------------------------


def _packed_parts(scheme) -> tuple[str, ...]:
    zp = ("weight_zero_point",) if scheme.zero_point else ()
    g_idx = ("weight_g_idx",) if scheme.desc_act else ()
    return ("weight_packed", "weight_scale", "weight_shape", *zp, *g_idx)


def _packed_stored(scheme, out: int, inn: int, dtype: str) -> Stored:
    pack = _pack(scheme)
    parts = {
        "weight_packed": ("I32", (out, ceil_div(inn, pack))),
        "weight_scale": (dtype, _scale_shape(scheme, out, inn)),
        "weight_shape": ("I64", (2,)),
    }
    if scheme.zero_point:
        groups = _scale_shape(scheme, out, inn)[1]
        parts["weight_zero_point"] = ("I32", (ceil_div(out, pack), groups))
    if scheme.desc_act:
        parts["weight_g_idx"] = ("I32", (inn,))
    return parts


def _packed_map(scheme, part: str) -> tuple[Rule, Rule]:
    if part == "weight_packed":
        return (0, 1), (1, _pack(scheme))
    if part == "weight_scale":
        return _scale_rule(scheme, 1)
    if part == "weight_zero_point":
        return _scale_rule(scheme, _pack(scheme))
    if part == "weight_g_idx":
        return None, (0, 1)
    return None, None  # weight_shape


def _packed_units(scheme) -> tuple[int, int]:
    out = _pack(scheme) if scheme.zero_point else 1
    grouped = scheme.strategy == "group" and not scheme.desc_act  # act-order: words bind
    return out, scheme.group_size if grouped else _pack(scheme)


def _packed_logical(scheme, stored: Stored) -> tuple[int, int]:
    out, words = stored["weight_packed"][1]
    return out, words * _pack(scheme)


def _describe(scheme) -> str:
    unit = f"group {scheme.group_size}" if scheme.strategy == "group" else scheme.strategy
    zp = ", zero points" if scheme.zero_point else ", symmetric"
    zp += ", actorder group" if scheme.desc_act else ""
    form = "pack-quantized" if scheme.kind == PACKED else "int-quantized"
    return f"int{scheme.bits} compressed-tensors {form}, per-{unit} scale{zp}"


# --- int-quantized (W8A8) -----------------------------------------------------------------


def _int8_parts(scheme) -> tuple[str, ...]:
    zp = ("weight_zero_point",) if scheme.zero_point else ()
    return ("weight", "weight_scale", *zp, *(("input_scale",) if scheme.input_scale else ()))


def _int8_stored(scheme, out: int, inn: int, dtype: str) -> Stored:
    scale = _scale_shape(scheme, out, inn)
    parts = {"weight": ("I8", (out, inn)), "weight_scale": (dtype, scale)}
    if scheme.zero_point:
        parts["weight_zero_point"] = ("I8", scale)
    if scheme.input_scale:
        parts["input_scale"] = (dtype, (1,))
    return parts


def _int8_map(scheme, part: str) -> tuple[Rule, Rule]:
    if part == "weight":
        return (0, 1), (1, 1)
    if part in ("weight_scale", "weight_zero_point"):
        return _scale_rule(scheme, 1)
    return None, None  # input_scale


def _int8_units(scheme) -> tuple[int, int]:
    return 1, scheme.group_size if scheme.strategy == "group" else 1


FORMATS = {
    PACKED: Format(
        _packed_parts, _packed_stored, _packed_map, _packed_units, _packed_logical, _describe,
        unit_name="pack/group", main="weight_packed",
    ),
    INT8: Format(
        _int8_parts, _int8_stored, _int8_map, _int8_units,
        lambda scheme, stored: tuple(stored["weight"][1]), _describe,
        unit_name="group", main="weight",
    ),
}  # fmt: skip
