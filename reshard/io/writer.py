"""Execute a Plan: read every needed source byte once, in file order, in bounded windows, and
write each piece of it straight to its final offset in every output file that needs it.

Output headers are known from the plan, so each file is created at its full size up front and
written with pwrite. Source tensors are independent units of work: `workers` threads copy
several at once (page faults, pwrite and xxh3 release the GIL), each with one mapped window
and one gather buffer, so peak memory is bounded by BUFFER_BUDGET whatever the model size.
The bytes written do not depend on the number of workers. Files are `*.partial` until
fsynced and renamed. torch is imported only to cast (--dtype). The writer makes no decisions.
Each kind of source brings its own jobs (`source.reader.byte_jobs`; a reshard output's, io/pull.py:
each output tensor pulled from the rank-file tensors holding it), run by the same pool.
"""

from __future__ import annotations

import errno
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from ..dtypes import DTYPE_SIZES, torch_dtypes
from ..errors import CheckpointError
from ..headers import TensorInfo, encode_header, pread_exact
from ..layout.plan import Plan
from ..layout.tensors import OutTensor, Piece
from .byte_runs import Group, Window, piece_groups, tensor_windows
from .files import fsync_dir, io_call, io_error, map_range, partial_path, pwrite_all
from .scatter import preadv_exact, scatter_views
from .target import Target, account
from .transposed import write_transposed
from .writeback import Writeback

if TYPE_CHECKING:  # a type only: each kind of source (io/source.py) builds its jobs here
    from .source import Source

BUFFER_BUDGET = 256 << 20  # every worker's mapped window + gather buffer together
MAX_BUFFER = 16 << 20  # larger windows make no fewer syscalls that matter, only more memory


def default_workers() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def buffer_bytes(workers: int) -> int:
    return max(1 << 20, min(MAX_BUFFER, BUFFER_BUDGET // (2 * workers)))


@dataclass(frozen=True)
class Job:
    """One source tensor and every (output tensor, piece) that takes bytes from it."""

    path: Path
    info: TensorInfo
    consumers: tuple[tuple[Target, Piece], ...]

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def run(self, buffers: Buffers, stop: threading.Event) -> None:
        copy_tensor(self, buffers, stop)


@dataclass(frozen=True)
class Written:
    """xxh3-128 hex digests of what was written: together with the file size, the header hash
    and the tensors' hashes cover every byte of every file (tensors are contiguous)."""

    tensors: dict[str, dict[str, str]]  # file -> tensor -> digest
    headers: dict[str, str]  # file -> digest of its first 8 + N bytes


def write_plan(
    plan: Plan,
    source: Source,
    out_dir: Path,
    *,
    progress=None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
) -> Written:
    """Write every output file of the plan with `workers` threads (default: the cores)."""
    files = [FileSpec(f.name, f.tensors, {"format": "pt", "rank": str(f.rank)}) for f in plan.files]
    return write_files(
        files, source, out_dir, progress=progress, workers=workers, chunk_bytes=chunk_bytes
    )


@dataclass(frozen=True)
class FileSpec:
    """One safetensors file to write: its tensors in order, and its header's metadata."""

    name: str
    tensors: tuple[OutTensor, ...]
    metadata: dict[str, str]


def write_files(
    specs: list[FileSpec],
    source: Source,
    out_dir: Path,
    *,
    progress=None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
) -> Written:
    """Write the files (every tensor's pieces from `source`), fsync, and rename them only
    when every job has succeeded, every rank-file hash included."""
    workers = workers or default_workers()
    files: list[tuple[int, Path]] = []
    targets: list[Target] = []
    headers: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reshard-write")
    stop = threading.Event()
    writeback = Writeback()
    try:
        for spec in specs:
            path = out_dir / spec.name
            fd, file_targets, headers[spec.name] = _create_file(path, spec, writeback)
            files.append((fd, path))
            targets.extend(file_targets)
        jobs = collect_jobs(source, targets)
        buffers = Buffers(chunk_bytes or buffer_bytes(workers))
        futures = [pool.submit(job.run, buffers, stop) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            future.result()  # re-raises a worker's error (or Ctrl-C raised in it) here
            if progress is not None:
                progress.update(job.nbytes)
        hashes = _finish_hashes(targets)
        list(pool.map(_fsync_partial, files))  # the files' writebacks overlap
    finally:
        stop.set()  # on an error: running jobs stop after their current window
        pool.shutdown(wait=True, cancel_futures=True)  # no thread writes to a closed fd
        for fd, _ in files:
            os.close(fd)
    for _, path in files:
        io_call(os.replace, partial_path(path), path, path=path)
    fsync_dir(out_dir)
    return Written(hashes, headers)


def _fsync_partial(file: tuple[int, Path]) -> None:
    io_call(os.fsync, file[0], path=partial_path(file[1]))


def _create_file(path: Path, spec: FileSpec, writeback: Writeback) -> tuple[int, list[Target], str]:
    entries = [(t.name, t.dtype, t.shape) for t in spec.tensors]
    header, offsets = encode_header(entries, spec.metadata)
    tmp = partial_path(path)
    fd = io_call(os.open, tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644, path=tmp)
    pwrite_all(fd, memoryview(header), 0, tmp)
    # Full size up front: padding rows are the zeros of the sparse tail, no write needed.
    io_call(os.ftruncate, fd, len(header) + (offsets[-1][1] if offsets else 0), path=tmp)
    targets = [
        Target(tmp, fd, t, len(header) + begin, writeback)
        for t, (begin, _) in zip(spec.tensors, offsets, strict=True)
    ]
    for target in targets:
        t = target.tensor
        if t.fill is not None:  # a format's constant (vLLM's attention scales, a zero bias)
            data = memoryview(fill_bytes(t.dtype, t.fill, t.shape))
            pwrite_all(fd, data, target.offset, tmp)
            account(target, 0, data)
    return fd, targets, xxhash.xxh3_128(header).hexdigest()


def fill_bytes(dtype: str, fill: float, shape: tuple[int, ...]) -> bytes:
    """A constant tensor's bytes: zeros of any dtype (a bias vLLM keeps on one rank), or a
    float32 value (vLLM's attention scales)."""
    count = math.prod(shape)
    if fill == 0:
        return bytes(DTYPE_SIZES[dtype] * count)
    if dtype != "F32":  # internal invariant: formats add fp32 scales and zeros only
        raise AssertionError(f"constant {fill} of dtype {dtype}")
    return struct.pack("<f", fill) * count


def collect_jobs(source: Source, targets: list[Target]) -> list:
    """The source's jobs for every needed source tensor, as its kind reads them (an HF
    folder: one per tensor in file order; a reshard output: pulls from its rank files)."""
    consumers: dict[str, list[tuple[Target, Piece]]] = {}
    for target in targets:
        for piece in target.tensor.pieces:
            consumers.setdefault(piece.source, []).append((target, piece))
    return source.reader.byte_jobs(source, consumers)


class Buffers:
    """Gather buffers, one per running job, reused: fresh memory costs a page fault per 4 KiB."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.free: list[memoryview] = []
        self.lock = threading.Lock()

    def take(self) -> memoryview:
        with self.lock:
            if self.free:
                return self.free.pop()
        return memoryview(bytearray(self.nbytes))

    def give(self, buf: memoryview) -> None:
        with self.lock:
            self.free.append(buf)


def copy_tensor(job: Job, buffers: Buffers, stop: threading.Event) -> None:
    """Map one source tensor window by window and write every consumer's part of each (a
    target stored transposed: in bands, io/transposed.py)."""
    info = job.info
    item = DTYPE_SIZES[info.dtype]
    widest = max([item] + [DTYPE_SIZES[t.tensor.dtype] for t, _ in job.consumers])
    transposed = [(t, p) for t, p in job.consumers if t.tensor.transposed]
    if transposed:
        job = Job(job.path, info, tuple(c for c in job.consumers if not c[0].tensor.transposed))
    gather = buffers.take()
    fd = io_call(os.open, job.path, os.O_RDONLY, path=job.path)
    try:
        if transposed:  # torch: only a format that transposes
            write_transposed(job.path, fd, info, transposed, buffers.nbytes, stop)
        for window in tensor_windows(info.shape, widest, buffers.nbytes) if job.consumers else ():
            if stop.is_set():
                return
            _copy_window(job, window, (fd, info.begin + window.start * item), gather)
    finally:
        os.close(fd)
        buffers.give(gather)


def _copy_window(job: Job, window: Window, at: tuple[int, int], gather: memoryview) -> None:
    """`at`: (fd, offset) of the window's bytes in the source file; they are mapped only if
    a run needs them (split rows that tile the window are read straight into `gather`)."""
    mapped: list[memoryview] = []

    def data() -> memoryview:
        if not mapped:
            n = window.size * DTYPE_SIZES[job.info.dtype]
            mapped.append(map_range(at[0], at[1], n, job.path))
        return mapped[0]

    cast: dict[str, memoryview] = {}
    split = []
    for target, piece in job.consumers:
        dtype = target.tensor.dtype
        groups = piece_groups(
            piece.start, piece.stop, piece.dest, job.info.shape, target.tensor.shape,
            window, DTYPE_SIZES[dtype],
        )  # fmt: skip
        if dtype != job.info.dtype:  # the recipe asked for a cast
            src = cast.get(dtype) or cast.setdefault(dtype, cast_bytes(data(), job.info, dtype))
            for group in groups:
                _write_group(target, group, src, None, gather)
            continue
        for group in groups:
            if len(group.segments) > 1:
                split.append((target, group))
            else:
                _write_group(target, group, data(), at, gather)
    if split and not _scatter(split, at, gather, job.path):
        for target, group in split:
            _write_group(target, group, data(), at, gather)


def _scatter(split: list, at: tuple[int, int], gather: memoryview, path: Path) -> bool:
    """Split rows read straight into their places in `gather` (io/scatter.py), then each
    output's bytes written with one call. False: they do not tile the window; nothing done."""
    plan = scatter_views(split, gather)
    if plan is None:
        return False
    first, iov, placed = plan
    want = sum(g.nbytes for _, g, _ in placed)
    if io_call(preadv_exact, at[0], iov, at[1] + first, path=path) < want:
        raise CheckpointError(
            f"{path}: ended before the bytes its header promised. The file shrank or is "
            "truncated; re-download it."
        )
    for target, group, view in placed:
        pwrite_all(target.fd, view, target.offset + group.dest, target.file)
        account(target, group.dest, view)
    return True


def cast_bytes(data: memoryview, info: TensorInfo, dtype: str) -> memoryview:
    """The window's values converted to `dtype`: the one place the writer needs torch."""
    import torch

    from .tensor_bytes import tensor_bytes

    values = torch.frombuffer(bytearray(data), dtype=torch_dtypes()[info.dtype])
    return tensor_bytes(values.to(torch_dtypes()[dtype]))


def _write_group(target: Target, group: Group, src: memoryview, at, gather: memoryview) -> None:
    if len(group.segments) == 1:  # contiguous in the window: no gather
        begin, n = group.segments[0]
        data = src[begin : begin + n]
        if at is None:
            pwrite_all(target.fd, data, target.offset + group.dest, target.file)
        else:
            _copy_run(target, group.dest, (at[0], at[1] + begin), data)
    else:
        data, pos = gather[: group.nbytes], 0
        for begin, n in group.segments:
            data[pos : pos + n] = src[begin : begin + n]
            pos += n
        pwrite_all(target.fd, data, target.offset + group.dest, target.file)
    account(target, group.dest, data)


# copy_file_range errors that mean "not here" (old kernel, other file system): use pwrite.
NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _copy_run(target: Target, rel: int, src: tuple[int, int], data: memoryview) -> None:
    """Copy file to file in the kernel, as cp does: measured cheaper than pwrite from the
    mapping. `data`, the same bytes mapped, feeds only the hash and the fallback."""
    n, done = len(data), 0
    copy = getattr(os, "copy_file_range", None)
    try:
        while copy is not None and done < n:
            step = copy(src[0], target.fd, n - done, src[1] + done, target.offset + rel + done)
            if step == 0:
                break
            done += step
    except OSError as e:
        if e.errno not in NO_KERNEL_COPY:
            raise io_error(e, target.file) from None
    if done < n:
        pwrite_all(target.fd, data[done:], target.offset + rel + done, target.file)


def _finish_hashes(targets: list[Target]) -> dict[str, dict[str, str]]:
    hashes: dict[str, dict[str, str]] = {}
    for t in targets:
        pad = t.tensor.padding
        expected = t.tensor.nbytes - (pad * (t.tensor.nbytes // t.tensor.shape[0]) if pad else 0)
        if t.written != expected:  # internal invariant: the plan covers every element once
            raise AssertionError(f"{t.tensor.name}: wrote {t.written} of {expected} bytes")
        while t.hashed < t.tensor.nbytes:
            n = min(MAX_BUFFER, t.tensor.nbytes - t.hashed)
            t.hasher.update(pread_exact(t.fd, n, t.offset + t.hashed, t.file))
            t.hashed += n
        name = t.file.name.removesuffix(".partial")
        hashes.setdefault(name, {})[t.tensor.name] = t.hasher.hexdigest()
    return hashes
