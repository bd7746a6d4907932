"""Tensors stored with their last two dims swapped (OutTensor.transposed: vLLM's gpt-oss
experts, [E, out, in] where the checkpoint stores [E, in, out]), on every byte path.

Pieces and parts always place bytes in a tensor as it reads untransposed (its logical
shape), so a transposed tensor's bytes are never runs of the source's: each element moves
alone. They are moved in bands instead, with torch: a band is whole rows of the tensor as a
file stores it (rows of the transposed matrix for a transposed tensor; each piece of one
holds whole expert matrices of a rank, so its stored rows are whole), read from mappings of
the source rows it needs (page cache, no copy), transposed in memory and written with one
call. A band holds at most the writer's buffer, so memory stays flat whatever the model.
Readers (export, re-layout, verify) read any box of a tensor in its logical coordinates with
`read_box`, transposed or not, in the same bands.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPE_SIZES, torch_dtypes
from ..headers import TensorInfo
from ..layout.tensors import swap_last
from .byte_runs import strides_of
from .files import map_range, pwrite_all
from .target import Target, account

if TYPE_CHECKING:
    import torch


def read_box(
    fd: int, path: Path, info: TensorInfo, lo: tuple[int, ...], hi: tuple[int, ...],
    transposed: bool = False,
) -> torch.Tensor:  # fmt: skip
    """tensor[lo:hi] (per dim, logical coordinates) of the tensor `info` in the open file `fd`,
    stored with its last two dims swapped when `transposed`. A view of a fresh tensor."""
    import torch

    shape = info.shape
    if len(shape) < 2:  # contiguous already: one range
        a, b = (lo[0], hi[0]) if shape else (0, 1)
        return _mapped(fd, path, info, a, b - a).clone().reshape(tuple(b - a for _ in shape))
    if transposed:
        lo, hi = swap_last(lo), swap_last(hi)
    out = torch.empty(_box(lo, hi), dtype=_dtype(info))
    rows, cols = shape[-2], shape[-1]
    for lead in itertools.product(*(range(a, b) for a, b in zip(lo[:-2], hi[:-2]))):
        base = _flat(lead, shape[:-2]) * rows
        block = _mapped(fd, path, info, (base + lo[-2]) * cols, (hi[-2] - lo[-2]) * cols)
        at = tuple(i - a for i, a in zip(lead, lo, strict=False))
        out[at] = block.view(hi[-2] - lo[-2], cols)[:, lo[-1] : hi[-1]]
    return out.transpose(-1, -2) if transposed else out


def write_transposed(
    path: Path, fd: int, info: TensorInfo, consumers, budget: int, stop: threading.Event
) -> None:
    """The writer's copy of one source tensor (in file `fd`, at least 2-D) to the transposed
    targets among its consumers ((Target, Piece) pairs, pieces in the targets' logical
    coordinates). Each source matrix (one index of its leading dims) is mapped once for
    every rank's bands that read it, and each band is copied once, transposed."""
    bands_of: dict[tuple[int, ...], list] = {}  # source matrix -> bands reading it
    for target, piece in consumers:
        for band_lo, band_hi in _target_bands(
            target, piece.dest, _box(piece.start, piece.stop), budget
        ):
            lo = tuple(s + a - d for s, a, d in zip(piece.start, band_lo, piece.dest, strict=True))
            hi = tuple(s + b - d for s, b, d in zip(piece.start, band_hi, piece.dest, strict=True))
            bands_of.setdefault(lo[:-2], []).append((target, band_lo, band_hi, lo, hi))
    rows, cols = info.shape[-2], info.shape[-1]
    for lead, bands in sorted(bands_of.items()):
        first = _flat(lead, info.shape[:-2]) * rows * cols
        matrix = _mapped(fd, path, info, first, rows * cols).view(rows, cols)
        for target, band_lo, band_hi, lo, hi in bands:
            if stop.is_set():
                return
            block = matrix[lo[-2] : hi[-2], lo[-1] : hi[-1]]
            _write_band(target, band_lo, band_hi, block.reshape(_box(band_lo, band_hi)))


def pull_transposed(job, budget: int, fds: dict, stop: threading.Event) -> None:
    """A pull (io/pull.py's PullJob) where the target or a part is stored transposed: the
    target in bands, each filled from the parts' boxes that meet it."""
    import torch

    target = job.target
    shape = target.tensor.logical_shape
    whole = tuple(0 for _ in shape)
    dtype = _dtype(job.parts[0].info)
    for band_lo, band_hi in _target_bands(target, whole, shape, budget):
        if stop.is_set():
            return
        band = torch.zeros(_box(band_lo, band_hi), dtype=dtype)
        for part in job.parts:
            p = part.piece  # part.info's [start:stop] is the target's [dest:...]
            end = tuple(d + b - a for d, a, b in zip(p.dest, p.start, p.stop, strict=True))
            lo = tuple(max(a, d) for a, d in zip(band_lo, p.dest, strict=True))
            hi = tuple(min(b, e) for b, e in zip(band_hi, end, strict=True))
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            src_lo = tuple(s + a - d for s, a, d in zip(p.start, lo, p.dest, strict=True))
            src_hi = tuple(s + b - d for s, b, d in zip(p.start, hi, p.dest, strict=True))
            box = read_box(fds[part.path], part.path, part.info, src_lo, src_hi, part.transposed)
            band[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, band_lo, strict=True))] = box
        _write_band(target, band_lo, band_hi, band)


def _box(lo: tuple[int, ...], hi: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(b - a for a, b in zip(lo, hi, strict=True))


def _target_bands(target: Target, dest, lens, budget: int):
    return bands(target.tensor.transposed, target.tensor.dtype, dest, lens, budget)


def bands(transposed: bool, dtype: str, dest: tuple[int, ...], lens: tuple[int, ...], budget: int):
    """(lo, hi) boxes, in a tensor's logical coordinates, covering its block at `dest` of
    `lens`: one index of every leading dim, and as many of the rows the file stores (the
    logical columns of a transposed tensor) as fit `budget` bytes."""
    along = len(lens) - 1 if transposed else len(lens) - 2  # the stored rows' logical dim
    other = lens[-2] if transposed else lens[-1]
    item = max(DTYPE_SIZES[dtype], 4)  # room for a cast from a wider source
    step = max(1, budget // max(1, other * item))
    for lead in itertools.product(*(range(d, d + n) for d, n in zip(dest[:-2], lens[:-2]))):
        for a in range(0, lens[along], step):
            lo = [*lead, dest[-2], dest[-1]]
            hi = [*(i + 1 for i in lead), dest[-2] + lens[-2], dest[-1] + lens[-1]]
            lo[along], hi[along] = dest[along] + a, dest[along] + min(a + step, lens[along])
            yield tuple(lo), tuple(hi)


def _write_band(target: Target, lo: tuple[int, ...], hi: tuple[int, ...], values) -> None:
    """Write values (target[lo:hi], logical coordinates) where the file stores them: whole
    stored rows, so one call."""
    from .tensor_bytes import tensor_bytes

    tensor = target.tensor
    if tensor.transposed:
        values, lo, hi = values.transpose(-1, -2), swap_last(lo), swap_last(hi)
    if (lo[-1], hi[-1]) != (0, tensor.shape[-1]):  # internal invariant: pieces hold whole rows
        raise AssertionError(f"{tensor.name}: band {lo}:{hi} is not whole stored rows")
    data = tensor_bytes(values.to(torch_dtypes()[tensor.dtype]).contiguous())
    start = sum(a * s for a, s in zip(lo, strides_of(tensor.shape), strict=True))
    start *= DTYPE_SIZES[tensor.dtype]
    pwrite_all(target.fd, data, target.offset + start, target.file)
    account(target, start, data)


def _mapped(fd: int, path: Path, info: TensorInfo, first: int, count: int) -> torch.Tensor:
    """Elements [first, first + count) of the tensor, as a tensor over a private mapping."""
    import torch

    item = DTYPE_SIZES[info.dtype]
    view = map_range(fd, info.begin + first * item, count * item, path, private=True)
    return torch.frombuffer(view, dtype=torch.uint8).view(_dtype(info))


def _dtype(info: TensorInfo):
    return torch_dtypes()[info.dtype]


def _flat(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    return sum(i * s for i, s in zip(index, strides_of(shape), strict=True)) if shape else 0
