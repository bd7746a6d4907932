"""Which bytes of a source tensor go where: the writer's arithmetic, on shapes and ints only.

A source tensor is read in windows (contiguous element ranges that fit one buffer). The part
of a plan piece inside a window maps to its output tensor as runs, each contiguous in both
the source and the output; runs that follow each other in the output form one group, which
the writer gathers and writes with one call. No I/O and no torch here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Window:
    """Elements [start, start + size) of a tensor, in row-major order: the indices `prefix`
    on the dims before `dim`, [lo, hi) along `dim`, and all of every later dim."""

    prefix: tuple[int, ...]
    lo: int
    hi: int
    start: int
    size: int

    @property
    def dim(self) -> int:
        return len(self.prefix)


@dataclass(frozen=True)
class Group:
    """Bytes that land back to back in the output, from `segments` (offset into the window's
    bytes, length) in that order. One segment: a slice of the window, no gather needed."""

    dest: int  # byte offset in the output tensor
    nbytes: int
    segments: tuple[tuple[int, int], ...]
    stride: int = 0  # bytes from one segment's start to the next when all are evenly spaced


def strides_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides."""
    return tuple(math.prod(shape[j + 1 :]) for j in range(len(shape)))


@lru_cache(maxsize=1024)
def tensor_windows(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> tuple[Window, ...]:
    """Cover a tensor with windows of at most max_bytes (or one element, if larger), in file
    order. Windows cut the first dim whose single index fits (whole rows when a row fits)."""
    if math.prod(shape) == 0:
        return ()
    shape = shape or (1,)
    d = 0
    while d < len(shape) - 1 and math.prod(shape[d + 1 :]) * itemsize > max_bytes:
        d += 1
    inner = math.prod(shape[d + 1 :])
    step = max(1, max_bytes // (inner * itemsize))
    strides = strides_of(shape)
    windows = []
    for prefix in itertools.product(*(range(n) for n in shape[:d])):
        base = sum(i * s for i, s in zip(prefix, strides, strict=False))
        for lo in range(0, shape[d], step):
            hi = min(lo + step, shape[d])
            windows.append(Window(prefix, lo, hi, base + lo * strides[d], (hi - lo) * inner))
    return tuple(windows)


@lru_cache(maxsize=4096)
def piece_groups(
    start: tuple[int, ...],
    stop: tuple[int, ...],
    dest: tuple[int, ...],
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    window: Window,
    itemsize: int,
) -> tuple[Group, ...]:
    """The groups that copy the part of the block source[start:stop] inside `window` to
    output[dest + ...], as byte offsets (`itemsize`: bytes per element of both buffers). A
    `dest` longer than `start` places the block at fixed indices of the output's leading dims
    (a format stacking experts): the source is seen with leading length-1 dims."""
    lift = len(dest) - len(start)
    if lift > 0 and start:
        start, stop = (0,) * lift + start, (1,) * lift + stop
        shape = (1,) * lift + shape
        window = Window(
            (0,) * lift + window.prefix, window.lo, window.hi, window.start, window.size
        )
    grid = _run_grid(start, stop, dest, shape or (1,), out_shape or (1,), window)
    if grid is None:
        return ()
    if grid[3] <= 1:  # one run per row (or one run): evenly spaced, built without a loop
        return _row_groups(*grid, itemsize)
    runs = _piece_runs(*grid)
    groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # dest, nbytes, segments
    for src, dst, n in runs:
        segment = (src * itemsize, n * itemsize)
        if groups and groups[-1][0] + groups[-1][1] == dst * itemsize:
            groups[-1] = (groups[-1][0], groups[-1][1] + segment[1], groups[-1][2])
            groups[-1][2].append(segment)
        else:
            groups.append((dst * itemsize, segment[1], [segment]))
    return tuple(Group(dest, nbytes, tuple(segments)) for dest, nbytes, segments in groups)


def _row_groups(src0, dst0, lens, k, src_strides, dst_strides, itemsize) -> tuple[Group, ...]:
    """_piece_runs' groups when k <= 1: run i is (src0 + i * ss, dst0 + i * ds, run). The
    runs are one group when back to back in the output (ds == run), else one group each."""
    run = math.prod(lens[k:]) * itemsize
    rows = lens[0] if k == 1 else 1
    ss, ds = (src_strides[0] * itemsize, dst_strides[0] * itemsize) if k == 1 else (0, 0)
    src0, dst0 = src0 * itemsize, dst0 * itemsize
    if rows == 1 or ds == run:
        segments = tuple((src0 + i * ss, run) for i in range(rows))
        return (Group(dst0, run * rows, segments, ss if rows > 1 else 0),)
    return tuple(Group(dst0 + i * ds, run, ((src0 + i * ss, run),)) for i in range(rows))


def _run_grid(start, stop, dest, shape, out_shape, window: Window):
    """Where the block's runs start and how they repeat: (src0, dst0, lens, k, source
    strides, output strides) in elements, or None when the block misses the window."""
    lo, hi = list(start or (0,)), list(stop or (1,))
    dest = dest or (0,)
    for j, i in enumerate(window.prefix):
        lo[j], hi[j] = max(lo[j], i), min(hi[j], i + 1)
    lo[window.dim], hi[window.dim] = max(lo[window.dim], window.lo), min(hi[window.dim], window.hi)
    lens = [h - low for low, h in zip(lo, hi, strict=True)]
    if min(lens) <= 0:
        return None
    # k: the dims after k are whole in both source and output, so each index of the dims
    # before k starts one run of lens[k:] elements.
    k = len(shape) - 1
    while k > 0 and lens[k] == shape[k] == out_shape[k]:
        k -= 1
    src_strides, dst_strides = strides_of(shape), strides_of(out_shape)
    src0 = sum(a * s for a, s in zip(lo, src_strides, strict=True)) - window.start
    dst_lo = [d + a - s for d, a, s in zip(dest, lo, start or (0,), strict=True)]
    dst0 = sum(a * s for a, s in zip(dst_lo, dst_strides, strict=True))
    return src0, dst0, lens, k, src_strides, dst_strides


def _piece_runs(src0, dst0, lens, k, src_strides, dst_strides) -> list[tuple[int, int, int]]:
    """(element offset in the window, element offset in the output, length) for each run."""
    run = math.prod(lens[k:])
    runs = []
    for idx in itertools.product(*(range(n) for n in lens[:k])):
        src = src0 + sum(i * s for i, s in zip(idx, src_strides, strict=False))
        dst = dst0 + sum(i * s for i, s in zip(idx, dst_strides, strict=False))
        runs.append((src, dst, run))
    return runs
