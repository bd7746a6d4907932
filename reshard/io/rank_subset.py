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
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import xxhash

from ..errors import InputError, OutputError
from ..layout.plan import Plan
from .manifest import MANIFEST
from .out_dir import RECORD, flock_path, plan_fingerprint, read_own_json, read_record
from .writer import Written, io_error, write_atomic

SUBSETS_LOCK = ".reshard.subsets.lock"
MARKER_FORMAT = "reshard-rank-marker"
_MARKER = re.compile(r"^reshard-rank-(\d{5})\.json$")
_SPEC_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_ranks(spec: str, world_size: int) -> tuple[int, ...]:
    """`0-3`, `4-7`, `0,2,5` -> sorted world ranks; exit 2 naming the flag and the world size."""
    ranks: set[int] = set()
    for part in spec.split(","):
        match = _SPEC_PART.match(part.strip())
        if not match:
            raise InputError(
                f"--ranks {spec!r}: {part.strip()!r} is not a rank or a range like 0-3 "
                f"(world size {world_size}). Write e.g. --ranks 0-3 or --ranks 0,2,5."
            )
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo or hi >= world_size:
            raise InputError(
                f"--ranks {spec!r}: {part.strip()!r} is outside the world: ranks are in "
                f"[0, {world_size}) (world size {world_size} = dp * pp * tp)."
            )
        ranks.update(range(lo, hi + 1))
    return tuple(sorted(ranks))


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
    """Markers of this plan whose files are still there with their recorded size and header
    hash (tensor data is not re-read: `verify --level hashes` does that)."""
    fingerprint = plan_fingerprint(plan)
    found = {}
    for rank in all_file_ranks(plan):
        doc = _read_marker(out_dir / marker_name(rank))
        if doc is None or doc.get("plan_xxh3_128") != fingerprint or doc.get("rank") != rank:
            continue
        if all(_file_matches(out_dir / n, e) for n, e in doc["files"].items()):
            found[rank] = doc
    return found


def _read_marker(path: Path) -> dict | None:
    try:
        doc = read_own_json(path)  # None when damaged: that rank is written again
    except FileNotFoundError:
        return None
    ok = isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT
    return doc if ok and isinstance(doc.get("files"), dict) else None


def _file_matches(path: Path, entry: dict) -> bool:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != entry.get("size"):
                return False
            head = f.read(8)
            head += f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
    except FileNotFoundError:
        return False
    except OSError as e:
        raise io_error(e, path) from None
    return xxhash.xxh3_128(head).hexdigest() == entry.get("header_xxh3_128")


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
