"""The schema of `OUT/manifest.json` (docs/manifest.md): built from a Plan after the writer
has produced every file, written last and atomically, and read back with validation.

A folder without a manifest is incomplete by definition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

from .. import __version__
from ..errors import OutputError
from ..layout.experts.moe import placements_entry
from ..layout.formats import format_named
from ..layout.plan import Plan
from ..layout.tensors import OutTensor
from ..models.hparams import parse_hparams
from ..quant import manifest_entry
from ..ranks import RANK_ORDER
from .files import io_error, write_atomic
from .manifest_check import check_manifest
from .manifest_value import Manifest
from .seal import SEAL_KEY, UNSEALED, check_seal, seal_bytes
from .source import Source
from .writer import Written

FORMAT = "reshard-manifest"
FORMAT_VERSION = 2  # 2: sealed by manifest_xxh3_128, checked against a schema on read
MANIFEST = "manifest.json"


def build_manifest(
    plan: Plan,
    source: Source,
    written: Written,
    file_sizes: dict[str, int],
    *,
    side_files: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """`side_files`: hash_side_files of the config, tokenizer and expert-map files written
    beside the rank files, so the hashes tier and --force's ownership cover them too."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "reshard_version": __version__,
        "source": source_record(source),
        "config": source.config,
        "hparams": plan.hparams.to_dict(),
        "layout": _layout_entry(plan),
        "dropped": list(plan.dropped),
        "quantization": manifest_entry(
            plan.hparams, {t.name for f in plan.files for t in f.tensors}
        ),
        "side_files": side_files or {},
        "files": {
            f.name: {
                "size": file_sizes[f.name],
                "rank": f.rank,
                "header_xxh3_128": written.headers[f.name],
            }
            for f in plan.files
        },
        "ranks": _rank_entries(plan, source, written.tensors),
    }


def source_record(source: Source) -> dict[str, Any]:
    """Where the bytes came from. Each file lists its tensors in file order, so an output can
    stand in for its source (re-layout, export). A reshard output as the source carries the
    original's record over and adds `made_from`."""
    return source.reader.source_record(source)


def _layout_entry(plan: Plan) -> dict[str, Any]:
    layout = plan.layout
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "ep": layout.ep,
        "dp": layout.dp,
        "world_size": layout.world_size,
        "rank_order": RANK_ORDER,
        "dtype": layout.dtype,
        "vocab_size": layout.vocab_size,
        "vocab_padded": layout.vocab_padded,
        "tie_word_embeddings": plan.hparams.tie_word_embeddings,
        "stages": [
            {
                "stage": s.stage,
                "layers": [s.first_layer, s.last_layer],
                "embed": s.embed,
                "head": s.head,
            }
            for s in layout.stages
        ],  # fmt: skip
        "experts": placements_entry(plan),
        "keep_mtp": layout.keep_mtp,  # MTP layer on the last stage's tp_rank 0; runtime skips it
        **_format_entry(layout),
    }


def _format_entry(layout) -> dict[str, Any]:
    """layout.format for an engine format ({"name": "vllm", "vllm_version": "0.32"}); the
    native format records nothing, so its manifests keep their bytes."""
    entry = format_named(layout.format).manifest_entry(layout)
    return {"format": entry} if entry else {}


def _rank_entries(plan: Plan, source: Source, hashes) -> list[dict[str, Any]]:
    by_rank: dict[int, list] = {}
    for f in plan.files:
        by_rank.setdefault(f.rank, []).extend((f.name, t) for t in f.tensors)
    ranks = []
    for r in plan.ranks:
        c = r.coord
        entry: dict[str, Any] = {
            "rank": c.rank,
            "dp_index": c.dp_index,
            "pp_stage": c.pp_stage,
            "tp_rank": c.tp_rank,
            "ep_rank": c.ep_rank,
            "files": list(r.files),
            "replica_of": r.replica_of,
        }
        if r.replica_of is None:
            entry["tensors"] = {
                t.name: _tensor_entry(fname, t, hashes[fname][t.name], source)
                for fname, t in by_rank.get(c.rank, [])
            }
        ranks.append(entry)
    return ranks


def _tensor_entry(fname: str, t: OutTensor, digest: str, source: Source) -> dict[str, Any]:
    return {
        "file": fname,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "source_dtype": t.source_dtype,
        "pieces": [
            {"source": p.source, "start": list(p.start), "stop": list(p.stop), "dest": list(p.dest)}
            for p in t.pieces
        ],
        "slice": _slice_summary(t, source),
        "padding": t.padding,
        "xxh3_128": digest,
        **_format_fields(t),
    }


def _format_fields(t: OutTensor) -> dict[str, Any]:
    """What an output format adds to a tensor entry (none for the native format): the native
    tensors a stacked tensor holds, the value of a constant, and whether the file stores it
    with its last two dims swapped (pieces and parts then place bytes in the tensor as it
    reads untransposed)."""
    fields: dict[str, Any] = {}
    if t.parts:
        fields["parts"] = [
            {"name": p.name, "shape": list(p.shape), "at": list(p.at)} for p in t.parts
        ]
    if t.fill is not None:
        fields["fill"] = t.fill
    if t.transposed:
        fields["transposed"] = True
    return fields


def _slice_summary(t: OutTensor, source: Source) -> dict[str, int] | None:
    """{"dim", "start", "stop"} when the tensor is one source tensor cut along at most one dim."""
    if len(t.pieces) != 1:
        return None
    p = t.pieces[0]
    full = source.info(p.source).shape
    cut = [d for d, n in enumerate(full) if p.stop[d] - p.start[d] != n]
    if len(cut) > 1:
        return None
    d = cut[0] if cut else 0
    return {"dim": d, "start": p.start[d], "stop": p.stop[d]} if full else None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest sealed: its last key is the xxh3-128 of the file's own bytes (with
    the digest zeroed), so every byte of it is covered."""
    path = Path(out_dir) / MANIFEST
    text = (json.dumps({**manifest, SEAL_KEY: UNSEALED}, indent=1) + "\n").encode()
    write_atomic(path, seal_bytes(text))
    return path


def hash_side_files(out_dir: Path, names) -> dict[str, dict]:
    """{name: {size, xxh3_128}} of files written into OUT beside the rank files."""
    entries = {}
    for name in sorted(names):
        path = Path(out_dir) / name
        data = _read_bytes(path, out_dir)
        entries[name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    return entries


def side_file_failures(out_dir: Path, side_files: dict[str, Any] | None) -> list[str]:
    """The side files a manifest lists, each present with its recorded hash; else why not."""
    failures = []
    for name, entry in (side_files or {}).items():
        path = Path(out_dir) / name
        try:
            digest = xxhash.xxh3_128(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            failures.append(f"{path}: missing (a side file the manifest lists); re-copy it")
            continue
        except OSError as e:
            raise io_error(e, path) from None
        if digest != entry["xxh3_128"]:
            failures.append(
                f"{path}: hash {digest} != manifest side_files['{name}'] {entry['xxh3_128']}: "
                "the file was edited after convert; restore it or re-run reshard convert"
            )
    return failures


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of OUT, checked against the schema: any damage is an OutputError (exit 2)
    naming the field. The seal is checked by the hashes tier (`manifest_seal_failure`)."""
    return Manifest.from_doc(_read_checked(out_dir)[0])


def read_sealed_manifest(out_dir: Path, *, side_files: bool = True) -> Manifest:
    """The manifest of OUT as a map to read its rank files by (re-layout, export, --force's
    ownership): the schema, then the seal on the same bytes, then its config against its
    hparams, then (`side_files`) the side files it lists, which a re-layout or an export
    copies on. Any failure is an OutputError (exit 2): nothing is read or written through it.
    The rank files' own hashes are the reader's to check as it streams them."""
    doc, raw = _read_checked(out_dir)
    path = Path(out_dir) / MANIFEST
    why = check_seal(path, raw, doc)
    if why:
        raise OutputError(
            f"{why}. reshard reads an output only through an intact manifest (check it with "
            "reshard verify --level hashes)."
        )
    _check_config(path, doc)
    failures = side_file_failures(out_dir, doc.get("side_files")) if side_files else []
    if failures:
        raise OutputError(
            f"{failures[0]} (an output read as a source passes its side files on unchanged)."
        )
    return Manifest.from_doc(doc)


def _check_config(path: Path, doc: dict[str, Any]) -> None:
    """The manifest's `config` is what its `hparams` were parsed from (a resealed edit of the
    config would otherwise travel into a fresh re-layout)."""
    try:
        parsed = json.loads(json.dumps(parse_hparams(doc["config"], where=str(path)).to_dict()))
    except OutputError:
        raise
    except Exception as e:  # the config's own errors name its key
        raise OutputError(
            f"{path}: field 'config' does not parse ({_first_line(e)}); the manifest was "
            "edited. Restore it, or re-run reshard convert."
        ) from None
    changed = sorted(
        k for k in parsed.keys() | doc["hparams"].keys() if parsed.get(k) != doc["hparams"].get(k)
    )
    if changed:
        raise OutputError(
            f"{path}: field 'config' gives {changed[0]} = {parsed.get(changed[0])!r}, but "
            f"'hparams.{changed[0]}' is {doc['hparams'].get(changed[0])!r}: the manifest was "
            "edited. Restore it, or re-run reshard convert."
        )


def _read_checked(out_dir: Path) -> tuple[dict[str, Any], bytes]:
    path = Path(out_dir) / MANIFEST
    if not Path(out_dir).is_dir():
        raise OutputError(f"{out_dir}: no such folder. Give the -o folder of reshard convert.")
    raw = _read_bytes(path, out_dir)
    doc = parse_manifest(path, raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise OutputError(
            f"{path}: field 'format' is {got!r}, not {FORMAT!r}: not a reshard manifest. "
            "Give the -o folder of reshard convert."
        )
    if doc.get("format_version") != FORMAT_VERSION:
        raise OutputError(
            f"{path}: field 'format_version' is {doc.get('format_version')!r}; this reshard "
            f"({__version__}) reads version {FORMAT_VERSION} only. Convert again with it."
        )
    check_manifest(path, doc)
    return doc, raw


def _read_bytes(path: Path, out_dir: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise OutputError(
            f"{path}: missing, so {out_dir} is not a complete reshard output (the manifest is "
            "written last; an interrupted convert leaves none). Re-run reshard convert."
        ) from None
    except OSError as e:
        raise io_error(e, path) from None


def parse_manifest(path: Path, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OutputError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); the manifest "
            "is damaged. Restore it, or re-run reshard convert."
        ) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, ints past 4300 digits
        raise OutputError(
            f"{path}: not valid JSON ({_first_line(e)}). Restore it, or re-run reshard convert."
        ) from None


def _first_line(e: Exception) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:120]


def manifest_seal_failure(out_dir: Path, manifest: Manifest) -> str | None:
    """None when manifest.json is byte for byte what convert sealed, else why not."""
    path = Path(out_dir) / MANIFEST
    return check_seal(path, _read_bytes(path, out_dir), manifest.doc)
