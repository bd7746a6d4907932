"""`reshard export`: a reshard output back to a standard Hugging Face checkpoint.

Every tensor of the original gets its name, shape and bytes back (padding rows dropped,
replicas read once, a tied lm_head absent as in the original), in the original's order, in
`model-0000X-of-0000N.safetensors` files of at most --max-shard-size. Streaming: one row
block at a time; shards are `.partial` until every rank-file hash has checked out, and the
index is written last. A quantized output gives back its stored parts (packed weights,
scales) byte for byte: they are tensors like any other here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .io.commit import hold_interrupts
from .io.headers import TensorInfo, encode_header
from .io.out_dir import RECORD_FORMAT, RECORD_VERSION, check_unfinished, claim_folder, lock_out_dir
from .io.output_source import CHUNK_BYTES, open_output_source
from .io.source import INDEX, Source
from .io.tensor_bytes import reused_buffer, tensor_bytes
from .io.writer import fsync_dir, io_error, partial_path, write_atomic

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
    out_dir: Path, hf_dir: Path, *, max_shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False
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
        _write_checkpoint(source, hf_dir, names, shards)
    return ExportResult(
        hf_dir, tuple(names), len(infos), sum(i.nbytes for i in infos),
        time.perf_counter() - start, _cast_tensors(source, infos),
    )  # fmt: skip


def _export_record(names: list[str], source: Source) -> dict:
    """The files export owns in HF_DIR (reshard/io/out_dir.py's record, without a plan)."""
    owned = [*names, *(p.name for p in source.side_files()), INDEX]
    return {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "files": sorted(owned)}


def _write_checkpoint(source: Source, hf_dir: Path, names: list[str], shards) -> None:
    alloc = reused_buffer()  # one block at a time: written before the next is read
    for name, shard in zip(names, shards, strict=True):
        _write_shard(source, hf_dir / name, shard, alloc)
    source.reader.check_hashes()  # before anything is committed
    for name in names:
        _call(os.replace, partial_path(hf_dir / name), hf_dir / name, path=hf_dir / name)
    fsync_dir(hf_dir)
    for side in source.side_files():
        write_atomic(hf_dir / side.name, side.read_bytes())
    with hold_interrupts(hf_dir):  # the index is the commit: Ctrl-C now says it happened
        write_atomic(hf_dir / INDEX, _index_json(names, shards))


def _exported_tensors(source: Source) -> list[TensorInfo]:
    """The original's tensors in its order, less those convert dropped as derivable."""
    return [info for name, (_, info) in source.tensors.items() if name in source.reader.blocks]


def _cast_tensors(source: Source, infos: list[TensorInfo]) -> tuple[str, ...]:
    original = {
        name: dtype
        for f in source.reader.manifest["source"]["files"]
        for name, dtype, _ in f["tensors"]
    }
    return tuple(i.name for i in infos if original[i.name] != i.dtype)


def _check_hf_dir(hf_dir: Path, source: Source, *, force: bool) -> None:
    if hf_dir.resolve() == source.path:
        raise InputError(
            f"{hf_dir}: is the reshard output being exported; write the checkpoint elsewhere "
            "with -o."
        )
    check_unfinished(hf_dir, force=force)  # a reshard output or a checkpoint: --force only


def _write_shard(source: Source, path: Path, shard: list[TensorInfo], alloc) -> None:
    entries = [(i.name, i.dtype, i.shape) for i in shard]
    header, offsets = encode_header(entries, {"format": "pt"})
    tmp = partial_path(path)
    fd = _call(os.open, tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644, path=tmp)
    try:
        _pwrite(fd, memoryview(header), 0, tmp)
        # Full size up front: on ext4, extending writes cost ~10x writes into a sized file.
        _call(os.ftruncate, fd, len(header) + (offsets[-1][1] if offsets else 0), path=tmp)
        for info, (begin, _) in zip(shard, offsets, strict=True):
            _write_tensor(source, fd, tmp, info, len(header) + begin, alloc)
        _call(os.fsync, fd, path=tmp)
    finally:
        os.close(fd)


def _write_tensor(source: Source, fd: int, path: Path, info: TensorInfo, offset: int, alloc):
    """Whole rows of the original are contiguous bytes: one pwrite per row block."""
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    for a, _, rows in source.reader.iter_rows(info.name, info, CHUNK_BYTES, alloc=alloc):
        _pwrite(fd, tensor_bytes(rows.contiguous()), offset + a * row_bytes, path)


def _index_json(names: list[str], shards: list[list[TensorInfo]]) -> bytes:
    weight_map = {i.name: name for name, shard in zip(names, shards) for i in shard}
    total = sum(i.nbytes for shard in shards for i in shard)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _pwrite(fd: int, data: memoryview, offset: int, path: Path) -> None:
    data = data.cast("B")
    while len(data):
        n = _call(os.pwrite, fd, data, offset, path=path)
        data, offset = data[n:], offset + n


def _call(fn, *args, path: Path):
    try:
        return fn(*args)
    except OSError as e:
        raise io_error(e, path) from None
