"""Read and write safetensors headers without touching tensor data.

Validation follows the reference implementation's rules (header size bound, strict UTF-8 JSON,
known dtypes, contiguous offsets from 0 with no gaps or overlaps, exact byte lengths, file size
agreement) and adds what it lets through: duplicate names and odd tensor names. Every error
names the file. Tensor data is never read here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import DTYPE_SIZES
from .errors import CheckpointError, ReshardIOError
from .strict_json import load_json

MAX_HEADER = 100_000_000
U64 = 1 << 64  # the reference reads shapes and offsets as u64 and checks their products
REEXPORT = "The file is corrupt or was written by a buggy tool; re-download or re-export it."
ALIGN = 8  # output headers are padded with spaces so data starts 8-byte aligned


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and fully validate the header of one safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file (needs an "
                    "8-byte header length). The file is truncated; re-download it."
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER}-byte limit. "
                    "Not a safetensors file, or corrupt; re-download it."
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes). "
                    "The file is truncated; re-download it."
                )
            raw = f.read(n)
    except OSError as e:
        raise ReshardIOError(
            f"{path}: cannot read ({e.strerror}). Check the file's permissions and that the "
            "disk is mounted."
        ) from None
    doc = load_json(raw, path, what="the safetensors header", fix=REEXPORT)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object. {REEXPORT}")
    return _validate(path, size, 8 + n, doc)


def _validate(path: Path, size: int, data_start: int, doc: dict) -> Header:
    metadata = doc.pop("__metadata__", None)
    if metadata is None:  # absent or null; a falsy [] or "" is still an error
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: __metadata__ must map strings to strings, got {_short(metadata)}. "
            "The file is corrupt; re-export it."
        )
    infos = [_parse_entry(path, data_start, name, entry) for name, entry in doc.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in infos:
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor '{t.name}' starts at data offset {t.begin - data_start}, "
                f"expected {cursor - data_start}: it {what}. The file is corrupt; re-export it."
            )
        cursor = t.end
    if cursor != size:
        raise CheckpointError(
            f"{path}: the header describes {cursor} bytes but the file has {size}. "
            "The file is truncated or has trailing bytes; re-download it."
        )
    return Header(path, size, data_start, {t.name: t for t in infos}, dict(metadata))


def _parse_entry(path: Path, data_start: int, name: str, entry) -> TensorInfo:
    if not name or not name.isprintable() or name != name.strip():
        raise CheckpointError(
            f"{path}: tensor name {name!r} is empty or has odd characters. The file is corrupt "
            "or was written by a buggy tool; re-export it."
        )
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{path}: tensor '{name}': header entry is not an object. The file is corrupt; "
            "re-export it."
        )
    dtype = _entry_field(path, name, entry, "dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{path}: tensor '{name}' has unknown dtype {_short(dtype)}; known: "
            f"{', '.join(DTYPE_SIZES)}. The file is corrupt or uses a dtype reshard does not "
            "know; re-export it."
        )
    shape = _u64_list(path, name, entry, "shape")
    offsets = _u64_list(path, name, entry, "data_offsets")
    if len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{path}: tensor '{name}' has bad data_offsets {_short(offsets)}: expected "
            f"[begin, end] with begin <= end. {REEXPORT}"
        )
    nbytes = _checked_nbytes(path, name, shape, dtype)
    if nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(
            f"{path}: tensor '{name}' shape {shape} x {dtype} needs "
            f"{nbytes} bytes but its offsets span {offsets[1] - offsets[0]}. "
            "The file is corrupt; re-export it."
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _entry_field(path: Path, name: str, entry: dict, key: str):
    if key not in entry:
        raise CheckpointError(f"{path}: tensor '{name}' has no '{key}' field. {REEXPORT}")
    return entry[key]


def _u64_list(path: Path, name: str, entry: dict, key: str) -> list[int]:
    """A list of integers in [0, 2^64), as the reference's Vec<usize> reads them."""
    value = _entry_field(path, name, entry, key)
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < U64 for v in value):
        raise CheckpointError(
            f"{path}: tensor '{name}' has a bad {key} {_short(value)}: expected a list of "
            f"integers from 0 to 2^64-1. {REEXPORT}"
        )
    return value


def _checked_nbytes(path: Path, name: str, shape: list[int], dtype: str) -> int:
    """Byte length, refusing what overflows u64 in the reference: it multiplies the dims left
    to right (stopping at the first overflow, even when a later dim is 0), then by the bits
    per element."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= U64:
            break
    if numel >= U64 or numel * DTYPE_SIZES[dtype] * 8 >= U64:
        raise CheckpointError(
            f"{path}: tensor '{name}' shape {_short(shape)} x {dtype} overflows a 64-bit byte "
            f"count. {REEXPORT}"
        )
    return numel * DTYPE_SIZES[dtype]


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
    """Build a header for tensors written back to back in the given order.

    Returns (header bytes including the 8-byte length, data offsets relative to data start).
    """
    doc: dict = {"__metadata__": metadata} if metadata else {}
    offsets = []
    cursor = 0
    for name, dtype, shape in entries:
        end = cursor + math.prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, end]}
        offsets.append((cursor, end))
        cursor = end
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


def pread_exact(fd: int, n: int, offset: int, path: Path) -> bytearray:
    """Read exactly n bytes at offset, or fail naming the file."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        chunk = os.preadv(fd, [view[got:]], offset + got)
        if chunk == 0:
            raise CheckpointError(
                f"{path}: ended after {offset + got} bytes while reading {n} bytes at offset "
                f"{offset}. The file shrank or is truncated; re-download it."
            )
        got += chunk
    return buf  # a bytearray is writable, so torch.frombuffer takes it without a warning
