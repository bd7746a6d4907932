"""`convert --ranks` / `--resume` / torchrun worlds: several runs each write some ranks' files
into one OUT, and the run that completes the set writes the manifest.

Each run holds OUT's lock only for short steps (claim, finish), so independent subset runs
overlap; while writing it holds a shared lock on `.reshard.subsets.lock` (a full convert takes
it exclusively, so the two kinds never mix) and an exclusive lock per rank it writes. When a
rank's files are fsynced and renamed, the run writes that rank's marker,
`reshard-rank-NNNNN.json`: the plan fingerprint and the hashes the manifest needs. Under the
lock, a run that finds a marker for every rank builds the manifest from the markers, writes it
and removes the markers, so exactly one manifest is written, the same as one full run's.

DP replica ranks (dp_index > 0) read replica 0's files: `--ranks` selects world ranks, and a
replica rank selects the files of its replica-0 rank.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import xxhash

from ..errors import InputError, OutputError
from ..headers import read_header
from ..layout.plan import Plan
from .files import io_error, write_atomic
from .manifest import MANIFEST
from .manifest_check import HEX
from .out_dir import (
    RECORD,
    file_matches,
    flock_path,
    plan_fingerprint,
    read_own_json,
    read_record,
)
from .writer import Written

SUBSETS_LOCK = ".reshard.subsets.lock"
MARKER_FORMAT = "reshard-rank-marker"
_MARKER = re.compile(r"^reshard-rank-(\d{5})\.json$")
_SPEC_PART = re.compile(r"^(\d{1,9})(?:-(\d{1,9}))?$")  # 9 digits: int() stays cheap


def parse_ranks(spec: str, world_size: int) -> tuple[int, ...]:
    """`0-3`, `4-7`, `0,2,5` -> sorted world ranks; exit 2 naming the flag and the world size."""
    ranks: set[int] = set()
    for part in spec.split(","):
        match = _SPEC_PART.match(part.strip())
        if not match:
            raise InputError(
                f"--ranks {_short(spec)}: {_short(part.strip())} is not a rank or a range like 0-3 "
                f"(world size {world_size}). Write e.g. --ranks 0-3 or --ranks 0,2,5."
            )
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo or hi >= world_size:
            raise InputError(
                f"--ranks {_short(spec)}: {_short(part.strip())} is outside the world: ranks "
                f"are in [0, {world_size}) (world size {world_size} = dp * pp * tp)."
            )
        ranks.update(range(lo, hi + 1))
    return tuple(sorted(ranks))


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def file_ranks(plan: Plan, world_ranks) -> tuple[int, ...]:
    """The ranks whose files serve `world_ranks` (a DP replica rank -> its replica-0 rank)."""
    owners = {_owner(plan, r) for r in world_ranks}
    return tuple(sorted(owners))


def _owner(plan: Plan, rank: int) -> int:
    replica = plan.ranks[rank].replica_of
    return rank if replica is None else replica


def all_file_ranks(plan: Plan) -> tuple[int, ...]:
    return tuple(sorted({f.rank for f in plan.files}))


def subset_plan(plan: Plan, ranks) -> Plan:
    """The plan's work for `ranks` (file ranks) only: the writer gets these files and reads
    only the source bytes they need."""
    keep = set(ranks)
    return dataclasses.replace(plan, files=tuple(f for f in plan.files if f.rank in keep))


def marker_name(rank: int) -> str:
    return f"reshard-rank-{rank:05d}.json"


def marker_names(plan: Plan) -> list[str]:
    return [marker_name(r) for r in all_file_ranks(plan)]


@contextmanager
def hold_subset_locks(out_dir: Path, ranks, *, shared: bool = True) -> Iterator[None]:
    """The shared subsets lock, then one exclusive lock per rank written (busy -> exit 2)."""
    with ExitStack() as stack:
        stack.enter_context(
            flock_path(out_dir, SUBSETS_LOCK, shared=shared, busy=_busy_full(out_dir))
        )
        for rank in ranks:
            lock = f".reshard.rank-{rank:05d}.lock"
            stack.enter_context(flock_path(out_dir, lock, busy=_busy_rank(out_dir, rank)))
        yield


def _busy_full(out_dir: Path) -> str:
    return (
        f"{out_dir}: a full reshard convert (without --ranks) is writing into this folder. "
        "Wait for it to finish, or write elsewhere with -o."
    )


def _busy_rank(out_dir: Path, rank: int) -> str:
    return (
        f"{out_dir}: another reshard convert is writing rank {rank} into this folder. Give "
        "this run other ranks with --ranks, or wait for that one."
    )


def write_marker(out_dir: Path, plan: Plan, rank: int, written: Written, sizes: dict) -> None:
    names = [f.name for f in plan.files if f.rank == rank]
    doc = {
        "format": MARKER_FORMAT,
        "plan_xxh3_128": plan_fingerprint(plan),
        "rank": rank,
        "files": {
            n: {
                "size": sizes[n],
                "header_xxh3_128": written.headers[n],
                "tensors": written.tensors[n],
            }
            for n in names
        },
    }
    write_atomic(out_dir / marker_name(rank), (json.dumps(doc, indent=1) + "\n").encode())


def read_markers(out_dir: Path, plan: Plan) -> dict[int, dict]:
    """Markers of this plan, schema-checked against it (its files, their tensors), whose files
    are still there with their recorded size and header hash. A damaged marker is no marker:
    that rank is written again. Tensor hashes are checked by `check_marker_claims`."""
    fingerprint = plan_fingerprint(plan)
    found = {}
    for rank in all_file_ranks(plan):
        doc = _read_marker(out_dir / marker_name(rank))
        if not _valid_marker(doc, plan, rank, fingerprint):
            continue
        if all(file_matches(out_dir / n, e) for n, e in doc["files"].items()):
            found[rank] = doc
    return found


def _read_marker(path: Path):
    try:
        return read_own_json(path)  # None when damaged: that rank is written again
    except FileNotFoundError:
        return None


def _valid_marker(doc, plan: Plan, rank: int, fingerprint: str) -> bool:
    """The marker's shape, and exactly this rank's files and their tensors by name."""
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        return False
    if doc.get("plan_xxh3_128") != fingerprint or type(doc.get("rank")) is not int:
        return False
    files = doc.get("files")
    want = {f.name: {t.name for t in f.tensors} for f in plan.files if f.rank == rank}
    if doc["rank"] != rank or not isinstance(files, dict) or set(files) != set(want):
        return False
    return all(_valid_file_entry(files[n], names) for n, names in want.items())


def _valid_file_entry(entry, names: set[str]) -> bool:
    if not isinstance(entry, dict) or type(entry.get("size")) is not int:
        return False
    tensors = entry.get("tensors")
    if not _is_hex(entry.get("header_xxh3_128")) or not isinstance(tensors, dict):
        return False
    return set(tensors) == names and all(_is_hex(v) for v in tensors.values())


def _is_hex(value) -> bool:
    return isinstance(value, str) and len(value) == 32 and set(value) <= HEX


def check_marker_claims(out_dir: Path, markers: dict[int, dict], own: Written) -> None:
    """Before the manifest is written: every tensor hash a marker claims is the hash of the
    bytes in its file (files this process wrote, with the same hashes, are not re-read)."""
    for rank, doc in sorted(markers.items()):
        for name, entry in sorted(doc["files"].items()):
            if own.tensors.get(name) == entry["tensors"]:
                continue
            _check_file_claims(out_dir, out_dir / marker_name(rank), name, entry)


def _check_file_claims(out_dir: Path, marker: Path, name: str, entry: dict) -> None:
    path = out_dir / name
    header = read_header(path)
    try:
        with open(path, "rb") as f:
            for tensor, want in sorted(entry["tensors"].items()):
                info = header.tensors.get(tensor)
                got = _hash_range(f, info.begin, info.nbytes) if info else "absent"
                if got != want:
                    raise OutputError(
                        f"{marker}: claims tensor '{tensor}' of {path} hashes to {want}, the "
                        f"file gives {got}; no manifest was written. Delete {marker.name} and "
                        "run reshard convert --resume into this folder to write that rank again."
                    )
    except OSError as e:
        raise io_error(e, path) from None


def _hash_range(f, begin: int, nbytes: int) -> str:
    f.seek(begin)
    h = xxhash.xxh3_128()
    left = nbytes
    while left:
        block = f.read(min(left, 64 << 20))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def written_from_markers(markers: dict[int, dict]) -> tuple[Written, dict[str, int]]:
    tensors, headers, sizes = {}, {}, {}
    for doc in markers.values():
        for name, entry in doc["files"].items():
            tensors[name] = entry["tensors"]
            headers[name] = entry["header_xxh3_128"]
            sizes[name] = entry["size"]
    return Written(tensors, headers), sizes


def missing_ranks(plan: Plan, markers: dict[int, dict]) -> list[int]:
    return [r for r in all_file_ranks(plan) if r not in markers]


def check_record_matches(out_dir: Path, record: dict, mine: dict) -> None:
    """A subset or resumed run joins OUT's runs only with the same layout, source and plan."""
    change = _what_changed(record, mine)
    if change:
        raise InputError(
            f"{out_dir / RECORD}: {change}. The ranks already in {out_dir} were made from "
            "another source or layout; use the same model and flags, or start over with "
            "convert --force (no --ranks/--resume)."
        )


def _what_changed(record: dict, mine: dict) -> str | None:
    if record.get("layout") != mine["layout"]:
        was, now = _describe(record.get("layout")), _describe(mine["layout"])
        return f"layout was {was}, this run asks {now}"
    old, new = record.get("source") or {}, mine["source"]
    for key in ("path", "revision"):
        if old.get(key) != new[key]:
            return f"source {key} was {old.get(key)!r}, now {new[key]!r}"
    before = {f[0]: f[1:] for f in old.get("files") or [] if isinstance(f, list) and f}
    for name, size, digest in new["files"]:
        if name not in before:
            return f"source file {name} is new"
        if before.pop(name) != [size, digest]:
            return f"source file {name} changed (size or header hash: now {size} bytes)"
    if before:
        return f"source file {sorted(before)[0]} is gone"
    if record.get("plan_xxh3_128") != mine["plan_xxh3_128"]:
        return (
            f"plan_xxh3_128 was {record.get('plan_xxh3_128')}, this run's is "
            f"{mine['plan_xxh3_128']} (same layout and source: another --max-file-size, stage "
            "costs or placement?)"
        )
    return None


def _describe(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def check_manifest_absent(out_dir: Path) -> None:
    if (out_dir / MANIFEST).exists():
        raise InputError(
            f"{out_dir}: already holds a complete reshard output ({MANIFEST}); every rank is "
            "written. Verify it, or replace it with a full convert --force."
        )


def check_partial_set(out_dir: Path) -> None:
    """No manifest, a record, and markers for some ranks: OutputError naming the ranks whose
    files the record names and no marker vouches for (yet)."""
    if (out_dir / MANIFEST).exists() or not out_dir.is_dir():
        return
    record = read_record(out_dir)
    if record is None:
        return
    expected = {int(m[1]) for n in record["files"] if (m := _MARKER.match(n))}
    done = {r for r in expected if (out_dir / marker_name(r)).is_file()}
    if done:
        raise missing_ranks_error(out_dir, sorted(expected - done))


def missing_ranks_error(out_dir: Path, missing: list[int]) -> OutputError:
    shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
    return OutputError(
        f"{out_dir}: no {MANIFEST} yet: ranks {shown} are not written ({len(missing)} "
        "missing). Run reshard convert --ranks for them (or --resume) into this folder."
    )
