"""OS calls on files with errors that name the file and the fix: a pwrite loop, a read-only
mapping of a byte range, an fsync of a folder, a small file written whole or not at all.
The writer, the byte pullers, the manifest and the folder records all write through these.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from ..errors import CheckpointError, ReshardIOError


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def map_range(fd: int, offset: int, n: int, path: Path, *, private: bool = False) -> memoryview:
    """The file's bytes [offset, offset + n), mapped read-only: hashing and pwrite then read the
    page cache directly, a copy fewer than preadv into a buffer. Unmapped when the last view
    of it goes. `private`: a copy-on-write mapping, writable (as torch.frombuffer wants) but
    never written back, which costs nothing until a page is written."""
    size = io_call(os.fstat, fd, path=path).st_size
    if size < offset + n:  # reading a mapping past the end of the file kills the process
        raise CheckpointError(
            f"{path}: has {size} bytes, fewer than the {offset + n} its header promised. The "
            "file shrank or is truncated; re-download it."
        )
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = io_call(
        mmap.mmap,
        fd,
        offset + n - base,
        offset=base,
        path=path,
        access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ,
    )
    return memoryview(mapped)[offset - base :]


def pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    data = data.cast("B")
    while len(data):
        n = io_call(os.pwrite, fd, data, offset, path=path)
        data = data[n:]
        offset += n


def io_call(fn, *args, path: Path, **kwargs):
    """Run an OS call; turn OSError into ReshardIOError naming the file and the fix."""
    try:
        return fn(*args, **kwargs)
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
    fd = io_call(os.open, path, os.O_RDONLY, path=path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file as `.partial`, fsync, rename, fsync the folder."""
    tmp = partial_path(path)
    fd = io_call(os.open, tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644, path=tmp)
    try:
        pwrite_all(fd, memoryview(data), 0, tmp)
        io_call(os.fsync, fd, path=tmp)
    finally:
        os.close(fd)
    io_call(os.replace, tmp, path, path=path)
    fsync_dir(path.parent)
