"""A Hugging Face checkpoint folder as a tensor source (io/source.py's TensorSource): its
safetensors files are read where they lie, one job per needed tensor in file order, and the
manifest records the files as they are. The other kind is a reshard output
(io/output_source.py's OutputReader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from ..headers import Header
from .files import io_call, io_error
from .writer import Job

if TYPE_CHECKING:  # a type only: source.py builds an HfFolder into each Source it opens
    import torch

    from .source import Source


class HfFolder:
    """Reads the checkpoint's own files; nothing to check beyond their headers."""

    def byte_jobs(self, source: Source, consumers: dict[str, list]) -> list[Job]:
        """The writer's jobs: one per needed tensor, in file then offset order."""
        return [
            Job(path, info, pairs) for path, info, pairs, _ in self.check_reads(source, consumers)
        ]

    def check_reads(self, source: Source, consumers: dict[str, list]) -> list[tuple]:
        """(file, TensorInfo, its consumers, None: no recorded hash) per needed tensor."""
        return [
            (header.path, info, tuple(consumers[info.name]), None)
            for header in source.headers
            for info in header.tensors.values()
            if info.name in consumers
        ]

    def stored_transposed(self, name: str) -> bool:
        return False  # a checkpoint's tensors are as its header says

    def read_box(self, source: Source, name: str, lo: tuple, hi: tuple) -> torch.Tensor:
        """tensor[lo:hi] (per dim), from the file that holds it."""
        from .transposed import read_box

        header, info = source.tensors[name]
        fd = io_call(os.open, header.path, os.O_RDONLY, path=header.path)
        try:
            return read_box(fd, header.path, info, lo, hi)
        finally:
            os.close(fd)

    def source_record(self, source: Source) -> dict[str, Any]:
        """The manifest's `source`: each file lists its tensors in file order, so an output
        can stand in for its source (re-layout, export)."""
        return {
            "model": source.model,
            "path": str(source.path),
            "repo_id": source.repo_id,
            "revision": source.revision,
            "pickle": source.pickle,
            "files": [
                {
                    "name": h.path.name,
                    "size": h.size,
                    "tensors": [[t.name, t.dtype, list(t.shape)] for t in h.tensors.values()],
                }
                for h in source.headers
            ],
        }

    def file_digests(self, source: Source) -> list[list]:
        """[name, size, header hash] per file: what --resume checks of the source bytes."""
        return [[h.path.name, h.size, header_digest(h)] for h in source.headers]

    def describe(self, files: int) -> str:
        return f"safetensors headers ({files} file{'s' if files > 1 else ''}; no weights read)"

    def reads_from(self, folder: Path) -> bool:
        """Converting into the checkpoint's own folder is the ownership rules' to refuse."""
        return False


def header_digest(header: Header) -> str:
    """xxh3-128 of a source file's first 8 + N bytes (its safetensors header): with the size,
    what --resume checks of the source bytes (tensor data is not re-read)."""
    try:
        with open(header.path, "rb") as f:
            return xxhash.xxh3_128(f.read(header.data_start)).hexdigest()
    except OSError as e:
        raise io_error(e, header.path) from None
