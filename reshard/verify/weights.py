"""The weights tier on convert's byte path: every piece of every output tensor is compared
byte for byte with the source bytes it came from, read the way the writer reads them (source
windows in file order, each piece's runs as groups), with no torch unless a piece was cast.

A reshard output as the source (a re-layout) is read through its rank-file tensors
(io/output_jobs.py), each checked against its manifest hash as it streams. A tensor stored
transposed, in the output or in the source output, is compared as boxes in its logical
coordinates instead (io/transposed.py), in bands of at most WINDOW bytes. Coverage, unknown
sources and the manifest's own checks stay in verify/levels.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import DTYPE_SIZES
from ..headers import Header, TensorInfo, read_header
from ..io.byte_runs import piece_groups, tensor_windows
from ..io.files import map_range
from ..io.manifest_value import Manifest
from ..io.output_jobs import check_digest
from ..io.transposed import bands, read_box
from ..io.writer import MAX_BUFFER, cast_bytes, fill_bytes
from ..layout.tensors import Piece

WINDOW = MAX_BUFFER  # bytes of source mapped at once; two buffers of this size besides


@dataclass(eq=False)  # by identity: one per (output tensor, piece), a set member once failed
class Check:
    """One piece of one output tensor: where its bytes lie and what to say if they differ."""

    path: Path
    fd: int
    offset: int  # absolute offset of the tensor's data in its file
    name: str
    rank: int
    dtype: str
    shape: tuple[int, ...]
    piece: Piece  # as the manifest records it (the original's coordinates)
    transposed: bool = False  # the file stores the tensor's last two dims swapped

    def failure(self) -> str:
        p = self.piece
        return (
            f"{self.path}: tensor '{self.name}' (rank {self.rank}) differs from source "
            f"'{p.source}' block {list(p.start)}:{list(p.stop)}"
        )


@dataclass
class Scratch:
    """Two reused buffers (fresh memory costs a page fault per 4 KiB) and the failures."""

    want: bytearray = field(default_factory=lambda: bytearray(WINDOW))
    got: bytearray = field(default_factory=lambda: bytearray(WINDOW))
    failed: set = field(default_factory=set)


def compare_weights(out_dir: Path, manifest: Manifest, src, bar) -> list[str]:
    """Open every output file the manifest names (replica 0), compare every piece with `src`,
    check vocab padding rows are zero. Returns the failures."""
    failures: list[str] = []
    fds: dict[str, int] = {}
    try:
        checks, padding, constants = _collect_checks(Path(out_dir), manifest, fds, failures)
        scratch = Scratch()
        turned = [c for c in checks if c.transposed or src.reader.stored_transposed(c.piece.source)]
        for job in _jobs(src, [c for c in checks if c not in turned]):
            _compare_job(*job, scratch, bar)
        for check in turned:
            _compare_boxes(src, check, scratch, bar)
        failures += [c.failure() for c in checks if c in scratch.failed]
        failures += [msg for msg in (_padding_failure(*p) for p in padding) if msg]
        failures += [msg for msg in (_fill_failure(*c) for c in constants) if msg]
    finally:
        for fd in fds.values():
            os.close(fd)
    return failures


def _collect_checks(out_dir: Path, manifest: Manifest, fds: dict, failures: list):
    """(checks in manifest order, padding spans, constants) for every rank of replica 0."""
    headers: dict[str, Header | None] = {}
    checks, padding, constants = [], [], []
    for entry in manifest.ranks:
        if entry.get("replica_of") is not None:
            continue
        for name, meta in (entry.get("tensors") or {}).items():
            header = _header(out_dir / meta["file"], headers, fds, failures)
            if header is None:
                continue
            info = header.tensors.get(name)
            problem = _header_problem(info, meta)
            if problem:
                failures.append(f"{header.path}: tensor '{name}' (rank {entry['rank']}) {problem}")
                continue
            fd = fds[meta["file"]]
            for p in meta["pieces"]:
                piece = Piece(p["source"], tuple(p["start"]), tuple(p["stop"]), tuple(p["dest"]))
                checks.append(
                    Check(header.path, fd, info.begin, name, entry["rank"], info.dtype,
                          info.shape, piece, bool(meta.get("transposed")))
                )  # fmt: skip
            if meta["padding"]:
                padding.append((header.path, fd, info, meta["padding"]))
            if meta.get("fill") is not None:  # a format's constant (vLLM's attention scales)
                constants.append((header.path, fd, info, meta["fill"]))
    return checks, padding, constants


def _header(path: Path, headers: dict, fds: dict, failures: list):
    """The file's header, read once (None, and a failure, when it cannot be read)."""
    if path.name not in headers:
        try:
            headers[path.name] = read_header(path)
            fds[path.name] = os.open(path, os.O_RDONLY)
        except Exception as e:  # a corrupt header is a verification failure, not bad input
            headers[path.name] = None
            failures.append(f"{path}: unreadable header ({_first_line(e)})")
    return headers[path.name]


def _header_problem(info, meta: dict) -> str | None:
    if info is None:
        return "is missing from the file"
    if info.dtype != meta["dtype"] or list(info.shape) != meta["shape"]:
        return (
            f"is {info.dtype} {list(info.shape)} in the file but {meta['dtype']} "
            f"{meta['shape']} in the manifest; one of them was altered"
        )
    return None


def _first_line(e: Exception) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:200]


def _jobs(src, checks: list[Check]) -> list[tuple]:
    """(source path, TensorInfo, ((check, piece of that tensor), ...), hash or None), in file
    order: the source's own tensors, or a reshard output's rank tensors."""
    consumers: dict[str, list] = {}
    for check in checks:
        consumers.setdefault(check.piece.source, []).append((check, check.piece))
    return src.reader.check_reads(src, consumers)


def _compare_job(path: Path, info, consumers, expect: str | None, scratch: Scratch, bar) -> None:
    """Map the source tensor window by window; compare every consumer's groups with the
    output file's bytes at their offsets. A piece stops at its first differing group."""
    import xxhash

    item = DTYPE_SIZES[info.dtype]
    widest = max([item] + [DTYPE_SIZES[c.dtype] for c, _ in consumers])
    hasher = xxhash.xxh3_128() if expect else None
    fd = os.open(path, os.O_RDONLY)
    try:
        for window in tensor_windows(info.shape, widest, WINDOW):
            offset = info.begin + window.start * item
            data = map_range(fd, offset, window.size * item, path)
            if hasher is not None:
                hasher.update(data)
            _compare_window(info, window, data, consumers, scratch, bar)
    finally:
        os.close(fd)
    if hasher is not None:
        check_digest(path, info.name, hasher.hexdigest(), expect)


def _compare_window(info, window, data: memoryview, consumers, scratch: Scratch, bar) -> None:
    cast: dict[str, memoryview] = {}
    for check, piece in consumers:
        if check in scratch.failed:
            continue
        src = data
        if check.dtype != info.dtype:  # the recipe asked for a cast: the one torch use
            src = cast.get(check.dtype) or cast.setdefault(
                check.dtype, cast_bytes(data, info, check.dtype)
            )
        groups = piece_groups(
            piece.start, piece.stop, piece.dest, info.shape, check.shape, window,
            DTYPE_SIZES[check.dtype],
        )  # fmt: skip
        for group in groups:
            if not _same_bytes(check, group, src, scratch):
                scratch.failed.add(check)
                break
            bar.update(group.nbytes)


def _compare_boxes(src, check: Check, scratch: Scratch, bar) -> None:
    """A piece of a tensor stored transposed (or read from one): the output's box and the
    source's, band by band in logical coordinates, compared as bytes after any cast."""
    import torch

    piece = check.piece
    nbytes = DTYPE_SIZES[check.dtype] * math.prod(check.shape)
    info = TensorInfo(check.name, check.dtype, check.shape, check.offset, check.offset + nbytes)
    lens = tuple(b - a for a, b in zip(piece.start, piece.stop, strict=True))
    for lo, hi in bands(check.transposed, check.dtype, piece.dest, lens, WINDOW):
        got = read_box(check.fd, check.path, info, lo, hi, check.transposed)
        want = src.reader.read_box(
            src, piece.source,
            tuple(s + a - d for s, a, d in zip(piece.start, lo, piece.dest, strict=True)),
            tuple(s + b - d for s, b, d in zip(piece.start, hi, piece.dest, strict=True)),
        )  # fmt: skip
        want = want.to(got.dtype)  # the recipe's cast, if any (as the writer casts)
        if not torch.equal(_raw(got), _raw(want)):
            scratch.failed.add(check)
            return
        bar.update(got.numel() * got.element_size())


def _raw(t):
    """A tensor's bytes as uint8 (bitwise: NaNs and -0.0 compare as stored)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bytes(check: Check, group, src: memoryview, scratch: Scratch) -> bool:
    """The group's source bytes (gathered when split) equal the output's. A bytearray on the
    left compares with memcmp; memoryview == memoryview goes element by element, ~20x slower,
    so the output's bytes are sliced out of the read buffer (one memcpy) first."""
    n = group.nbytes
    if len(group.segments) == 1:
        begin = group.segments[0][0]
        want = src[begin : begin + n]
    else:
        want, pos = memoryview(scratch.want)[:n], 0
        for begin, size in group.segments:
            want[pos : pos + size] = src[begin : begin + size]
            pos += size
    with memoryview(scratch.got) as got:
        if _read_into(check.fd, got[:n], check.offset + group.dest) < n:
            return False  # the file ends early: it differs
    return scratch.got[:n] == want


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from the file at `offset`; the bytes read (fewer only at the file's end)."""
    got = 0
    while got < len(view):
        step = os.preadv(fd, [view[got:]], offset + got)
        if step == 0:
            break
        got += step
    return got


def _padding_failure(path: Path, fd: int, info, rows: int) -> str | None:
    """Vocab padding rows (the last `rows` of dim 0) must be zero bytes."""
    row_bytes = info.nbytes // info.shape[0]
    n = rows * row_bytes
    data = bytearray(n)
    if _read_into(fd, memoryview(data), info.end - n) < n or data.count(0) != n:
        return f"{path}: tensor '{info.name}' has non-zero vocab padding rows"
    return None


def _fill_failure(path: Path, fd: int, info, fill: float) -> str | None:
    """A format's constant tensor holds its value in every element (as the writer wrote it:
    a float32 scale, or zeros of its dtype)."""
    data = bytearray(info.nbytes)
    if (fill != 0 and info.dtype != "F32") or _read_into(fd, memoryview(data), info.begin) < len(
        data
    ):
        return f"{path}: tensor '{info.name}' is not the constant {fill}"
    want = fill_bytes(info.dtype, fill, info.shape)
    return None if data == want else f"{path}: tensor '{info.name}' is not the constant {fill}"
