"""A quantized checkpoint's scheme (the typed form of config.json's `quantization_config`),
the stored-tensor suffixes that make a linear weight's parts, a part's logical weight, the
scheme's one-line description and the manifest's `quantization` entry. Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import UnsupportedModelError
from .compressed import FORMATS as INT_FORMATS
from .mxfp4 import PARTS as MXFP4_PARTS
from .mxfp4 import split_name as split_mxfp4_name
from .nvfp4 import FORMATS as NVFP4_FORMATS

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
FORMATS = {**INT_FORMATS, **NVFP4_FORMATS}
SCHEME_PARTS = {
    "fp8_block": ("weight", "scale_inv"),
    "fp8_tensor": ("weight", "weight_scale"),
    "fp8_channel": ("weight", "weight_scale"),
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "mxfp4": MXFP4_PARTS,  # gpt-oss experts: quant/mxfp4.py
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


def split_name(name: str, names) -> tuple[str, str | None]:
    """(logical weight name, part) of a stored tensor; part None for a plain tensor.
    `names`: every tensor name of the checkpoint (an FP8 weight is a part only when it has
    a scale next to it)."""
    module, _, leaf = name.rpartition(".")
    if mx := split_mxfp4_name(module, leaf, names):
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
    scheme = hp.quantization
    if scheme is None:
        return None
    every = set(names)
    links: dict[str, dict[str, str]] = {}
    for name in sorted(every):
        logical, part = split_name(name, every)
        if part:
            links.setdefault(logical, {})[part] = name
    return {"scheme": scheme.to_dict(), "description": describe(scheme), "weights": links}
