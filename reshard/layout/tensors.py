"""What a plan writes, as plain values: pieces of source tensors, the output tensors they
fill and the files that hold them. Shared by the plan and the output formats."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dtypes import DTYPE_SIZES


@dataclass(frozen=True)
class Piece:
    """Copy the block source[start:stop] (per dim) to output[dest:dest + (stop - start)]."""

    source: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    dest: tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """An output format's tensor that stacks native tensors (vLLM's qkv_proj, w13_weight)
    holds the native tensor `name` (local `shape`) at offset `at`; `at` may have more dims
    than `shape` (experts stacked on a new leading dim)."""

    name: str
    shape: tuple[int, ...]
    at: tuple[int, ...]


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype written
    source_dtype: str
    shape: tuple[int, ...]  # local shape
    pieces: tuple[Piece, ...]
    padding: int  # zero rows appended along dim 0
    parts: tuple[Part, ...] = ()  # the native tensors it stacks (output formats only)
    fill: float | None = None  # a constant the format adds (vLLM's attention scales), no source
    # Stored with its last two dims swapped (vLLM's gpt-oss experts): `shape` is what the file
    # holds; pieces and parts place native bytes in the tensor as it reads untransposed
    # (`logical_shape`).
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return swap_last(self.shape) if self.transposed else self.shape


def swap_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape with its last two dims swapped (a transposed tensor's stored / logical shape)."""
    return (*shape[:-2], shape[-1], shape[-2])


@dataclass(frozen=True)
class OutFile:
    name: str
    rank: int
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
