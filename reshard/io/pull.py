"""Re-layout and export from a reshard output: each output tensor is pulled, window by window
of its own bytes, from the rank-file tensors that hold its parts (io/output_jobs.py says which).

Pulling, not pushing: a row-parallel tensor's rows are split over the rank files, so pushing
each rank's part to its place would cost one write per row (8192 of them per tp 8 o_proj).
Pulled, the parts land in one window buffer with one `preadv` per rank tensor and window (its
bytes there are contiguous; the iovecs scatter them into the rows), and the window goes out in
one write. A window that one rank tensor holds whole goes file to file in the kernel. Every
rank tensor used is hashed whole against the manifest by a job of its own; the writer renames
nothing until every job has succeeded. torch only for a cast or a tensor stored transposed.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from ..dtypes import DTYPE_SIZES
from ..errors import OutputError
from ..headers import TensorInfo
from ..layout.tensors import Piece
from .byte_runs import Window, piece_groups, tensor_windows
from .files import io_call, map_range, pwrite_all
from .output_jobs import check_digest, rank_tensor_jobs
from .scatter import preadv_exact
from .target import Target, account
from .transposed import pull_transposed
from .writer import Buffers, _copy_run, cast_bytes

if TYPE_CHECKING:  # a type only: the reader builds its pulls here
    from .output_source import OutputReader


@dataclass(frozen=True)
class Part:
    """Rank tensor `info` (in `path`) holds `piece`: its [start:stop] is the target's at dest
    (`transposed`: the rank tensor is stored with its last two dims swapped)."""

    path: Path
    info: TensorInfo
    piece: Piece
    transposed: bool = False


@dataclass(frozen=True)
class PullJob:
    target: Target
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return self.target.tensor.nbytes

    def run(self, buffers: Buffers, stop: threading.Event) -> None:
        pull_tensor(self, buffers, stop)


@dataclass(frozen=True)
class HashJob:
    """A rank tensor read as a source matches its manifest hash: all of it, padding too."""

    path: Path
    info: TensorInfo
    digest: str

    @property
    def nbytes(self) -> int:
        return 0  # its bytes are counted once, by the pull that reads them

    def run(self, buffers: Buffers, stop: threading.Event) -> None:
        hash_tensor(self, buffers.nbytes, stop)


def pull_jobs(reader: OutputReader, consumers: dict[str, list[tuple[Target, Piece]]]) -> list:
    """A pull per target (in output order), then a hash per rank tensor used (file order)."""
    parts: dict[int, list[Part]] = {}
    hashes = []
    for path, info, pairs, digest in rank_tensor_jobs(reader, consumers):
        transposed = (path.name, info.name) in reader.transposed
        for target, piece in pairs:
            parts.setdefault(id(target), []).append(Part(path, info, piece, transposed))
        hashes.append(HashJob(path, info, digest))
    targets = {id(t): t for pairs in consumers.values() for t, _ in pairs if id(t) in parts}
    order = sorted(targets.values(), key=lambda t: (t.file.name, t.offset))
    return [PullJob(t, tuple(parts[id(t)])) for t in order] + hashes


def pull_tensor(job: PullJob, buffers: Buffers, stop: threading.Event) -> None:
    target = job.target
    tensor = target.tensor
    src_dtype = job.parts[0].info.dtype
    item = DTYPE_SIZES[src_dtype]
    widest = max(item, DTYPE_SIZES[tensor.dtype])
    rows = tensor.shape[0] if tensor.shape else 1
    filled = (rows - tensor.padding) * (tensor.nbytes // max(rows, 1) // DTYPE_SIZES[tensor.dtype])
    turned = tensor.transposed or any(p.transposed for p in job.parts)
    shape, job = (tensor.shape, job) if turned else target_view(job)
    buf = buffers.take()
    fds = {}
    try:
        for part in job.parts:
            if part.path not in fds:
                fds[part.path] = io_call(os.open, part.path, os.O_RDONLY, path=part.path)
        if turned:  # moved in bands with torch (io/transposed.py)
            pull_transposed(job, buffers.nbytes, fds, stop)
            return
        for window in tensor_windows(shape, widest, buffers.nbytes):
            if stop.is_set():
                return
            size = min(window.size, filled - window.start)  # elements before the padding
            if size > 0:
                _pull_window(job, shape, window, size, item, buf, fds)
    finally:
        for fd in fds.values():
            os.close(fd)
        buffers.give(buf)


def target_view(job: PullJob) -> tuple[tuple[int, ...], PullJob]:
    """The target's shape as its parts see it. A format stacking experts places a part at
    fixed leading indices (a dest longer than the part's start): the target is then seen with
    those leading dims merged (same bytes, row-major), and each dest folded to match."""
    shape = job.target.tensor.shape
    ndim = min(len(p.piece.start) for p in job.parts)
    lift = len(shape) - ndim
    if lift <= 0 or not ndim:
        return shape, job
    merged = (math.prod(shape[: lift + 1]), *shape[lift + 1 :])
    parts = []
    for part in job.parts:
        row = 0
        for d, n in zip(part.piece.dest[: lift + 1], shape[: lift + 1], strict=True):
            row = row * n + d
        dest = (row, *part.piece.dest[lift + 1 :])
        parts.append(replace(part, piece=replace(part.piece, dest=dest)))
    return merged, replace(job, parts=tuple(parts))


def _pull_window(job: PullJob, shape, window: Window, size: int, item: int, buf, fds) -> None:
    """Fill the window's first `size` elements from the parts, write them, hash them."""
    target, n = job.target, size * item
    out_item = DTYPE_SIZES[target.tensor.dtype]
    rel = window.start * out_item  # where the window starts in the output tensor
    for part in job.parts:
        piece = part.piece
        stop = tuple(d + b - a for d, a, b in zip(piece.dest, piece.start, piece.stop, strict=True))
        # the target is the "source" here: groups are runs contiguous in the rank tensor
        groups = piece_groups(piece.dest, stop, piece.start, shape, part.info.shape, window, item)
        for group in groups:
            at = part.info.begin + group.dest
            if group.segments == ((0, n),) and out_item == item:
                fd = fds[part.path]  # the whole window from one place: a kernel copy
                data = map_range(fd, at, n, part.path)  # for the hash (and a fallback)
                _copy_run(target, rel, (fd, at), data)
                account(target, rel, data)
                return
            views = [buf[b : b + k] for b, k in group.segments]
            _read_parts(fds[part.path], views, at, part.path)
    data = buf[:n]
    if target.tensor.dtype != job.parts[0].info.dtype:  # the recipe asked for a cast
        data = cast_bytes(data, job.parts[0].info, target.tensor.dtype)
    pwrite_all(target.fd, data, target.offset + rel, target.file)
    account(target, rel, data)


def _read_parts(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """The rank tensor's bytes from `offset` on, scattered into `views` (io/scatter.py)."""
    if io_call(preadv_exact, fd, views, offset, path=path) < sum(len(v) for v in views):
        raise OutputError(
            f"{path}: ended before the bytes its header promised while reading it. The file "
            "shrank while being read; re-copy it."
        )


def hash_tensor(job: HashJob, window_bytes: int, stop: threading.Event) -> None:
    """xxh3-128 of the rank tensor's bytes, mapped window by window, against the manifest."""
    hasher = xxhash.xxh3_128()
    fd = io_call(os.open, job.path, os.O_RDONLY, path=job.path)
    try:
        for offset in range(job.info.begin, job.info.end, window_bytes):
            if stop.is_set():
                return
            n = min(window_bytes, job.info.end - offset)
            hasher.update(map_range(fd, offset, n, job.path))
    finally:
        os.close(fd)
    check_digest(job.path, job.info.name, hasher.hexdigest(), job.digest)
