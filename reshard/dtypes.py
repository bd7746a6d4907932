"""The one dtype table: safetensors header code, torch / config.json name, bytes per element,
the spellings --dtype and recipes accept. Every other dtype view in reshard is derived here.

No torch at import time: the byte path (headers, planning, plain copies) runs without it;
`torch_dtypes()` builds the torch view on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    code: str  # the safetensors header code ("BF16")
    name: str | None  # torch and config.json name ("bfloat16"); None: torch has no view of it
    size: int  # bytes per element
    kind: str  # "float", "fp8", "int", "bool"
    aliases: tuple[str, ...] = ()  # other --dtype / recipe spellings; the first one CLI offers
    cast: int = 0  # >0: convert may cast floats to it (--dtype, recipe); its place in listings


# Order is the order messages list them in (safetensors' own order for codes).
TABLE: tuple[DType, ...] = (
    DType("F64", "float64", 8, "float"),
    DType("F32", "float32", 4, "float", ("fp32",), cast=3),
    DType("F16", "float16", 2, "float", ("fp16", "half"), cast=2),
    DType("BF16", "bfloat16", 2, "float", ("bf16",), cast=1),
    DType("F8_E4M3", "float8_e4m3fn", 1, "fp8"),
    DType("F8_E5M2", "float8_e5m2", 1, "fp8"),
    DType("I64", "int64", 8, "int"),
    DType("I32", "int32", 4, "int"),
    DType("I16", "int16", 2, "int"),
    DType("I8", "int8", 1, "int"),
    DType("U64", None, 8, "int"),
    DType("U32", None, 4, "int"),
    DType("U16", None, 2, "int"),
    DType("U8", "uint8", 1, "int"),
    DType("BOOL", "bool", 1, "bool"),
)
CASTS = tuple(sorted((d for d in TABLE if d.cast), key=lambda d: d.cast))  # BF16, F16, F32

# Derived views, each under the name its users know it by.
DTYPE_SIZES = {d.code: d.size for d in TABLE}  # header code -> bytes per element
CAST_DTYPES = {d.name: d.code for d in CASTS}  # --dtype name -> header code
CAST_SIZES = {d.name: d.size for d in CASTS}  # cast / compute name -> bytes per element
FLOAT_CODES = tuple(d.code for d in TABLE if d.kind in ("float", "fp8"))
PLAIN_FLOAT_CODES = tuple(d.code for d in TABLE if d.kind == "float")
DTYPE_NAMES = {d.code: d.name for d in TABLE if d.name}  # header code -> torch name


def recipe_spellings() -> dict[str, str]:
    """Every spelling a recipe's `dtype` accepts -> the name it means ('bf16' -> 'bfloat16')."""
    out = {"keep": "keep"}
    for d in CASTS:
        out |= {d.name: d.name} | dict.fromkeys(d.aliases, d.name)
    return out


def cli_spellings() -> list[str]:
    """The --dtype choices: auto, keep, each cast name and its first alias (the short form)."""
    choices = ["auto", "keep"]
    for d in CASTS:
        choices += [d.name, *d.aliases[:1]]
    return choices


def dtype_name(dtype) -> str:
    """'BF16' / torch.bfloat16 / 'bfloat16' -> 'bfloat16': one spelling of dtypes in reports."""
    text = str(dtype)
    return DTYPE_NAMES.get(text, text.removeprefix("torch."))


@functools.cache
def torch_dtypes() -> dict:
    """Header code -> torch.dtype for every code torch can view. Imports torch on first call."""
    import torch  # lazy: importing torch costs 1.5 s, more than converting a gigabyte

    return {code: getattr(torch, name) for code, name in DTYPE_NAMES.items()}
