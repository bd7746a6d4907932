"""Split rows read straight into their gather buffers: one `preadv` whose iovecs point at each
output's place in the buffer, instead of mapping the window and copying row part by row part.

A row-parallel tensor (o_proj, down_proj) at tp N sends each source row's N parts to N
outputs: the parts of all outputs together tile the window's bytes in order (row 0 part 0,
row 0 part 1, ..., row 1 part 0, ...). Reading them with one scatter call per IOV_MAX parts
costs a copy the mapping would cost anyway, no page faults, and a slice per part instead of
a slice assignment. Anything else (a gap, replicated parts) is left to the mapped path.
"""

from __future__ import annotations

import os

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def scatter_views(split: list, gather: memoryview) -> tuple[int, list, list] | None:
    """(first window byte, iovecs in source order, [(target, group, its bytes in gather)])
    when the groups' segments tile one contiguous run of the window row by row, else None.
    `split`: (target, byte_runs.Group with several segments) pairs, in any order."""
    split = sorted(split, key=lambda pair: pair[1].segments[0][0])
    groups = [g for _, g in split]
    rows = len(groups[0].segments)
    if sum(g.nbytes for g in groups) > len(gather) or any(len(g.segments) != rows for g in groups):
        return None
    if not (_tiles_evenly(groups, rows) or _tiles(groups)):
        return None
    placed, per_group, pos = [], [], 0
    for target, g in split:
        view = gather[pos : pos + g.nbytes]
        placed.append((target, g, view))
        per_group.append(_cut(view, g, rows))
        pos += g.nbytes
    first = groups[0].segments[0][0]
    return first, [v for row in zip(*per_group, strict=True) for v in row], placed


def _tiles_evenly(groups: list, rows: int) -> bool:
    """Evenly spaced groups of equal segments (byte_runs' row groups): O(groups) to check."""
    stride = groups[0].stride
    if not stride or any(g.stride != stride or g.nbytes % rows for g in groups):
        return False
    at = groups[0].segments[0][0]
    for g in groups:
        if g.segments[0][0] != at:
            return False
        at += g.nbytes // rows
    return at - groups[0].segments[0][0] == stride


def _tiles(groups: list) -> bool:
    """Any groups: segment by segment, row by row, each starts where the last ended."""
    cursor = groups[0].segments[0][0]
    for row in zip(*(g.segments for g in groups), strict=True):
        for begin, n in row:
            if begin != cursor:
                return False
            cursor += n
    return True


def _cut(view: memoryview, group, rows: int) -> list[memoryview]:
    """The group's segments' places in its part of the buffer, back to back."""
    if group.stride and not group.nbytes % rows:
        n = group.nbytes // rows
        return [view[a : a + n] for a in range(0, group.nbytes, n)]
    views, at = [], 0
    for _, n in group.segments:
        views.append(view[at : at + n])
        at += n
    return views


def preadv_exact(fd: int, views: list, offset: int) -> int:
    """Fill `views` back to back from the file at `offset`, IOV_MAX at a time; the bytes read
    (fewer only where the file ends). OSError goes to the caller."""
    done = 0
    for i in range(0, len(views), IOV_MAX):
        chunk = views[i : i + IOV_MAX]
        want = sum(len(v) for v in chunk)
        got = os.preadv(fd, chunk, offset + done)
        while got < want:  # short read (rare on regular files): finish view by view
            step = _finish(fd, chunk, offset + done, got)
            if step == 0:
                return done + got
            got += step
        done += want
    return done


def _finish(fd: int, views: list, offset: int, got: int) -> int:
    """Read the next bytes after `got` into the view they fall in; bytes read (0: end)."""
    for view in views:
        if got >= len(view):
            got -= len(view)
            offset += len(view)
            continue
        return os.preadv(fd, [view[got:]], offset + got)
    return 0
