"""What a quantized linear weight is stored as (names, dtypes, shapes of its parts), the
logical [out, in] read back from them, and `check_parts`: a checkpoint stores every quantized
weight exactly as its scheme says. Pure: no I/O, no torch.
"""

from __future__ import annotations

import math

from ..dtypes import CAST_DTYPES
from ..errors import UnsupportedModelError
from .format import quantizes
from .mxfp4 import logical_shape as mxfp4_logical_shape
from .mxfp4 import stored_tensors as mxfp4_stored_tensors
from .scheme import FORMATS, PACK, SPLITTABLE, SUFFIXES, QuantScheme, describe


def stored_tensors(
    scheme: QuantScheme, name: str, shape: tuple[int, ...], dtype: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What a quantized linear `name` (`<module>.weight`, logical [out, in], unquantized dtype
    `dtype`) is stored as: {stored name: (safetensors dtype, stored shape)}. The check of
    config-implied shapes against a checkpoint uses this for quantized weights."""
    if scheme.kind == "mxfp4":  # [E, in, out] experts
        return mxfp4_stored_tensors(name, shape)
    out, inn = shape
    module = name.rpartition(".")[0]
    if scheme.kind in FORMATS:
        stored = FORMATS[scheme.kind].stored(scheme, out, inn, dtype)
        return {f"{module}.{leaf}": spec for leaf, spec in stored.items()}
    g = scheme.group_size
    scales = dtype if dtype in CAST_DTYPES.values() else "F16"  # int4 scales: AWQ/GPTQ fp16
    if scheme.kind == "fp8_block":
        bn, bk = scheme.block
        parts = {
            "weight": ("F8_E4M3", (out, inn)),
            "weight_scale_inv": ("F32", _blocks(shape, bn, bk)),
        }
    elif scheme.kind in ("fp8_tensor", "fp8_channel"):
        scale = (out, 1) if scheme.kind == "fp8_channel" else (1,)
        parts = {"weight": ("F8_E4M3", (out, inn)), "weight_scale": ("F32", scale)}
    elif scheme.kind == "awq":
        parts = {
            "qweight": ("I32", (inn, out // PACK)),
            "qzeros": ("I32", (inn // g, out // PACK)),
            "scales": (scales, (inn // g, out)),
        }
    else:
        parts = {
            "qweight": ("I32", (inn // PACK, out)),
            "qzeros": ("I32", (inn // g, out // PACK)),
            "scales": (scales, (inn // g, out)),
            "g_idx": ("I32", (inn,)),
        }
    if scheme.input_scale:
        parts["input_scale"] = ("F32", (1,))
    return {f"{module}.{leaf}": spec for leaf, spec in parts.items()}


def _blocks(shape, bn: int, bk: int) -> tuple[int, int]:
    return -(-shape[0] // bn), -(-shape[1] // bk)


def unpacked_numel(name: str, shape, dtype: str = "", scheme: QuantScheme | None = None) -> int:
    """Elements a stored tensor holds once dequantized: an int32 qweight holds 8, a
    compressed-tensors weight_packed 32/bits, an NVFP4 uint8 byte 2 (`dtype`: safetensors')."""
    n = math.prod(shape)
    leaf = name.rpartition(".")[2]
    if leaf == "qweight" or (leaf == "weight_packed" and dtype == "I32"):
        return n * (32 // scheme.bits if scheme and scheme.bits else PACK)
    return n * 2 if leaf in ("weight", "weight_packed") and dtype == "U8" else n


def logical_shape(scheme: QuantScheme, name: str, tensors) -> tuple[int, int]:
    """[out, in] of the logical weight `name`, from its main stored tensor in `tensors`
    (name -> (dtype, shape))."""
    module = name.rpartition(".")[0]
    if scheme.kind == "mxfp4":
        return mxfp4_logical_shape(name, tensors)
    if scheme.kind in FORMATS:
        main = FORMATS[scheme.kind].main
        return FORMATS[scheme.kind].logical(scheme, {main: tensors[f"{module}.{main}"]})
    if scheme.kind.startswith("fp8"):
        return tuple(tensors[name][1])
    qshape = tensors[f"{module}.qweight"][1]
    if scheme.kind == "awq":
        return qshape[1] * PACK, qshape[0]
    return qshape[1], qshape[0] * PACK


def check_parts(scheme: QuantScheme | None, tensors, roles, where: str) -> None:
    """Every quantized weight is stored exactly as the scheme says: all its parts, with the
    dtypes and shapes `stored_tensors` gives; an FP8 tensor without a scale is refused."""
    by_weight: dict[str, set] = {}
    for name in tensors:
        role = roles[name]
        if role.part:
            by_weight.setdefault(role.logical, set()).add(name)
        elif tensors[name][0].startswith("F8"):
            raise UnsupportedModelError(
                f"{where}: tensor '{name}' is {tensors[name][0]} but has no scale tensor "
                "(weight_scale_inv / weight_scale) next to it, so its values cannot be read. "
                "The checkpoint is incomplete; re-download it."
            )
    if by_weight and scheme is None:
        first = sorted(by_weight)[0]
        raise UnsupportedModelError(
            f"{where}: tensors {sorted(by_weight[first])} are quantized but config.json has no "
            "quantization_config. Re-download config.json with the weights."
        )
    if scheme is not None and not by_weight:
        raise UnsupportedModelError(
            f"{where}: config.json's 'quantization_config' says {scheme.kind}, but no tensor "
            f"is stored that way (no {' / '.join(_stored_leaves(scheme))} next to any "
            "weight): the weights are plain. Remove quantization_config from config.json, "
            "or re-download the quantized weights."
        )
    for weight, names in by_weight.items():
        _check_weight_parts(scheme, weight, names, tensors, where)
    if scheme is not None and scheme.kind in FORMATS:
        _check_plain_linears(scheme, tensors, roles, where)


def _check_plain_linears(scheme: QuantScheme, tensors, roles, where: str) -> None:
    """A FORMATS config says which linears it leaves alone (ignore / targets): any other
    linear weight stored plain means the config and the tensors disagree."""
    for name, (dtype, shape) in tensors.items():
        role, module = roles[name], name.rpartition(".")[0]
        linear = role.role in SPLITTABLE[1:] and name.endswith(".weight") and len(shape) == 2
        if linear and not role.part and quantizes(scheme, module):
            raise UnsupportedModelError(
                f"{where}: tensor '{name}' is stored unquantized ({dtype} {list(shape)}), but "
                f"quantization_config ({describe(scheme)}) quantizes '{module}': it is not in "
                f"ignore {list(scheme.ignore)}. The checkpoint and its quantization_config "
                "disagree; re-download config.json with the weights."
            )


def _stored_leaves(scheme: QuantScheme) -> list[str]:
    leaves = {part: leaf for leaf, part in SUFFIXES.items()}
    return [leaves[p] for p in scheme.parts if p != "weight"]


def _check_weight_parts(scheme: QuantScheme, weight: str, names: set, tensors, where) -> None:
    module = weight.rpartition(".")[0]
    main = weight if scheme.kind.startswith("fp8") else f"{module}.qweight"
    if scheme.kind in FORMATS:
        main = f"{module}.{FORMATS[scheme.kind].main}"
    if main in tensors and len(tensors[main][1]) != 2:
        raise UnsupportedModelError(
            f"{where}: tensor '{main}' is {tensors[main][0]} {list(tensors[main][1])} with "
            f"quantization parts {sorted(names - {main})}, but only 2-D linear weights are "
            "quantized (a norm or bias never is). The checkpoint is damaged; re-download it."
        )
    leaf = "weight_scale" if scheme.kind in FORMATS else "scales"
    scales = tensors.get(f"{module}.{leaf}", ("F16",))[0]  # fp16 or bf16, as exported
    if scheme.kind in FORMATS and not quantizes(scheme, module):
        raise UnsupportedModelError(
            f"{where}: tensors {sorted(names)} are quantized, but quantization_config leaves "
            f"'{module}' unquantized (ignore {list(scheme.ignore)}, targets "
            f"{list(scheme.targets)}). The checkpoint and its quantization_config disagree."
        )
    try:
        expected = stored_tensors(scheme, weight, logical_shape(scheme, weight, tensors), scales)
    except KeyError as e:
        raise UnsupportedModelError(
            f"{where}: quantized weight '{weight}' ({scheme.kind}) has no {e.args[0]!r}; "
            f"it needs {', '.join(scheme.parts)}. The checkpoint is incomplete; re-download it."
        ) from None
    if set(expected) != names:
        raise UnsupportedModelError(
            f"{where}: quantized weight '{weight}' is stored as {sorted(names)}, but "
            f"{scheme.kind} stores {sorted(expected)}. The checkpoint and its "
            "quantization_config disagree."
        )
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = tensors[name]
        scalar = shape == (1,) and tuple(got_shape) in ((), (1,))
        if got_dtype != dtype or (tuple(got_shape) != shape and not scalar):
            raise UnsupportedModelError(
                f"{where}: tensor '{name}' is {got_dtype} {list(got_shape)}, but {scheme.kind} "
                f"with '{weight}' of shape {list(logical_shape(scheme, weight, tensors))} "
                f"stores it as {dtype} {list(shape)}. The checkpoint and its "
                "quantization_config disagree."
            )
