"""Typed reads of config.json values. Each failure names the file, the key and the value, so
`hidden_size: null`, `rms_norm_eps: "x"` or `rope_scaling: []` is a clear exit 2 rather than
a traceback. A null value reads as absent, as transformers reads it."""

from __future__ import annotations

import math
from typing import Any

from ..errors import CheckpointError

REQUIRED: Any = object()  # default= marker: the key must be present and non-null
FIX = "Fix config.json (compare it with the model's original on the hub)."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: '{key}' is {_short(value)}; expected {expected}. {FIX}")


def _lookup(config: dict, key: str, where: str, default: Any, arch: str) -> Any:
    value = config.get(key)
    if value is None and default is REQUIRED:
        state = f"'{key}' is null" if key in config else f"missing '{key}'"
        raise CheckpointError(f"{where}: {state}, which {arch} requires. {FIX}")
    return default if value is None else value


def get_int(
    config: dict,
    key: str,
    where: str,
    *,
    default: Any = REQUIRED,
    minimum: int = 1,
    maximum: int | None = None,
    arch="",
) -> int:
    value = _lookup(config, key, where, default, arch)
    if type(value) is not int or value < minimum:
        raise _bad(where, key, value, f"an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(where, key, value, f"an integer in {minimum}..{maximum}")
    return value


def get_float(
    config: dict, key: str, where: str, *, default: float, positive: bool = False
) -> float:
    value = _lookup(config, key, where, default, "")
    numeric = type(value) in (int, float) and math.isfinite(value)
    if not numeric or value < 0 or (positive and value == 0):
        raise _bad(where, key, value, "a positive number" if positive else "a number >= 0")
    return float(value)


def get_bool(config: dict, key: str, where: str, *, default: bool) -> bool:
    value = _lookup(config, key, where, default, "")
    if type(value) is not bool:
        raise _bad(where, key, value, "true or false")
    return value


def get_str(config: dict, key: str, where: str, *, default: str) -> str:
    value = _lookup(config, key, where, default, "")
    if not isinstance(value, str):
        raise _bad(where, key, value, "a string")
    return value


def get_dict(config: dict, key: str, where: str) -> dict | None:
    value = config.get(key)
    if value is not None and not isinstance(value, dict):
        raise _bad(where, key, value, "an object or null")
    return value


def get_int_list(config: dict, key: str, where: str, *, minimum: int = 0) -> list[int]:
    value = _lookup(config, key, where, [], "")
    if not isinstance(value, list) or not all(type(v) is int and v >= minimum for v in value):
        raise _bad(where, key, value, f"a list of integers >= {minimum}")
    return value


def get_str_list(config: dict, key: str, where: str) -> list[str]:
    value = _lookup(config, key, where, [], "")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(where, key, value, "a list of strings")
    return value
