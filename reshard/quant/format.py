"""The seam between quant/__init__ and one storage form of quantized weights: a `Format` says
which tensors a weight [out, in] is stored as, how a split of [out, in] maps onto each, and
which units a split must keep whole. Pure: no I/O, no torch. A scheme is duck-typed here
(QuantScheme's fields), so the form modules need not import the package face.

Also here: which modules a scheme quantizes (compressed-tensors `targets`/`ignore`, ModelOpt
`exclude_modules`), so `plan` from config.json alone and the tensor check agree.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError

Stored = dict[str, tuple[str, tuple[int, ...]]]  # stored leaf -> (safetensors dtype, shape)
# (stored dim, unit) along logical (out, in) for one part; None: the part is kept whole.
Rule = tuple[int, int] | None


@dataclass(frozen=True)
class Format:
    parts: Callable[[Any], tuple[str, ...]]  # scheme -> stored leaves (each its own part name)
    stored: Callable[[Any, int, int, str], Stored]  # (scheme, out, in, scale dtype)
    part_map: Callable[[Any, str], tuple[Rule, Rule]]  # (scheme, part) -> (out rule, in rule)
    units: Callable[[Any], tuple[int, int]]  # whole units a split keeps along (out, in)
    logical: Callable[[Any, Stored], tuple[int, int]]  # (scheme, module's stored) -> [out, in]
    describe: Callable[[Any], str]
    unit_name: str  # "pack/group", "block": how refusals name the unit
    main: str  # the stored leaf the logical shape is read from


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def glob_rules(patterns) -> tuple[str, ...]:
    """ModelOpt's exclude_modules globs ("lm_head", "*mlp.gate") as compressed-tensors'
    `re:` rules (fnmatch semantics, whole name)."""
    return tuple("re:" + fnmatch.translate(p) for p in patterns)


def matches(module: str, rules) -> bool:
    """compressed-tensors' match_name: `re:` + a regex matched from the start (re.match), else
    the exact module name. A rule naming a parent module ("model.layers.0.mlp") covers its
    children, as ModelOpt's and vLLM's exclusion checks do."""
    names = [module] + [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]
    for rule in rules:
        if rule.startswith("re:"):
            if re.match(rule[3:], module):
                return True
        elif rule in names:
            return True
    return False


def quantizes(scheme, module: str) -> bool:
    """Does `scheme` store linear `module` quantized? `targets` empty or "Linear": every
    linear; `ignore` wins over targets."""
    if matches(module, getattr(scheme, "ignore", ())):
        return False
    targets = getattr(scheme, "targets", ())
    return not targets or "Linear" in targets or matches(module, targets)


def names_list(d: dict, key: str, where: str) -> tuple[str, ...]:
    """config[key] as module-name rules (compressed-tensors ignore / targets)."""
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors {key}={value!r} must be a list of module names or "
            "'re:' patterns. Re-download config.json."
        )
    return tuple(value)
