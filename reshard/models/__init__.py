"""The model families reshard knows, one module each (llama.py, qwen2.py, ...), each holding
one `Family`: its tensor rules, its own config.json keys and its runtime switches. Adding a
family is a new module here and one line in FAMILIES (docs/adding-a-model-family.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import (
    deepseek_v3,
    gemma2,
    gemma3,
    llama,
    minimax_m2,
    mixtral,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from .family import Family

if TYPE_CHECKING:
    from .hparams import HParams

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    mixtral.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    deepseek_v3.FAMILY,
    phi3.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    qwen3_next.FAMILY,
    minimax_m2.FAMILY,
    qwen3_5_moe.FAMILY,
)

BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES for a in f.architectures}
_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family_of(hp: HParams) -> Family:
    """The family of parsed hyper-parameters (hp.family is a name from FAMILIES)."""
    return _BY_NAME[hp.family]
