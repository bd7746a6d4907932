"""Who owns what in OUT: an exclusive lock held for the length of a convert, and a record of
the files a reshard run writes there. convert replaces or deletes only files a record names;
everything else in OUT is the user's and stays untouched. It never writes into its source.

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

from ..errors import OutputBusyError, OutputError
from ..layout.experts.moe import SGLANG_FILE, TRTLLM_FILE
from ..layout.plan import Plan
from .manifest import MANIFEST
from .source import SIDE_FILES, Source
from .writer import fsync_dir, io_error, partial_path, write_atomic

LOCK = ".reshard.lock"
RECORD = "reshard-record.json"
RECORD_FORMAT = "reshard-record"
RECORD_VERSION = 1


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
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
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
    return key


def read_own_json(path: Path) -> Any:
    """One of reshard's own small JSON files in OUT (record, rank marker): its parsed body,
    or None when damaged. FileNotFoundError is the caller's; other OS errors are exit 3."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise io_error(e, path) from None
    except (ValueError, RecursionError):
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
    """Files a reshard record in OUT names (each also owns its `.partial`). An output from a
    reshard without records: the manifest, the rank files it lists and the side files that
    reshard copies beside them."""
    record = read_record(out_dir)
    if record is not None:
        return {*record["files"], RECORD}
    return _legacy_names(out_dir)


def _legacy_names(out_dir: Path) -> set[str]:
    path = out_dir / MANIFEST
    if not path.is_file():
        return set()
    try:
        files = json.loads(path.read_bytes()).get("files")
    except (OSError, ValueError, RecursionError, AttributeError):
        return {path.name}
    names = (
        [n for n in files if isinstance(n, str) and is_plain_name(n)]
        if isinstance(files, dict)
        else []
    )
    return {path.name, *names, *SIDE_FILES, SGLANG_FILE, TRTLLM_FILE}


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
    """[name, size, digest]: the header hash of each file, or for a reshard output read as the
    source, the hash of its manifest file (whose hashes cover every byte of its rank files)."""
    if source.reader is not None:
        digest = source.reader.source_record()["made_from"]["manifest_file_xxh3_128"]
        return [[h.path.name, h.size, digest] for h in source.headers]
    return [[h.path.name, h.size, header_digest(h)] for h in source.headers]


def header_digest(header) -> str:
    """xxh3-128 of a source file's first 8 + N bytes (its safetensors header): with the size,
    what --resume checks of the source bytes (tensor data is not re-read)."""
    try:
        with open(header.path, "rb") as f:
            return xxhash.xxh3_128(f.read(header.data_start)).hexdigest()
    except OSError as e:
        raise io_error(e, header.path) from None


def _layout_key(plan: Plan) -> dict:
    lay = plan.layout
    return {"tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "dp": lay.dp, "dtype": lay.dtype}


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
    """The manifest goes first: from then on the folder is incomplete by definition."""
    for name in sorted(names, key=lambda n: n != MANIFEST):
        for path in (out_dir / name, partial_path(out_dir / name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise io_error(e, path) from None
        if name == MANIFEST:
            fsync_dir(out_dir)
