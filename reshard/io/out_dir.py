"""Who owns what in a folder reshard writes (convert's OUT, export's HF_DIR): an exclusive
lock held for the length of a run, and a record of the files a reshard run writes there.

One rule for every writer: a folder holding something finished (a manifest, a checkpoint
index) is the user's until --force; with --force, reshard replaces or deletes only files a
record names, or (an output without a record) files its sealed manifest proves by hash.
Everything else is the user's and stays untouched. It never writes into its source.

The record (`reshard-record.json`) is written before the first shard, so an interrupted run's
leftovers are still named by it. Later `--ranks` / `--resume` build on it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash

from ..errors import CheckpointError, InputError, OutputBusyError, OutputError, ReshardError
from ..layout.plan import Plan
from ..strict_json import load_json
from .files import fsync_dir, io_error, partial_path, write_atomic
from .manifest import MANIFEST, read_sealed_manifest
from .source import INDEX, Source

LOCK = ".reshard.lock"
RECORD = "reshard-record.json"
RECORD_FORMAT = "reshard-record"
RECORD_VERSION = 1
# A folder holding one of these holds something finished: the user's until --force.
FINISHED = {MANIFEST: "a reshard output", INDEX: "a checkpoint"}


@contextmanager
def lock_out_dir(out_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on OUT/.reshard.lock (created with OUT) until the block ends.
    The lock dies with the process, so a killed convert never leaves OUT locked. `wait`: block
    until it is free (the short steps of --ranks runs), else a held lock is exit 2."""
    busy = (
        f"{out_dir}: another reshard convert is writing into this folder (it holds "
        f"{out_dir / LOCK}). Wait for it to finish, or write elsewhere with -o."
    )
    with flock_path(out_dir, LOCK, busy=busy, wait=wait):
        yield


@contextmanager
def flock_path(
    out_dir: Path, name: str, *, busy: str, shared: bool = False, wait: bool = False
) -> Iterator[None]:
    """Hold a flock on OUT/name; a lock held elsewhere is OutputBusyError(busy) unless `wait`."""
    lock = out_dir / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted as the lock (dangling or not) must not make reshard
        # create or lock a file outside the folder.
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(
                f"{lock}: is a symbolic link (to {os.readlink(lock)!r}); reshard's lock file "
                "must be a plain file in the folder. Remove the link, or choose another -o."
            ) from None
        raise io_error(e, out_dir if e.filename != str(lock) else lock) from None
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        _take_lock(fd, lock, mode, busy)
        yield
    finally:
        os.close(fd)  # releases the lock


def _take_lock(fd: int, lock: Path, mode: int, busy: str) -> None:
    try:
        fcntl.flock(fd, mode)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise io_error(e, lock) from None
        raise OutputBusyError(busy) from None


def check_out_apart(out_dir: Path, source: Source) -> None:
    """Refuse an OUT that is the source folder or inside it, or that holds a source file: convert
    would write its shards among, or over, the files it reads. A source in a sub-folder of OUT
    is fine: convert only touches the files its record names, at OUT's top level."""
    out = out_dir.resolve()
    src = source.path.resolve()
    if out == src or src in out.parents:
        raise OutputError(
            f"{out_dir}: is the source folder {source.path} or inside it; convert would mix "
            f"its shards with the source's files. Choose an -o outside {source.path}."
        )
    for path in [h.path for h in source.headers] + source.side_files():
        if path.resolve().parent == out:
            raise OutputError(
                f"{out_dir}: holds source file {path} (it resolves to {path.resolve()}); "
                "convert would overwrite what it reads. Choose another -o."
            )


def plan_fingerprint(plan: Plan) -> str:
    """xxh3-128 of everything the plan writes: layout, files, tensors and their pieces."""
    lay = plan.layout
    body = {
        "layout": [lay.tp, lay.pp, lay.ep, lay.dp, lay.dtype, lay.vocab_padded]
        + ([lay.format, lay.format_version] if lay.format != "native" else []),
        "stages": [[s.first_layer, s.last_layer, s.embed, s.head] for s in lay.stages],
        "files": [[f.name, f.rank, [_tensor_key(t) for t in f.tensors]] for f in plan.files],
    }
    return xxhash.xxh3_128(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def _tensor_key(t) -> list:
    pieces = [[p.source, p.start, p.stop, p.dest] for p in t.pieces]
    key = [t.name, t.dtype, list(t.shape), t.padding, pieces]
    if t.parts or t.fill is not None:  # a format's stacked tensor or constant
        key.append([[[p.name, p.shape, p.at] for p in t.parts], t.fill])
    if t.transposed:
        key.append("transposed")
    return key


def read_own_json(path: Path) -> Any:
    """One of reshard's own small JSON files in OUT (record, rank marker), read as strictly as
    any input: its parsed body, or None when damaged. FileNotFoundError is the caller's; other
    OS errors are exit 3."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise io_error(e, path) from None
    try:
        return load_json(raw, path, what="reshard's own file", fix="")
    except CheckpointError:
        return None


def read_record(out_dir: Path) -> dict | None:
    """The record in OUT, checked; None when there is none."""
    path = out_dir / RECORD
    try:
        doc = read_own_json(path)
    except FileNotFoundError:
        return None
    if not _valid_record(doc):
        raise OutputError(
            f"{path}: not a valid {RECORD_FORMAT} {RECORD_VERSION} (field 'files' must list "
            "plain file names), so convert cannot tell which files in the folder are its own. "
            "Remove that folder's reshard files and the record by hand, or choose another -o."
        )
    return doc


def _valid_record(doc) -> bool:
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        return False
    files = doc.get("files")
    return (
        doc.get("format_version") == RECORD_VERSION
        and isinstance(files, list)
        and all(isinstance(n, str) and is_plain_name(n) for n in files)
    )


def is_plain_name(name: str) -> bool:
    """A file name directly in OUT: no folder part, not '.', '..' or hidden."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def owned_names(out_dir: Path) -> set[str]:
    """Files a reshard record in OUT names (each also owns its `.partial`). An output without
    a record: what its sealed manifest proves by hash (itself, its rank files, its side files);
    a manifest that is not reshard's, or whose seal fails, proves nothing."""
    record = read_record(out_dir)
    if record is not None:
        return {*record["files"], RECORD}
    return _proved_names(out_dir)


def _proved_names(out_dir: Path) -> set[str]:
    if not os.path.isfile(out_dir / MANIFEST):
        return set()
    try:
        manifest = read_sealed_manifest(out_dir, side_files=False)  # each proved below
    except ReshardError:
        return set()
    files = [(n, e) for n, e in manifest.files.items() if is_plain_name(n)]
    rank_files = {n for n, e in files if file_matches(out_dir / n, e)}
    sides = manifest.side_files or {}
    side = {n for n, e in sides.items() if is_plain_name(n) and _content_matches(out_dir / n, e)}
    return {MANIFEST, *rank_files, *side}


def file_matches(path: Path, entry: dict) -> bool:
    """The file has the size and header hash an entry ({size, header_xxh3_128}) records."""
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


def _content_matches(path: Path, entry) -> bool:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise io_error(e, path) from None
    return isinstance(entry, dict) and xxhash.xxh3_128(data).hexdigest() == entry.get("xxh3_128")


def check_unfinished(out_dir: Path, *, force: bool) -> None:
    """A folder holding a finished output or checkpoint is the user's until --force (which then
    replaces only what a record or a sealed manifest proves reshard wrote)."""
    for name, what in FINISHED.items():
        if os.path.lexists(out_dir / name) and not force:
            raise InputError(
                f"{out_dir}: already holds {what} ({name}). Pass --force to replace it, or "
                "choose another folder with -o."
            )


def build_record(plan: Plan, source: Source, names: list[str]) -> dict:
    """What a run owns in OUT and what it writes there: the plan's fingerprint and the source
    it reads: path, revision, each file's name, size and header hash (so a later --resume or
    --ranks run can tell a matching run from another)."""
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "plan_xxh3_128": plan_fingerprint(plan),
        "layout": _layout_key(plan),
        "source": {
            "path": str(source.path),
            "revision": source.revision,
            "files": _source_files(source),
        },
        "files": sorted(names),
    }


def _source_files(source: Source) -> list[list]:
    """[name, size, digest] of each source file, as its kind proves it (TensorSource)."""
    return source.reader.file_digests(source)


def _layout_key(plan: Plan) -> dict:
    lay = plan.layout
    return {"tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "dp": lay.dp, "dtype": lay.dtype}


def claim_folder(out_dir: Path, record: dict, *, force: bool) -> None:
    """Under the lock, for every writer (convert, export): refuse a finished folder unless forced
    (checked again: a run that finished while this one planned has written its manifest or
    index), then claim it."""
    check_unfinished(out_dir, force=force)
    claim_out_dir(out_dir, record)


def claim_out_dir(out_dir: Path, record: dict) -> None:
    """Under the lock: refuse if a file this run writes exists and no record names it; delete
    what the previous record names; write `record` (from build_record) before any shard."""
    owned = owned_names(out_dir)
    for name in record["files"]:
        for path in (out_dir / name, partial_path(out_dir / name)):
            if name not in owned and os.path.lexists(path):
                raise OutputError(
                    f"{path}: exists, and no reshard record in {out_dir} names it; convert "
                    "replaces only files it wrote. Move it away, or choose another -o."
                )
    remove_names(out_dir, owned - {RECORD})
    write_atomic(out_dir / RECORD, (json.dumps(record, indent=1) + "\n").encode())


def remove_names(out_dir: Path, names) -> None:
    """The manifest or index goes first: from then on the folder is incomplete by definition."""
    for name in sorted(names, key=lambda n: n not in FINISHED):
        for path in (out_dir / name, partial_path(out_dir / name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise io_error(e, path) from None
        if name in FINISHED:
            fsync_dir(out_dir)
