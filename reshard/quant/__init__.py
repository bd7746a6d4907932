"""Quantized checkpoints: the scheme read from config.json's `quantization_config`, the tensors
a quantized linear weight is stored as, and how a split of the logical weight [out, in] maps
onto each of them in whole blocks, packs or groups. Pure: no I/O, no torch.

Convert never dequantizes; the runtime does, only to verify (runtime/dequant.py). Which
layouts would cut a block, pack or group is in layout/quant_splits.py; each part's slice of a split
in quant/slicing.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..dtypes import CAST_DTYPES
from ..errors import UnsupportedModelError
from . import compressed, mxfp4, nvfp4
from .format import names_list, quantizes

PACK = 8  # int4 values per int32 (AWQ along out, GPTQ along in, qzeros along out)

# Stored-tensor suffix -> part name. The logical weight is always `<module>.weight`.
SUFFIXES = {
    "weight_scale_inv": "scale_inv",  # block FP8 (DeepSeek-V3, Qwen3-FP8)
    "weight_scale": "weight_scale",  # per-tensor / per-channel FP8 (compressed-tensors)
    "input_scale": "input_scale",  # static activation scale: kept, not used by the runtime
    "qweight": "qweight",  # AWQ [in, out/8] / GPTQ [in/8, out], int32
    "qzeros": "qzeros",  # [in/g, out/8], int32
    "scales": "scales",  # [in/g, out], fp16
    "g_idx": "g_idx",  # GPTQ [in]: the group of each input row
    # compressed-tensors int (quant/compressed.py) and NVFP4 (quant/nvfp4.py): part = leaf
    **{leaf: leaf for leaf in ("weight_packed", "weight_shape", "weight_zero_point")},
    "weight_g_idx": "weight_g_idx",
    **{leaf: leaf for leaf in ("weight_scale_2", "weight_global_scale", "input_global_scale")},
}
# Storage forms with their own module (quant/format.py's seam), by scheme kind.
FORMATS = {**compressed.FORMATS, **nvfp4.FORMATS}
SCHEME_PARTS = {
    "fp8_block": ("weight", "scale_inv"),
    "fp8_tensor": ("weight", "weight_scale"),
    "fp8_channel": ("weight", "weight_scale"),
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "mxfp4": mxfp4.PARTS,  # gpt-oss experts: quant/mxfp4.py
}


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # a key of SCHEME_PARTS
    block: tuple[int, int] | None = None  # fp8_block: [block_n (out), block_k (in)]
    group_size: int = 0  # awq / gptq
    desc_act: bool = False  # gptq act-order: g_idx is a permutation of groups
    input_scale: bool = False  # fp8: a static per-tensor input_scale is stored too
    # The FORMATS kinds: bits, strategy (group/channel/tensor), asymmetric zero points, and
    # which linear modules are quantized (compressed-tensors ignore/targets rules).
    bits: int = 0
    strategy: str = ""
    zero_point: bool = False
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        if self.kind in FORMATS:
            return FORMATS[self.kind].parts(self)
        extra = ("input_scale",) if self.input_scale else ()
        return SCHEME_PARTS[self.kind] + extra

    def to_dict(self) -> dict[str, Any]:
        d = {
            "kind": self.kind,
            "block": list(self.block) if self.block else None,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "input_scale": self.input_scale,
        }
        extra = {"bits": self.bits, "strategy": self.strategy, "zero_point": self.zero_point}
        extra |= {"ignore": list(self.ignore), "targets": list(self.targets)}
        return d | {k: v for k, v in extra.items() if v}  # older manifests: none of these

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        """Raises KeyError / ValueError on a dict that is not a scheme (a damaged manifest)."""
        block = tuple(d["block"]) if d.get("block") else None
        scheme = cls(d["kind"], block, d["group_size"], d["desc_act"], d["input_scale"])
        scheme = replace(
            scheme, bits=int(d.get("bits", 0)), strategy=str(d.get("strategy", "")),
            zero_point=bool(d.get("zero_point", False)), ignore=tuple(d.get("ignore", ())),
            targets=tuple(d.get("targets", ())),
        )  # fmt: skip
        known = scheme.kind in SCHEME_PARTS or scheme.kind in FORMATS
        if not known or (scheme.kind == "fp8_block") != bool(block):
            raise ValueError(f"not a quantization scheme: {d!r}")
        return scheme


def parse_quantization(config: dict[str, Any], *, where: str) -> dict[str, Any] | None:
    """config.json's quantization_config -> a QuantScheme dict (None: not quantized).
    Raises naming the key for a scheme reshard cannot split."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedModelError(
            f"{where}: quantization_config is {type(qc).__name__} {qc!r}, not an object. "
            "Re-download config.json."
        )
    method = str(qc.get("quant_method", "")).lower()
    parsers = {"fp8": _parse_fp8, "compressed-tensors": _parse_compressed, "awq": _parse_awq}
    parsers |= {"gptq": _parse_gptq, "modelopt": _parse_modelopt, "modelopt_fp4": _parse_modelopt}
    parsers["mxfp4"] = lambda qc, where: QuantScheme("mxfp4")
    if method not in parsers:
        raise UnsupportedModelError(
            f"{where}: quantization_config.quant_method={method!r} is not supported. "
            "Supported: fp8 (per-tensor or weight_block_size), compressed-tensors (FP8 tensor "
            "or channel, int4/int8 pack-quantized, int8 int-quantized, nvfp4-pack-quantized), "
            "modelopt (NVFP4), awq (gemm, 4 bit), gptq (4 bit), mxfp4."
        )
    return parsers[method](qc, where).to_dict()


def _parse_fp8(qc: dict, where: str) -> QuantScheme:
    block = qc.get("weight_block_size")
    static = qc.get("activation_scheme", "dynamic") == "static"
    if not block:
        return QuantScheme("fp8_tensor", input_scale=static)
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(type(b) is int and b > 0 for b in block)
    ):
        raise UnsupportedModelError(
            f"{where}: quantization_config.weight_block_size={block!r} must be two positive "
            "integers [block_n, block_k]."
        )
    return QuantScheme("fp8_block", block=(block[0], block[1]), input_scale=static)


def _parse_modelopt(qc: dict, where: str) -> QuantScheme:
    return QuantScheme(**nvfp4.parse_modelopt(qc, where))


def _parse_compressed(qc: dict, where: str) -> QuantScheme:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        what = f"is {groups!r}, not an object of groups"
        if isinstance(groups, dict):
            what = f"holds {len(groups)} groups {sorted(groups)}"
        raise UnsupportedModelError(
            f"{where}: compressed-tensors config_groups {what}; reshard splits a checkpoint "
            "quantized with one group (one scheme for every quantized linear)."
        )
    group = next(iter(groups.values()))
    group = group if isinstance(group, dict) else {}
    w = group.get("weights") if isinstance(group.get("weights"), dict) else {}
    fmt = str(group.get("format") or qc.get("format", ""))
    rules = {"ignore": names_list(qc, "ignore", where)}
    rules["targets"] = names_list(group, "targets", where)
    if w.get("type") == "int":
        return QuantScheme(**compressed.parse_int(group, fmt, where), **rules)
    if w.get("type") == "float" and w.get("num_bits") == 4:
        return QuantScheme(**nvfp4.parse_compressed(group, fmt, where), **rules)
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weights type={w.get('type')!r} "
            f"num_bits={w.get('num_bits')!r}: reshard splits int (4 or 8 bit), "
            "float 8 bit (FP8) and float 4 bit (NVFP4) weights."
        )
    strategy = w.get("strategy")
    if strategy not in ("tensor", "channel"):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weights.strategy={strategy!r}: reshard splits "
            "'tensor' and 'channel' FP8 (block FP8: use quant_method fp8)."
        )
    acts = group.get("input_activations")
    static = isinstance(acts, dict) and not acts.get("dynamic", True)
    kind = "fp8_channel" if strategy == "channel" else "fp8_tensor"
    return QuantScheme(kind, input_scale=static)


def _parse_int4(qc: dict, where: str, method: str) -> int:
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise UnsupportedModelError(
            f"{where}: {method} bits={bits!r}: reshard splits 4-bit {method} only."
        )
    if not isinstance(group, int) or group <= 0 or group % PACK:
        raise UnsupportedModelError(
            f"{where}: {method} group_size={group!r}: reshard needs a positive multiple of "
            f"{PACK} (group_size -1, one group per row, is not supported)."
        )
    return group


def _parse_awq(qc: dict, where: str) -> QuantScheme:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or qc.get("zero_point", True) is False:
        raise UnsupportedModelError(
            f"{where}: awq version={version!r} zero_point={qc.get('zero_point')!r}: reshard "
            "splits the GEMM layout with zero points only."
        )
    return QuantScheme("awq", group_size=_parse_int4(qc, where, "awq"))


def _parse_gptq(qc: dict, where: str) -> QuantScheme:
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedModelError(
            f"{where}: gptq checkpoint_format={fmt!r}: reshard reads the 'gptq' (v1) format."
        )
    group = _parse_int4(qc, where, "gptq")
    return QuantScheme("gptq", group_size=group, desc_act=bool(qc.get("desc_act", False)))


def scheme_of(hp) -> QuantScheme | None:
    """The scheme of an HParams (None: not quantized)."""
    q = getattr(hp, "quantization", None)
    return QuantScheme.from_dict(q) if q else None


def split_name(name: str, names) -> tuple[str, str | None]:
    """(logical weight name, part) of a stored tensor; part None for a plain tensor.
    `names`: every tensor name of the checkpoint (an FP8 weight is a part only when it has
    a scale next to it)."""
    module, _, leaf = name.rpartition(".")
    if mx := mxfp4.split_name(module, leaf, names):
        return mx
    if leaf in SUFFIXES:
        return f"{module}.weight", SUFFIXES[leaf]
    if leaf == "weight" and (
        f"{module}.weight_scale_inv" in names or f"{module}.weight_scale" in names
    ):
        return name, "weight"
    return name, None


SPLITTABLE = ("replicate", "column", "row", "expert_column", "expert_row", "stacked_expert")


def check_quantized_role(name: str, role: str, where: str) -> None:
    if role not in SPLITTABLE:
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' is part of a quantized {role} tensor; reshard splits "
            "quantized linear layers (attention, MLP, per-expert weights) only. Keep that "
            "tensor unquantized (modules_to_not_convert) or open an issue."
        )


def stored_tensors(
    scheme: QuantScheme, name: str, shape: tuple[int, ...], dtype: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What a quantized linear `name` (`<module>.weight`, logical [out, in], unquantized dtype
    `dtype`) is stored as: {stored name: (safetensors dtype, stored shape)}. The check of
    config-implied shapes against a checkpoint uses this for quantized weights."""
    if scheme.kind == "mxfp4":  # [E, in, out] experts
        return mxfp4.stored_tensors(name, shape)
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
        return mxfp4.logical_shape(name, tensors)
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


def describe(scheme: QuantScheme) -> str:
    if scheme.kind == "mxfp4":
        return "MXFP4: fp4 e2m1 in blocks of 32 with an e8m0 scale each"
    if scheme.kind in FORMATS:
        return FORMATS[scheme.kind].describe(scheme)
    if scheme.kind == "fp8_block":
        return f"FP8 E4M3, block-scaled {list(scheme.block)}"
    if scheme.kind.startswith("fp8"):
        return f"FP8 E4M3, per-{scheme.kind[4:]} scale"
    act = ", desc_act" if scheme.desc_act else ""
    return f"int4 {scheme.kind.upper()}, group {scheme.group_size}{act}"


def manifest_entry(hp, names) -> dict[str, Any] | None:
    """The manifest's `quantization`: the scheme, and each weight linked to its stored parts
    ({logical weight: {part: stored name}}; every rank holding the weight holds them all)."""
    scheme = scheme_of(hp)
    if scheme is None:
        return None
    every = set(names)
    links: dict[str, dict[str, str]] = {}
    for name in sorted(every):
        logical, part = split_name(name, every)
        if part:
            links.setdefault(logical, {})[part] = name
    return {"scheme": scheme.to_dict(), "description": describe(scheme), "weights": links}
