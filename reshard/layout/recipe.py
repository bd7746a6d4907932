"""The target layout: a TOML recipe from `recipes/` and/or CLI flags (flags win).

Unknown keys are errors, never ignored: a misspelt option that silently does nothing is the
worst kind of flag. Degrees are validated here on their own; whether they fit the model is
the planner's job.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..dtypes import recipe_spellings
from ..errors import InputError, ReshardIOError
from ..units import SIZE_UNITS
from .experts.place import PLACEMENTS
from .formats import FORMAT_NAMES

DTYPES = recipe_spellings()  # 'bf16' -> 'bfloat16', ...
MAX_DEGREE = 1 << 16  # tp, pp, ep, dp, redundant, gpus_per_node: no cluster is larger
MAX_LAYERS = 1 << 20  # a layer index past it is a typo
MAX_SIZE = 1 << 60  # bytes (1 EiB): a size past it is a typo, and would overflow a double

# TOML section -> keys it may hold (and the Recipe field each sets).
SECTIONS = {
    "layout": ("tp", "pp", "ep", "dp", "stages"),
    "output": ("dtype", "max_file_size", "keep_mtp", "format", "vllm_version"),
    "experts": ("placement", "redundant", "load", "gpus_per_node"),
    "costs": ("file",),
}
# Recipe field -> the CLI flag that sets it, so that an error names what the user typed.
FLAGS = {
    "tp": "--tp", "pp": "--pp", "ep": "--ep", "dp": "--dp", "dtype": "--dtype",
    "max_file_size": "--max-file-size", "placement": "--placement", "redundant": "--redundant",
    "load": "--expert-load", "costs": "--costs", "gpus_per_node": "--gpus-per-node",
    "format": "--format", "vllm_version": "--vllm-version",
}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    stages: tuple[tuple[int, int], ...] | None = None  # explicit [first, last] layers per stage
    dtype: str = "keep"
    max_file_size: int | None = None  # bytes per output file; None = one file per rank
    placement: str = "balanced"
    redundant: int = 0
    load: Path | None = None  # expert_load.json
    gpus_per_node: int | None = None  # node-aware placement for grouped routing
    costs: Path | None = None  # costs.json from `reshard profile layers`
    keep_mtp: bool = False  # write DeepSeek's multi-token-prediction layer (last stage)
    format: str = "native"  # output format: "native" or "vllm" (layout/formats/)
    vllm_version: str = "0.32"  # the vLLM whose sharded_state contract --format vllm writes
    origin: str = "defaults"  # the recipe file, for messages
    flags: frozenset[str] = frozenset()  # fields given by CLI flags, for messages

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "dp"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InputError(
                    f"{self.where(name)} must be a positive integer, got {_short(value)}."
                )
            _check_most(self.where(name), value)
        if self.tp % self.ep:
            raise InputError(
                f"{self.where('ep', 'tp')}: ep={self.ep} must divide tp={self.tp} (experts are "
                f"spread inside a stage's TP group). Valid ep: {_divisors(self.tp)}."
            )
        if self.dtype not in DTYPES.values():
            raise InputError(
                f"{self.where('dtype')} {self.dtype!r} is not one of {', '.join(DTYPES)}."
            )
        if self.placement not in PLACEMENTS:
            raise InputError(
                f"{self.where('placement')} {self.placement!r} is not one of "
                f"{', '.join(PLACEMENTS)}."
            )
        if self.format not in FORMAT_NAMES:
            raise InputError(
                f"{self.where('format')} {self.format!r} is not one of {', '.join(FORMAT_NAMES)}."
            )
        if type(self.vllm_version) is not str:
            raise InputError(f'{self.where("vllm_version")} must be a string such as "0.32".')
        if self.format == "vllm" and self.placement == "balanced" and self.load is None:
            # Nothing to balance without a load: vLLM's own (linear) placement it is.
            object.__setattr__(self, "placement", "contiguous")
        if type(self.keep_mtp) is not bool:
            raise InputError(f"{self.origin}: output.keep_mtp must be true or false.")
        if type(self.redundant) is not int or self.redundant < 0:
            raise InputError(f"{self.where('redundant')} must be >= 0, got {self.redundant!r}.")
        _check_most(self.where("redundant"), self.redundant)
        if self.gpus_per_node is not None and (
            type(self.gpus_per_node) is not int or self.gpus_per_node < 1
        ):
            raise InputError(
                f"{self.where('gpus_per_node')} must be a positive integer, got "
                f"{self.gpus_per_node!r}."
            )
        _check_most(self.where("gpus_per_node"), self.gpus_per_node or 1)
        if self.stages is not None and len(self.stages) != self.pp:
            raise InputError(
                f"{self.origin}: stages lists {len(self.stages)} stages but pp={self.pp}. "
                "Give one [first, last] layer range per stage, or drop stages."
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def where(self, *names: str) -> str:
        """Where a value came from, for messages: the flag ('--tp') when a flag gave it,
        else the recipe key ('r.toml: layout.tp')."""
        return where_from(self.origin, self.flags, *names)


def where_from(origin: str, flags: frozenset[str], *names: str) -> str:
    given = [FLAGS[n] for n in names if n in flags]
    if given:
        return "/".join(given)
    key = "file" if names[0] == "costs" else names[0]  # [costs] file sets Recipe.costs
    section = next(s for s, keys in SECTIONS.items() if key in keys)
    return f"{origin}: {section}.{key}"


def _check_most(where: str, value: int) -> None:
    if value > MAX_DEGREE:
        raise InputError(
            f"{where} is {_short(value)}; at most {MAX_DEGREE} (no cluster has more GPUs). "
            "Fix the number."
        )


def _short(value: Any) -> str:
    """A value for a message: a 400-digit number or a long string stays one short line."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**20 else None
    if text is None:
        return f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_size(value: Any, *, where: str) -> int:
    """'20GB', '512MiB', 1000000 -> bytes in [1, 1 EiB]. `where` names the flag or recipe key."""
    if type(value) is int and 0 < value <= MAX_SIZE:
        return value
    text = "" if isinstance(value, (bool, int)) else str(value)  # `true` is no size
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]*)\s*", text)
    unit = SIZE_UNITS.get(m.group(2).upper()) if m else None
    size = int(float(m.group(1)) * unit) if unit is not None else 0  # "0.5B" would be 0 bytes
    if not 1 <= size <= MAX_SIZE:
        raise InputError(
            f"{where} {_short(value)} is not a size from 1 byte to 1 EiB; write e.g. 20GB, "
            "512MiB or a byte count."
        )
    return size


def read_toml(path: Path) -> dict[str, Any]:
    """A recipe's TOML, strictly: not UTF-8, not TOML or nested past what a recipe needs is an
    InputError naming the file (and the byte or line); OS errors other than a missing file are
    exit 3."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: recipe not found. See recipes/ for examples.") from None
    except OSError as e:
        raise ReshardIOError(f"{path}: cannot read the recipe ({e.strerror or e}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); a recipe is "
            "UTF-8 TOML. Save it as UTF-8."
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e}).") from None
    except RecursionError:
        raise InputError(
            f"{path}: nests arrays or tables too deeply to read; a recipe needs two levels "
            "(stages = [[0, 9], [10, 31]])."
        ) from None


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    doc = read_toml(path)
    values: dict[str, Any] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):  # `tp = 4` above every [section]
            raise InputError(
                f"{path}: '{section}' is not in a section; put it under one of "
                f"{', '.join(f'[{s}]' for s in SECTIONS)} (e.g. tp goes under [layout])."
            )
        if section not in SECTIONS:
            raise InputError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}.")
        for key, value in body.items():
            if key not in SECTIONS[section]:
                raise InputError(
                    f"{path}: unknown key '{key}' in [{section}]; known: "
                    f"{', '.join(SECTIONS[section])}."
                )
            values["costs" if section == "costs" else key] = value
    return _from_values(values, origin=str(path), base=path.parent)


def _from_values(
    values: dict[str, Any], *, origin: str, base: Path | None, flags: frozenset[str] = frozenset()
) -> Recipe:
    v = dict(values)
    if "dtype" in v:
        v["dtype"] = normalise_dtype(v["dtype"], where=where_from(origin, flags, "dtype"))
    if "max_file_size" in v and v["max_file_size"] is not None:
        where = where_from(origin, flags, "max_file_size")
        v["max_file_size"] = parse_size(v["max_file_size"], where=where)
    if v.get("stages") is not None:
        v["stages"] = _parse_stages(v["stages"], where=origin)
    for key in ("load", "costs"):
        if v.get(key) is not None:
            if not isinstance(v[key], (str, Path)):
                raise InputError(
                    f"{where_from(origin, flags, key)} is {_short(v[key])}, not a file path; "
                    'write it as a string, e.g. load = "expert_load.json".'
                )
            p = Path(v[key])
            v[key] = p if p.is_absolute() or base is None else base / p
    return Recipe(**v, origin=origin, flags=flags)


def _parse_stages(stages: Any, *, where: str) -> tuple[tuple[int, int], ...]:
    ok = isinstance(stages, (list, tuple)) and all(
        isinstance(s, (list, tuple))
        and len(s) == 2
        and all(type(x) is int and 0 <= x < MAX_LAYERS for x in s)
        for s in stages
    )
    if not ok:
        raise InputError(
            f"{where}: stages must be a list of [first, last] layer pairs (layers in [0, "
            f"{MAX_LAYERS})), e.g. stages = [[0, 9], [10, 31]]."
        )
    return tuple((a, b) for a, b in stages)


def normalise_dtype(value: str, *, where: str = "--dtype") -> str:
    """'bf16' -> 'bfloat16'."""
    key = str(value).lower()
    if key not in DTYPES:
        raise InputError(f"{where} {value!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def build_recipe(path: Path | None = None, **flags: Any) -> Recipe:
    """The recipe file (if any) with every flag that was given (not None) on top."""
    recipe = load_recipe(path) if path else Recipe()
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(Recipe)}
    assert not unknown, unknown  # CLI wiring error, not user input
    if not given:
        return recipe
    origin = f"{recipe.origin} + flags" if path else "flags"
    merged = {
        f.name: getattr(recipe, f.name) for f in fields(Recipe) if f.name not in ("origin", "flags")
    }
    if "pp" in given and "stages" not in given and recipe.stages is not None:
        if given["pp"] != recipe.pp:
            merged["stages"] = None  # --pp overrides the recipe's explicit stages
    merged.update(given)
    return _from_values(merged, origin=origin, base=None, flags=frozenset(given))
