"""Execute a Plan: stream every needed source byte once, in file order, in bounded chunks, and
scatter each chunk to the final offset of every output tensor that needs a piece of it.

Output headers are known from the plan, so each file is created at its full size up front and
written with pwrite. Files are `*.partial` until fsynced and renamed. Peak memory is one
chunk (plus a sliced copy of it), whatever the model size. The writer makes no decisions.
"""

from __future__ import annotations

import errno
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from .errors import CheckpointError, ReshardIOError, UnsupportedModelError
from .plan import OutFile, OutTensor, Piece, Plan
from .safetensors_io import TORCH_DTYPES, encode_header, pread_exact
from .source import Source
from .tensor_bytes import tensor_bytes

CHUNK_BYTES = 64 << 20
MAX_PENDING_WRITES = 4  # bounds the memory held by blocks waiting for the write thread


class WriteQueue:
    """One background thread does the pwrites and the hashing, in submission order (so each
    tensor's hash still streams in byte order), while the caller reads and slices the next
    chunk. torch copies, preadv, pwrite and xxh3 release the GIL, so the two overlap.

    Read buffers are recycled (fresh memory costs a page fault per 4 KiB): a buffer goes back
    to the pool by a marker queued after the writes that may still point into it."""

    def __init__(self, chunk_bytes: int, buffers: int = 3):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reshard-write")
        self.pending: deque[Future] = deque()
        self.chunk_bytes = chunk_bytes
        self.free: list[torch.Tensor] = []
        self.unmade = buffers

    def submit(self, target: Target, rel: int, data) -> None:
        self._queue(_write_run, target, rel, data)

    def submit_copy(self, target: Target, rel: int, src: tuple[int, int], data) -> None:
        """Like submit, but the bytes go file to file in the kernel; `data` (the same bytes,
        already read) only feeds the hash."""
        self._queue(_copy_run, target, rel, src, data)

    def take_buffer(self, n: int) -> torch.Tensor:
        """A uint8 tensor of n bytes to read into (uninitialised)."""
        if n > self.chunk_bytes:  # one row wider than a chunk: a one-off buffer
            return torch.empty(n, dtype=torch.uint8)
        while not self.free and not self.unmade:
            self._wait_oldest()
        if self.free:
            return self.free.pop()[:n]
        self.unmade -= 1
        return torch.empty(self.chunk_bytes, dtype=torch.uint8)[:n]

    def release_buffer(self, buf: torch.Tensor) -> None:
        if buf._base is not None and buf._base.numel() == self.chunk_bytes:
            self._queue(self.free.append, buf._base)

    def _queue(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > MAX_PENDING_WRITES:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        self.pending.popleft().result()  # re-raises a write error here

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Target:
    """One output tensor being filled: where it lives and how much of it is hashed."""

    file: Path
    fd: int
    tensor: OutTensor
    offset: int  # absolute byte offset of the tensor's data in its file
    hasher: xxhash.xxh3_128 = field(default_factory=xxhash.xxh3_128)
    hashed: int = 0  # bytes [0, hashed) are in the hash
    written: int = 0  # bytes written, checked against the plan at the end


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@dataclass(frozen=True)
class Written:
    """xxh3-128 hex digests of what was written: together with the file size, the header hash
    and the tensors' hashes cover every byte of every file (tensors are contiguous)."""

    tensors: dict[str, dict[str, str]]  # file -> tensor -> digest
    headers: dict[str, str]  # file -> digest of its first 8 + N bytes


def write_plan(
    plan: Plan, source: Source, out_dir: Path, *, progress=None, chunk_bytes: int = CHUNK_BYTES
) -> Written:
    """Write every output file of the plan."""
    targets: list[Target] = []
    fds: list[tuple[int, Path]] = []
    headers: dict[str, str] = {}
    try:
        for out_file in plan.files:
            fd, file_targets, headers[out_file.name] = _create_file(
                out_dir / out_file.name, out_file
            )
            fds.append((fd, out_dir / out_file.name))
            targets.extend(file_targets)
        queue = WriteQueue(chunk_bytes)
        try:
            _stream_sources(source, targets, chunk_bytes, progress, queue)
            queue.drain()
        finally:
            queue.close()
        hashes = _finish_hashes(targets)
        for fd, path in fds:
            _io(os.fsync, fd, path=partial_path(path))
    finally:
        for fd, _ in fds:
            os.close(fd)
    for _, path in fds:
        _io(os.replace, partial_path(path), path, path=path)
    fsync_dir(out_dir)
    return Written(hashes, headers)


def _create_file(path: Path, out_file: OutFile) -> tuple[int, list[Target], str]:
    entries = [(t.name, t.dtype, t.shape) for t in out_file.tensors]
    header, offsets = encode_header(entries, {"format": "pt", "rank": str(out_file.rank)})
    tmp = partial_path(path)
    fd = _io(os.open, tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644, path=tmp)
    _pwrite_all(fd, memoryview(header), 0, tmp)
    # Full size up front: padding rows are the zeros of the sparse tail, no write needed.
    _io(os.ftruncate, fd, len(header) + (offsets[-1][1] if offsets else 0), path=tmp)
    targets = [
        Target(tmp, fd, t, len(header) + begin)
        for t, (begin, _) in zip(out_file.tensors, offsets, strict=True)
    ]
    return fd, targets, xxhash.xxh3_128(header).hexdigest()


def _stream_sources(source: Source, targets: list[Target], chunk_bytes: int, progress, queue):
    consumers: dict[str, list[tuple[Target, Piece]]] = {}
    for target in targets:
        for piece in target.tensor.pieces:
            consumers.setdefault(piece.source, []).append((target, piece))
    if source.reader is not None:  # a reshard output: tensors reassembled from rank files
        _stream_reassembled(source, consumers, chunk_bytes, progress, queue)
        return
    for header in source.headers:  # file order, then offset order within a file
        needed = [t for name, t in header.tensors.items() if name in consumers]
        if not needed:
            continue
        fd = _io(os.open, header.path, os.O_RDONLY, path=header.path)
        try:
            for info in needed:
                _stream_tensor(fd, header.path, info, consumers[info.name], chunk_bytes, queue)
                if progress is not None:
                    progress.update(info.nbytes)
            queue.drain()  # queued kernel copies still read from fd
        finally:
            os.close(fd)


def _stream_reassembled(source: Source, consumers, chunk_bytes: int, progress, queue) -> None:
    """Row blocks come from source.reader (output_source.OutputReader); its rank-file hashes
    are checked once everything needed has been read."""
    taken: list[torch.Tensor] = []  # the pool buffer each block was assembled in

    def take(n: int) -> torch.Tensor:
        taken.append(queue.take_buffer(n))
        return taken[-1]

    for name, (_, info) in source.tensors.items():
        if name not in consumers:
            continue
        for a, b, chunk in source.reader.iter_rows(name, info, chunk_bytes, alloc=take):
            for target, piece in consumers[name]:
                _scatter(target, piece, chunk, a, b, queue, None)
            queue.release_buffer(taken.pop())
        if progress is not None:
            progress.update(info.nbytes)
    queue.drain()
    source.reader.check_hashes()


def _stream_tensor(fd, path: Path, info, consumers, chunk_bytes: int, queue: WriteQueue) -> None:
    if info.dtype not in TORCH_DTYPES:
        raise UnsupportedModelError(
            f"{path}: tensor '{info.name}' has dtype {info.dtype}, which reshard cannot slice."
        )
    rows = info.shape[0] if info.shape else 1
    if rows == 0 or info.nbytes == 0:
        return
    row_bytes = info.nbytes // rows
    step = max(1, chunk_bytes // max(row_bytes, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        raw = queue.take_buffer((b - a) * row_bytes)
        read_into(fd, raw, info.begin + a * row_bytes, path)
        chunk = raw.view(TORCH_DTYPES[info.dtype])
        chunk = chunk.view(b - a, *info.shape[1:]) if info.shape else chunk.view(())
        at = (fd, info.begin + a * row_bytes)  # where the chunk's bytes live in the source
        for target, piece in consumers:
            _scatter(target, piece, chunk, a, b, queue, at)
        queue.release_buffer(raw)


def read_into(fd: int, buf: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the uint8 tensor `buf` with the file's bytes at offset, or fail naming the file."""
    n = buf.numel()
    view = tensor_bytes(buf)
    got = 0
    while got < n:
        step = _io(os.preadv, fd, [view[got:]], offset + got, path=path)
        if step == 0:
            raise CheckpointError(
                f"{path}: ended after {offset + got} bytes while reading {n} bytes at offset "
                f"{offset}. The file shrank or is truncated; re-download it."
            )
        got += step


def _scatter(target: Target, piece: Piece, chunk: torch.Tensor, a: int, b: int, queue, at):
    """Copy the part of `piece` that lies in source rows [a, b) to its place in the output."""
    if chunk.dim() == 0:
        _write_block(target, (), chunk.reshape(()), queue)
        return
    lo, hi = max(a, piece.start[0]), min(b, piece.stop[0])
    if lo >= hi:
        return
    index = (slice(lo - a, hi - a),) + tuple(
        slice(s, e) for s, e in zip(piece.start[1:], piece.stop[1:], strict=True)
    )
    block = chunk[index]
    dest = (piece.dest[0] + lo - piece.start[0], *piece.dest[1:])
    if _whole_rows(block, chunk, dest, target):
        # Whole rows to whole rows, uncast: one byte range to one byte range.
        row_bytes = block[0].numel() * block.element_size()
        data = tensor_bytes(block)
        if at is None:  # no source file to copy from (a reassembled block)
            queue.submit(target, dest[0] * row_bytes, data)
            return
        src = (at[0], at[1] + (lo - a) * row_bytes)
        queue.submit_copy(target, dest[0] * row_bytes, src, data)
        return
    _write_block(target, dest, block, queue)


def _whole_rows(block: torch.Tensor, chunk: torch.Tensor, dest, target: Target) -> bool:
    out = target.tensor
    return (
        block.dtype == TORCH_DTYPES[out.dtype]
        and block.shape[1:] == chunk.shape[1:]
        and tuple(block.shape[1:]) == tuple(out.shape[1:])
        and not any(dest[1:])
    )


def _write_block(target: Target, dest: tuple[int, ...], block: torch.Tensor, queue) -> None:
    """Write `block` at `dest` (per-dim start) in the output tensor, as contiguous runs."""
    out_dtype = TORCH_DTYPES[target.tensor.dtype]
    if block.dtype != out_dtype:
        block = block.to(out_dtype)  # the recipe asked for a cast
    data = tensor_bytes(block.contiguous())
    shape = target.tensor.shape
    # k: the first dim from which the block covers the output fully, so that each index of
    # the dims before k is one contiguous run.
    k = len(shape)
    while k > 0 and dest[k - 1] == 0 and block.shape[k - 1] == shape[k - 1]:
        k -= 1
    k = max(k - 1, 0)
    strides = [math.prod(shape[j + 1 :]) for j in range(len(shape))]
    item = out_dtype.itemsize
    run = math.prod(block.shape[k:]) * item
    outer = [range(n) for n in block.shape[:k]]
    for i, idx in enumerate(_product(outer)):
        first = sum((dest[j] + idx[j]) * strides[j] for j in range(k))
        first += dest[k] * strides[k] if shape else 0
        queue.submit(target, first * item, data[i * run : (i + 1) * run])


def _product(ranges):
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head, *rest)


def _write_run(target: Target, rel: int, data) -> None:
    _pwrite_all(target.fd, memoryview(data), target.offset + rel, target.file)
    _account(target, rel, data)


# copy_file_range errors that mean "not here" (old kernel, other file system): use pwrite.
NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _copy_run(target: Target, rel: int, src: tuple[int, int], data) -> None:
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
        _pwrite_all(target.fd, memoryview(data)[done:], target.offset + rel + done, target.file)
    _account(target, rel, data)


def _account(target: Target, rel: int, data) -> None:
    target.written += len(data)
    if rel == target.hashed:  # in order: hash while streaming; else read back at the end
        target.hasher.update(data)
        target.hashed += len(data)


def _finish_hashes(targets: list[Target]) -> dict[str, dict[str, str]]:
    hashes: dict[str, dict[str, str]] = {}
    for t in targets:
        padding_bytes = t.tensor.padding * (t.tensor.nbytes // max(t.tensor.shape[0], 1))
        expected = t.tensor.nbytes - (padding_bytes if t.tensor.shape else 0)
        if t.written != expected:  # internal invariant: the plan covers every element once
            raise AssertionError(f"{t.tensor.name}: wrote {t.written} of {expected} bytes")
        while t.hashed < t.tensor.nbytes:
            n = min(CHUNK_BYTES, t.tensor.nbytes - t.hashed)
            t.hasher.update(pread_exact(t.fd, n, t.offset + t.hashed, t.file))
            t.hashed += n
        name = t.file.name.removesuffix(".partial")
        hashes.setdefault(name, {})[t.tensor.name] = t.hasher.hexdigest()
    return hashes


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    data = data.cast("B")
    while len(data):
        n = _io(os.pwrite, fd, data, offset, path=path)
        data = data[n:]
        offset += n


def _io(fn, *args, path: Path):
    """Run an OS call; turn OSError into ReshardIOError naming the file and the fix."""
    try:
        return fn(*args)
    except OSError as e:
        raise io_error(e, path) from None


def io_error(e: OSError, path: Path) -> ReshardIOError:
    fix = {
        errno.ENOSPC: "free space on that disk or write elsewhere with -o",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "the file system is read-only; write elsewhere with -o",
    }.get(e.errno, "check the disk and the path")
    return ReshardIOError(f"{path}: {e.strerror} ({fix}).")


def fsync_dir(path: Path) -> None:
    fd = _io(os.open, path, os.O_RDONLY, path=path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file as `.partial`, fsync, rename, fsync the folder."""
    tmp = partial_path(path)
    fd = _io(os.open, tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644, path=tmp)
    try:
        _pwrite_all(fd, memoryview(data), 0, tmp)
        _io(os.fsync, fd, path=tmp)
    finally:
        os.close(fd)
    _io(os.replace, tmp, path, path=path)
    fsync_dir(path.parent)
