"""`reshard export`: a reshard output back to a standard Hugging Face checkpoint.

Every tensor of the original gets its name, shape and bytes back (padding rows dropped,
replicas read once, a tied lm_head absent as in the original), in the original's order, in
`model-0000X-of-0000N.safetensors` files of at most --max-shard-size. On convert's byte path
(io/writer.write_files): each original tensor is one target whose pieces are re-aimed at the
rank-file tensors holding them; no torch. Shards are `.partial` until every rank-file hash has
checked out, and the index is written last. A quantized output gives back its stored parts
(packed weights, scales) byte for byte: they are tensors like any other here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .headers import TensorInfo
from .io.commit import hold_interrupts
from .io.files import write_atomic
from .io.out_dir import RECORD_FORMAT, RECORD_VERSION, check_unfinished, claim_folder, lock_out_dir
from .io.output_jobs import whole_piece
from .io.output_source import OutputReader, open_output_source
from .io.source import INDEX, Source
from .io.writer import FileSpec, write_files
from .layout.tensors import OutTensor

DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default


@dataclass(frozen=True)
class ExportResult:
    hf_dir: Path
    files: tuple[str, ...]
    tensors: int
    bytes_written: int
    seconds: float
    cast: tuple[str, ...]  # tensors whose dtype differs from the original's (a convert cast)


def split_shards(infos: list[TensorInfo], max_size: int) -> list[list[TensorInfo]]:
    """Greedy in order, as save_pretrained does: a new file when the next tensor would pass
    max_size (a tensor larger than max_size gets a file of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def export_output(
    out_dir: Path,
    hf_dir: Path,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    workers: int | None = None,
) -> ExportResult:
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    source = open_output_source(Path(out_dir))
    _check_hf_dir(hf_dir, source, force=force)
    infos = _exported_tensors(source)
    shards = split_shards(infos, max_shard_size)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    with lock_out_dir(hf_dir):  # like convert: one writer, and only its own files go
        claim_folder(hf_dir, _export_record(names, source), force=force)
        _write_checkpoint(source, hf_dir, names, shards, workers)
    return ExportResult(
        hf_dir, tuple(names), len(infos), sum(i.nbytes for i in infos),
        time.perf_counter() - start, _cast_tensors(source, infos),
    )  # fmt: skip


def _export_record(names: list[str], source: Source) -> dict:
    """The files export owns in HF_DIR (reshard/io/out_dir.py's record, without a plan)."""
    owned = [*names, *(p.name for p in source.side_files()), INDEX]
    return {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "files": sorted(owned)}


def _write_checkpoint(source: Source, hf_dir: Path, names: list[str], shards, workers) -> None:
    """The shards in one pass (renamed only once every rank-file hash checked out), then the
    side files, then the index."""
    specs = [
        FileSpec(name, tuple(_whole_tensor(i) for i in shard), {"format": "pt"})
        for name, shard in zip(names, shards, strict=True)
    ]
    write_files(specs, source, hf_dir, workers=workers)  # renames, then fsyncs the folder
    for side in source.side_files():
        write_atomic(hf_dir / side.name, side.read_bytes())
    with hold_interrupts(hf_dir):  # the index is the commit: Ctrl-C now says it happened
        write_atomic(hf_dir / INDEX, _index_json(names, shards))


def _exported_tensors(source: Source) -> list[TensorInfo]:
    """The original's tensors in its order, less those convert dropped as derivable."""
    blocks = _reader(source).blocks
    return [info for name, (_, info) in source.tensors.items() if name in blocks]


def _cast_tensors(source: Source, infos: list[TensorInfo]) -> tuple[str, ...]:
    files = _reader(source).manifest.source_files
    original = {name: dtype for f in files for name, dtype, _ in f["tensors"]}
    return tuple(i.name for i in infos if original[i.name] != i.dtype)


def _reader(source: Source) -> OutputReader:
    assert isinstance(source.reader, OutputReader)  # open_output_source made it
    return source.reader


def _check_hf_dir(hf_dir: Path, source: Source, *, force: bool) -> None:
    if hf_dir.resolve() == source.path:
        raise InputError(
            f"{hf_dir}: is the reshard output being exported; write the checkpoint elsewhere "
            "with -o."
        )
    check_unfinished(hf_dir, force=force)  # a reshard output or a checkpoint: --force only


def _whole_tensor(info: TensorInfo) -> OutTensor:
    """An original tensor, whole, as the writer's target: its one piece is all of it."""
    piece = whole_piece(info.name, info.shape)
    return OutTensor(info.name, info.dtype, info.dtype, info.shape, (piece,), 0)


def _index_json(names: list[str], shards: list[list[TensorInfo]]) -> bytes:
    weight_map = {i.name: name for name, shard in zip(names, shards) for i in shard}
    total = sum(i.nbytes for shard in shards for i in shard)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, indent=2) + "\n").encode()
