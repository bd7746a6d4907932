"""Start the disk writing an output file while the file is still being written.

Without it the kernel holds the written pages in memory until its dirty threshold (10% of
RAM by default) or the final fsync, so the disk idles while reshard copies and the copy waits
while the disk works: measured on a 4 GB conversion, 5.4 s of copying then 4.7 s of fsync.
Every STEP bytes written to a file, `sync_file_range(SYNC_FILE_RANGE_WRITE)` asks the kernel
to start writing that file's dirty pages, without waiting for them; the final fsync then waits
for what is left. Durability does not depend on it (files are still fsynced before rename).
Linux only; elsewhere, or where libc lacks the call, nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

STEP = 32 << 20  # bytes written to one file between two kicks
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _sync_file_range():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_CALL = _sync_file_range()


class Writeback:
    """Counts the bytes written to each file and starts its writeback every STEP bytes."""

    def __init__(self, step: int | None = None):
        self.step = step or STEP
        self.pending: dict[int, int] = {}
        self.lock = threading.Lock()

    def wrote(self, fd: int, nbytes: int) -> None:
        if _CALL is None:
            return
        with self.lock:
            pending = self.pending.get(fd, 0) + nbytes
            self.pending[fd] = 0 if pending >= self.step else pending
        if pending >= self.step:
            _CALL(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a hint: an error here changes nothing
