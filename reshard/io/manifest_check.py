"""Schema checks for a manifest read back from disk (docs/manifest.md); its seal is seal.py's.

`check_manifest` checks types, ranges and the cross-references inside the document (ranks vs
world size, files vs ranks, pieces vs shapes) and raises OutputError naming the field: a
damaged manifest is exit 2, never a traceback.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..dtypes import CAST_DTYPES, DTYPE_SIZES
from ..errors import OutputError
from ..layout.formats import FORMAT_NAMES
from ..layout.tensors import swap_last
from ..models.hparams import HParams
from ..ranks import rank_coords, replica_base
from .seal import SEAL_KEY

DTYPES = ("keep", *CAST_DTYPES)
HEX = frozenset("0123456789abcdef")


class Fields:
    """Typed access to a manifest's fields; every failure names the field (`ranks[3].rank`)."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise OutputError(
            f"{self.path}: field '{field}' {problem}; the manifest is damaged or was edited. "
            "Restore it from the output's original copy, or re-run reshard convert."
        )

    def get(self, obj: dict, key: str, kinds, field: str):
        if key not in obj:
            self.fail(field, "is missing")
        value = obj[key]
        bad_bool = isinstance(value, bool) and bool not in _tuple(kinds)
        if bad_bool or not isinstance(value, kinds):
            names = "/".join(_kind_name(k) for k in _tuple(kinds))
            self.fail(field, f"is {_kind_name(type(value))} {_short(value)}, expected {names}")
        return value

    def int(self, obj: dict, key: str, field: str, lo: int = 0, hi: int | None = None) -> int:
        value = self.get(obj, key, int, field)
        if value < lo or (hi is not None and value >= hi):
            bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
            self.fail(field, f"is {value}, expected {bound}")
        return value

    def ints(self, obj: dict, key: str, field: str, n: int) -> list[int]:
        value = self.get(obj, key, list, field)
        if len(value) != n or not all(type(v) is int and v >= 0 for v in value):
            self.fail(field, f"is {_short(value)}, expected {n} integers >= 0")
        return value

    def hex(self, obj: dict, key: str, field: str) -> str:
        value = self.get(obj, key, str, field)
        if len(value) != 32 or not set(value) <= HEX:
            self.fail(field, f"is {_short(value)}, expected 32 lower-case hex digits")
        return value

    def one_of(self, obj: dict, key: str, field: str, allowed) -> str:
        value = self.get(obj, key, str, field)
        if value not in allowed:
            self.fail(field, f"is {_short(value)}, expected one of {', '.join(sorted(allowed))}")
        return value


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_name(kind) -> str:
    return {type(None): "null", dict: "object", list: "array", str: "string"}.get(
        kind, kind.__name__
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_manifest(path: Path, doc: Any) -> None:
    """Raise OutputError naming the first field that breaks the schema of docs/manifest.md."""
    if not isinstance(doc, dict):
        Fields(path).fail("(top level)", f"is {_kind_name(type(doc))}, expected object")
    f = Fields(path)
    f.hex(doc, SEAL_KEY, SEAL_KEY)
    f.get(doc, "reshard_version", str, "reshard_version")
    f.get(doc, "config", dict, "config")
    _check_source(f, f.get(doc, "source", dict, "source"))
    hp = _check_hparams(f, f.get(doc, "hparams", dict, "hparams"))
    layout = _check_layout(f, f.get(doc, "layout", dict, "layout"), hp)
    dropped = f.get(doc, "dropped", list, "dropped")
    if not all(isinstance(n, str) for n in dropped):
        f.fail("dropped", "holds a non-string")
    if "side_files" in doc:  # absent in manifests written before side files were hashed
        _check_side_files(f, f.get(doc, "side_files", dict, "side_files"))
    files = _check_files(f, f.get(doc, "files", dict, "files"), layout["world_size"])
    _check_ranks(f, f.get(doc, "ranks", list, "ranks"), layout, files)


def _check_side_files(f: Fields, sides: dict) -> None:
    for name, entry in sides.items():
        field = f"side_files[{name!r}]"
        if not _plain(name):
            f.fail(field, "is not a plain file name in the folder")
        if not isinstance(entry, dict):
            f.fail(field, "is not an object")
        f.int(entry, "size", f"{field}.size")
        f.hex(entry, "xxh3_128", f"{field}.xxh3_128")


def _plain(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _check_source(f: Fields, source: dict) -> None:
    for key in ("model", "path"):
        f.get(source, key, str, f"source.{key}")
    for key in ("repo_id", "revision"):
        f.get(source, key, (str, type(None)), f"source.{key}")
    f.get(source, "pickle", bool, "source.pickle")
    for i, entry in enumerate(f.get(source, "files", list, "source.files")):
        _check_source_file(f, entry, f"source.files[{i}]")
    made_from = source
    while "made_from" in made_from:  # re-layouts: the outputs read, newest first
        made_from = f.get(made_from, "made_from", (dict, type(None)), "source.made_from")
        if made_from is None:
            break
        f.get(made_from, "path", str, "source.made_from.path")
        f.hex(made_from, "manifest_file_xxh3_128", "source.made_from.manifest_file_xxh3_128")
        f.get(made_from, "layout", dict, "source.made_from.layout")


def _check_source_file(f: Fields, entry, field: str) -> None:
    if not isinstance(entry, dict):
        f.fail(field, "is not an object")
    f.get(entry, "name", str, f"{field}.name")
    f.int(entry, "size", f"{field}.size")
    if "tensors" in entry:  # absent: refused where needed (a reshard output as a source)
        for j, tensor in enumerate(f.get(entry, "tensors", list, f"{field}.tensors")):
            _check_source_tensor(f, tensor, f"{field}.tensors[{j}]")


def _check_source_tensor(f: Fields, tensor, field: str) -> None:
    """[name, dtype, shape], in the source file's order."""
    ok = isinstance(tensor, list) and len(tensor) == 3 and isinstance(tensor[0], str)
    ok = ok and isinstance(tensor[1], str) and tensor[1] in DTYPE_SIZES
    ok = ok and isinstance(tensor[2], list)
    if not ok or not all(type(n) is int and n >= 0 for n in tensor[2]):
        f.fail(field, f"is {_short(tensor)}, expected [name, dtype, shape]")


# HParams annotation -> JSON types its value may have (ints are not bools).
HPARAM_KINDS = {
    "int": int,
    "float": (int, float),
    "bool": bool,
    "str": str,
    "int | None": (int, type(None)),
    "float | None": (int, float, type(None)),
    "dict[str, Any] | None": (dict, type(None)),
    "QuantScheme | None": (dict, type(None)),
    "tuple[str, ...]": list,
    "tuple[int, ...]": list,
}


def _check_hparams(f: Fields, hparams: dict) -> HParams:
    for spec in fields(HParams):
        if spec.name in hparams or spec.default is MISSING and spec.default_factory is MISSING:
            f.get(hparams, spec.name, HPARAM_KINDS[spec.type], f"hparams.{spec.name}")
    for key in ("num_layers", "hidden_size", "num_heads", "head_dim", "vocab_size"):
        f.int(hparams, key, f"hparams.{key}", lo=1)
    try:
        return HParams.from_dict(hparams)  # hparams.quantization, when present, a scheme
    except (TypeError, ValueError, KeyError) as e:
        f.fail("hparams", f"does not describe a model ({type(e).__name__}: {_short(str(e))})")


def _check_layout(f: Fields, layout: dict, hp: HParams) -> dict:
    tp, pp, ep, dp = (f.int(layout, k, f"layout.{k}", lo=1) for k in ("tp", "pp", "ep", "dp"))
    world = f.int(layout, "world_size", "layout.world_size", lo=1)
    if world != tp * pp * dp:
        f.fail("layout.world_size", f"is {world}, but tp {tp} x pp {pp} x dp {dp} = {tp * pp * dp}")
    if tp % ep:
        f.fail("layout.ep", f"is {ep}, which does not divide tp {tp}")
    f.get(layout, "rank_order", str, "layout.rank_order")
    f.one_of(layout, "dtype", "layout.dtype", DTYPES)
    vocab = f.int(layout, "vocab_size", "layout.vocab_size", lo=1)
    f.int(layout, "vocab_padded", "layout.vocab_padded", lo=vocab)
    f.get(layout, "tie_word_embeddings", bool, "layout.tie_word_embeddings")
    if "format" in layout:  # an engine format; the native format records none
        fmt = f.get(layout, "format", dict, "layout.format")
        f.one_of(fmt, "name", "layout.format.name", FORMAT_NAMES)
        f.get(fmt, "vllm_version", str, "layout.format.vllm_version")
    if f.get(layout, "experts", (dict, type(None)), "layout.experts") is not None:
        _check_experts(f, layout["experts"], hp, ep)
    stages = f.get(layout, "stages", list, "layout.stages")
    if len(stages) != pp:
        f.fail("layout.stages", f"has {len(stages)} entries, but pp is {pp}")
    first = 0
    for i, stage in enumerate(stages):
        first = _check_stage(f, stage, i, pp, first)
    if first != hp.num_layers:
        f.fail("layout.stages", f"cover layers 0-{first - 1}, but the model has {hp.num_layers}")
    return {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "world_size": world}


def _check_stage(f: Fields, stage, i: int, pp: int, first: int) -> int:
    """Stage i holds layers [first, last] (last = first - 1: none); returns the next first."""
    field = f"layout.stages[{i}]"
    if not isinstance(stage, dict):
        f.fail(field, "is not an object")
    f.int(stage, "stage", f"{field}.stage", lo=i, hi=i + 1)
    layers = f.get(stage, "layers", list, f"{field}.layers")
    if (
        len(layers) != 2
        or layers[0] != first
        or type(layers[1]) is not int
        or layers[1] < first - 1
    ):
        f.fail(f"{field}.layers", f"is {_short(layers)}, expected [{first}, last >= {first - 1}]")
    for key, expected in (("embed", i == 0), ("head", i == pp - 1)):
        if f.get(stage, key, bool, f"{field}.{key}") != expected:
            f.fail(f"{field}.{key}", f"is {stage[key]}, expected {expected} for stage {i} of {pp}")
    return layers[1] + 1


def _check_experts(f: Fields, experts: dict, hp: HParams, ep: int) -> None:
    """The expert maps the runtime builds its routing from (docs/manifest.md)."""
    f.int(experts, "ep", "layout.experts.ep", lo=ep, hi=ep + 1)
    for layer, entry in f.get(experts, "layers", dict, "layout.experts.layers").items():
        field = f"layout.experts.layers['{layer}']"
        if not isinstance(entry, dict):
            f.fail(field, "is not an object")
        slots = f.int(entry, "slots_per_rank", f"{field}.slots_per_rank", lo=1)
        phy2log = _int_list(f, entry, "phy2log", field, slots * ep, -1, hp.num_experts)
        logcnt = _int_list(f, entry, "logcnt", field, hp.num_experts, 1, len(phy2log) + 1)
        log2phy = f.get(entry, "log2phy", list, f"{field}.log2phy")
        if len(log2phy) != hp.num_experts:
            f.fail(f"{field}.log2phy", f"has {len(log2phy)} rows, expected {hp.num_experts}")
        for e, row in enumerate(log2phy):
            _check_slots(f, row, logcnt[e], len(phy2log), f"{field}.log2phy[{e}]")


def _check_slots(f: Fields, row, count: int, slots: int, field: str) -> None:
    """A logical expert's physical slots: `count` valid ones first, then -1 padding."""
    ok = isinstance(row, list) and all(type(v) is int and -1 <= v < slots for v in row)
    if not ok or len(row) < count or any(v < 0 for v in row[:count]):
        f.fail(field, f"is {_short(row)}, expected {count} slots in [0, {slots}) first")


def _int_list(f: Fields, obj: dict, key: str, field: str, n: int, lo: int, hi: int) -> list[int]:
    value = f.get(obj, key, list, f"{field}.{key}")
    if len(value) != n or not all(type(v) is int and lo <= v < hi for v in value):
        f.fail(f"{field}.{key}", f"is {_short(value)}, expected {n} integers in [{lo}, {hi})")
    return value


def _check_files(f: Fields, files: dict, world: int) -> dict:
    if not files:
        f.fail("files", "is empty")
    for name, meta in files.items():
        field = f"files['{name}']"
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".safetensors"):
            f.fail(field, "is not a plain *.safetensors file name in the output folder")
        if not isinstance(meta, dict):
            f.fail(field, "is not an object")
        f.int(meta, "size", f"{field}.size", lo=8)
        f.int(meta, "rank", f"{field}.rank", hi=world)
        f.hex(meta, "header_xxh3_128", f"{field}.header_xxh3_128")
    return files


def _check_ranks(f: Fields, ranks: list, layout: dict, files: dict) -> None:
    if len(ranks) != layout["world_size"]:
        f.fail(
            "ranks", f"has {len(ranks)} entries, but layout.world_size is {layout['world_size']}"
        )
    listed: dict[str, int] = {}
    for i, entry in enumerate(ranks):
        if not isinstance(entry, dict):
            f.fail(f"ranks[{i}]", "is not an object")
        base = _check_coord(f, entry, i, layout)
        for j, name in enumerate(f.get(entry, "files", list, f"ranks[{i}].files")):
            if name not in files or files[name]["rank"] != base:
                f.fail(f"ranks[{i}].files[{j}]", f"{_short(name)} is not a file of rank {base}")
            if base == i:
                listed[name] = i
        if base == i:
            _check_tensors(f, entry, i)
    for name, meta in files.items():
        if name not in listed:
            f.fail(f"files['{name}']", f"is not listed by rank {meta['rank']}'s 'files'")


def _check_coord(f: Fields, entry: dict, i: int, layout: dict) -> int:
    """The rank's coordinates agree with the rank order; returns the rank whose files it uses."""
    tp, pp = layout["tp"], layout["pp"]
    field = f"ranks[{i}]"
    f.int(entry, "rank", f"{field}.rank", lo=i, hi=i + 1)
    want = dict(zip(("dp_index", "pp_stage", "tp_rank"), rank_coords(i, tp=tp, pp=pp)))
    want["ep_rank"] = want["tp_rank"] // (tp // layout["ep"])
    for key, value in want.items():
        if f.int(entry, key, f"{field}.{key}") != value:
            f.fail(f"{field}.{key}", f"is {entry[key]}, but rank {i} has {key} {value}")
    base = replica_base(i, tp=tp, pp=pp)
    expected = None if base == i else base
    if f.get(entry, "replica_of", (int, type(None)), f"{field}.replica_of") != expected:
        f.fail(f"{field}.replica_of", f"is {entry['replica_of']}, expected {expected}")
    return base


def _check_tensors(f: Fields, entry: dict, i: int) -> None:
    for name, meta in f.get(entry, "tensors", dict, f"ranks[{i}].tensors").items():
        field = f"ranks[{i}].tensors['{name}']"
        if not isinstance(meta, dict):
            f.fail(field, "is not an object")
        if f.get(meta, "file", str, f"{field}.file") not in entry["files"]:
            f.fail(f"{field}.file", f"{_short(meta['file'])} is not in ranks[{i}].files")
        f.one_of(meta, "dtype", f"{field}.dtype", DTYPE_SIZES)
        f.one_of(meta, "source_dtype", f"{field}.source_dtype", DTYPE_SIZES)
        shape = f.get(meta, "shape", list, f"{field}.shape")
        f.ints(meta, "shape", f"{field}.shape", len(shape))
        rows = shape[0] if shape else 0
        f.int(meta, "padding", f"{field}.padding", hi=rows + 1)
        if "transposed" in meta:  # pieces and parts are placed in the untransposed tensor
            if meta["transposed"] is not True or len(shape) < 2:
                f.fail(f"{field}.transposed", f"is {_short(meta['transposed'])} for shape {shape}")
            shape = list(swap_last(tuple(shape)))
        f.get(meta, "slice", (dict, type(None)), f"{field}.slice")
        f.hex(meta, "xxh3_128", f"{field}.xxh3_128")
        for j, piece in enumerate(f.get(meta, "pieces", list, f"{field}.pieces")):
            _check_piece(f, piece, shape, f"{field}.pieces[{j}]")
        if "fill" in meta and type(meta["fill"]) not in (int, float):
            f.fail(f"{field}.fill", f"is {_short(meta['fill'])}, not a number")
        for j, part in enumerate(meta.get("parts", [])):
            _check_part(f, part, shape, f"{field}.parts[{j}]")


def _check_part(f: Fields, part, shape: list[int], field: str) -> None:
    """A native tensor inside a format's stacked one: it must fit at its offset."""
    if not isinstance(part, dict):
        f.fail(field, "is not an object")
    f.get(part, "name", str, f"{field}.name")
    at = f.ints(part, "at", f"{field}.at", len(shape))
    own = f.get(part, "shape", list, f"{field}.shape")
    own = f.ints(part, "shape", f"{field}.shape", len(own))
    lift = len(shape) - len(own)
    if lift < 0 or any(a + n > m for a, n, m in zip(at, [1] * lift + own, shape, strict=True)):
        f.fail(field, f"shape {own} at {at} does not fit shape {shape}")


def _check_piece(f: Fields, piece, shape: list[int], field: str) -> None:
    if not isinstance(piece, dict):
        f.fail(field, "is not an object")
    source = f.get(piece, "source", str, f"{field}.source")
    if not source:
        f.fail(f"{field}.source", "is empty")
    dest = f.ints(piece, "dest", f"{field}.dest", len(shape))
    # A block stacked by a format at fixed leading indices has fewer dims than its tensor.
    ndim = len(f.get(piece, "start", list, f"{field}.start"))
    if not 0 < ndim <= len(shape) and ndim != len(shape):
        f.fail(f"{field}.start", f"has {ndim} dims, the tensor {len(shape)}")
    start, stop = (f.ints(piece, k, f"{field}.{k}", ndim) for k in ("start", "stop"))
    lift = len(shape) - ndim
    start, stop = [0] * lift + start, [1] * lift + stop
    for d, (a, b, o, n) in enumerate(zip(start, stop, dest, shape, strict=True)):
        if a > b or o + b - a > n:
            f.fail(field, f"block {start}:{stop} at {dest} does not fit shape {shape} (dim {d})")
