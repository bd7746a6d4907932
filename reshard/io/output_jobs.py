"""A reshard output as a source, on the byte path: every piece asked of an original tensor is
re-aimed at the rank-file tensors that hold it, so re-layout, export and verify copy (or
compare) rank-file bytes exactly as convert copies source bytes: windows in file order,
kernel copies for contiguous runs, one gather for split rows, no torch.

A block of the manifest says: source[start:stop] lives in rank tensor R at dest. A piece asks
for source[ps:pe] at output dest pd. Their overlap [lo, hi) is R[dest + lo - start, ...] and
goes to output[pd + lo - ps, ...]: a piece of R, in the writer's own terms. Each rank tensor
read carries its manifest hash, checked as its bytes stream (every byte, padding included).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError
from ..layout.tensors import Piece

if TYPE_CHECKING:  # a type only: the reader builds its jobs through this module
    from .output_source import OutputReader


def rank_tensor_jobs(reader: OutputReader, consumers: dict[str, list[tuple[Any, Piece]]]) -> list:
    """[(rank file path, its TensorInfo, ((target, piece of the rank tensor), ...), xxh3 the
    manifest records)] for every rank tensor some consumer needs, in file then offset order.
    `reader`: its blocks, headers, manifest and out_dir; `consumers`:
    original tensor name -> (target, piece of the original) pairs, targets passed through."""
    found: dict[tuple[str, str], list] = {}
    for name, pairs in consumers.items():
        for block in reader.blocks.get(name, []):
            for target, piece in pairs:
                part = overlap_piece(block, piece)
                if part is not None:
                    found.setdefault((block.file, block.tensor), []).append((target, part))
    hashes = {key: e["xxh3_128"] for key, e in reader.manifest.tensor_entries().items()}
    jobs = []
    for file, tensor in found:
        info = reader.headers[file].tensors[tensor]
        jobs.append((Path(reader.out_dir) / file, info, found[file, tensor], hashes[file, tensor]))
    jobs.sort(key=lambda job: (job[0].name, job[1].begin))
    return [(path, info, tuple(pairs), digest) for path, info, pairs, digest in jobs]


def overlap_piece(block: Any, piece: Piece) -> Piece | None:
    """The part of `piece` that `block` holds, as a piece of the block's rank tensor (None:
    they do not meet). A scalar (no dims) always meets."""
    lo = [max(a, b) for a, b in zip(piece.start, block.start, strict=True)]
    hi = [min(a, b) for a, b in zip(piece.stop, block.stop, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return None
    start = tuple(d + a - s for d, a, s in zip(block.dest, lo, block.start, strict=True))
    stop = tuple(s + b - a for s, a, b in zip(start, lo, hi, strict=True))
    lift = len(piece.dest) - len(piece.start)  # a format stacking experts: fixed leading dims
    moved = (d + a - s for d, a, s in zip(piece.dest[lift:], lo, piece.start, strict=True))
    return Piece(block.tensor, start, stop, (*piece.dest[:lift], *moved))


def whole_piece(name: str, shape: tuple[int, ...]) -> Piece:
    """All of a tensor, to the same place (export: each original tensor whole)."""
    zeros = (0,) * len(shape)
    return Piece(name, zeros, tuple(shape), zeros)


def check_digest(path: Path, name: str, got: str, want: str) -> None:
    """A rank-file tensor read as a source has the hash its manifest records (else exit 2)."""
    if got != want:
        raise OutputError(
            f"{path}: tensor '{name}' hash {got} != manifest {want}: the output is corrupt. "
            "Re-copy it, or convert from the original model."
        )
