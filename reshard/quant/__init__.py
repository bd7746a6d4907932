"""Quantized checkpoints: the scheme read from config.json's `quantization_config`, the tensors
a quantized linear weight is stored as, and how a split of the logical weight [out, in] maps
onto each of them in whole blocks, packs or groups. Pure: no I/O, no torch.

Convert never dequantizes; the runtime does, only to verify (runtime/dequant.py). The scheme
is quant/scheme.py's, reading it from config.json quant/parse.py's, the stored parts and their
check quant/stored.py's, each part's slice of a split quant/slicing.py's; which layouts would
cut a block, pack or group is layout/quant_splits.py's (it reads a family's rules).
"""

from __future__ import annotations

from .parse import parse_quantization
from .scheme import (
    FORMATS,
    PACK,
    SPLITTABLE,
    SUFFIXES,
    QuantScheme,
    check_quantized_role,
    describe,
    manifest_entry,
    split_name,
)
from .stored import check_parts, logical_shape, stored_tensors, unpacked_numel

__all__ = [
    "FORMATS",
    "PACK",
    "SPLITTABLE",
    "SUFFIXES",
    "QuantScheme",
    "check_parts",
    "check_quantized_role",
    "describe",
    "logical_shape",
    "manifest_entry",
    "parse_quantization",
    "split_name",
    "stored_tensors",
    "unpacked_numel",
]
