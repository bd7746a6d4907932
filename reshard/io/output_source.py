"""A reshard output (a folder with manifest.json) as a source: the original checkpoint's
tensors, reassembled in row blocks from the rank files the manifest says hold them.

Each source tensor is read from one copy of each of its distinct blocks (replicas are never
read), one row block at a time. Each rank-file tensor used is hashed as it streams and
checked against the manifest by `check_hashes`, which reads only what the stream skipped
(vocab padding rows). Does not write anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from ..dtypes import DTYPE_SIZES, torch_dtypes
from ..errors import OutputError
from ..headers import Header, TensorInfo, read_header
from ..models.hparams import parse_hparams
from .files import io_error
from .manifest import MANIFEST, read_sealed_manifest
from .manifest_value import Manifest
from .output_jobs import rank_tensor_jobs
from .pull import pull_jobs
from .scatter import preadv_exact
from .source import Source, open_source

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 64 << 20


def open_model(model: str, *, allow_pickle: bool = False, scratch: Path | None = None) -> Source:
    """MODEL as `open_source` takes it, or a reshard output folder (it holds manifest.json)."""
    path = Path(model).expanduser()
    if (path / MANIFEST).is_file() or any(path.glob("rank-*.safetensors*")):
        return open_output_source(path)  # without a manifest: refused as incomplete
    return open_source(model, allow_pickle=allow_pickle, scratch=scratch)


def is_output(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class Block:
    """Source rows/cols start:stop live in rank file `file`, tensor `tensor`, at `dest`."""

    file: str
    tensor: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    dest: tuple[int, ...]


def open_output_source(out_dir: Path) -> Source:
    """Validate OUT (manifest and its seal, every file present with its size and header) and
    describe the original checkpoint's tensors, in the original's file order, as a virtual
    Source."""
    sealed = read_sealed_manifest(out_dir)  # before a byte is read through it
    manifest = sealed.doc  # walked by this module's helpers
    where = str(Path(out_dir) / MANIFEST)
    record = sealed.source
    files = record.get("files") or []
    if not files or any("tensors" not in f for f in files):
        raise OutputError(
            f"{where}: has no per-file tensor list in 'source' (written by an older reshard), "
            "so the original tensor order is unknown. Convert from the original model instead."
        )
    headers = _row_views(_check_rank_files(Path(out_dir), manifest), manifest)
    blocks = _collect_blocks(manifest)
    config = manifest["config"]
    hp = parse_hparams(config, where=where)
    reader = OutputReader(Path(out_dir).resolve(), sealed, blocks, headers)
    virtual = _virtual_headers(Path(out_dir), manifest, blocks, headers)
    tensors = {n: (h, i) for h in virtual for n, i in h.tensors.items()}
    _check_tiling(where, manifest, blocks, tensors)
    return Source(
        str(out_dir), Path(out_dir).resolve(), record.get("repo_id"), record.get("revision"),
        config, hp, virtual, tensors, bool(record.get("pickle")), reader,
    )  # fmt: skip


def _check_rank_files(out_dir: Path, manifest: dict) -> dict[str, Header]:
    """Every rank file present, with the recorded size and header hash (exit 2 otherwise)."""
    headers = {}
    for name, meta in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise OutputError(
                f"{path}: missing (rank {meta['rank']}), so {out_dir} is not a complete reshard "
                "output. Copy the whole folder, or convert from the original model."
            )
        size = path.stat().st_size
        if size != meta["size"]:
            raise OutputError(
                f"{path}: {size} bytes, the manifest says {meta['size']} (rank {meta['rank']}). "
                "The file is truncated or altered; re-copy it, or convert from the original."
            )
        header = read_header(path)
        with open(path, "rb") as f:
            digest = xxhash.xxh3_128(f.read(header.data_start)).hexdigest()
        if digest != meta["header_xxh3_128"]:
            raise OutputError(
                f"{path}: header hash {digest} != manifest {meta['header_xxh3_128']}: the header "
                "was altered. Re-copy the file, or convert from the original model."
            )
        headers[name] = header
    return headers


def _collect_blocks(manifest: dict) -> dict[str, list[Block]]:
    """Per source tensor, one block per distinct box: replicas (kv heads, redundant experts,
    DP ranks, a tied lm_head on the last stage) come from the first rank that holds them."""
    blocks: dict[str, dict[tuple, Block]] = {}
    for entry in manifest["ranks"]:
        if entry.get("replica_of") is not None:
            continue
        for out_name, meta in entry["tensors"].items():
            for p in meta["pieces"]:
                box = (tuple(p["start"]), tuple(p["stop"]))
                dest = _flat_dest(p["dest"], meta["shape"], len(p["start"]))
                block = Block(meta["file"], out_name, *box, dest)
                blocks.setdefault(p["source"], {}).setdefault(box, block)
    return {name: list(boxes.values()) for name, boxes in blocks.items()}


def _flat_dest(dest: list[int], shape: list[int], ndim: int) -> tuple[int, ...]:
    """A block stacked at fixed leading indices of its tensor (a format's experts): its place
    in the tensor seen as rows of the block's own width (the leading dims merged)."""
    lift = len(dest) - ndim
    if lift <= 0 or not ndim:
        return tuple(dest)
    row = 0
    for d, n in zip(dest[: lift + 1], shape[: lift + 1], strict=True):
        row = row * n + d
    return (row, *dest[lift + 1 :])


def _row_views(headers: dict[str, Header], manifest: dict) -> dict[str, Header]:
    """Stacked rank-file tensors seen with their leading dims merged, as _flat_dest places
    blocks in them (same bytes, so hashes and offsets are unchanged)."""
    for entry in manifest["ranks"]:
        for name, meta in (entry.get("tensors") or {}).items():
            lift = max((len(p["dest"]) - len(p["start"]) for p in meta["pieces"]), default=0)
            if lift > 0:
                info = headers[meta["file"]].tensors[name]
                merged = (math.prod(info.shape[: lift + 1]), *info.shape[lift + 1 :])
                headers[meta["file"]].tensors[name] = replace(info, shape=merged)
    return headers


def _virtual_headers(out_dir: Path, manifest: dict, blocks, headers) -> tuple[Header, ...]:
    """The original's files and tensors, in its order; a tensor's dtype is what the rank files
    hold (the recipe's cast, if any). Offsets are virtual: nothing opens these paths."""
    virtual = []
    for f in manifest["source"]["files"]:
        infos, cursor = {}, 0
        for name, dtype, shape in f["tensors"]:
            if name in blocks:
                first = blocks[name][0]
                dtype = headers[first.file].tensors[first.tensor].dtype
            end = cursor + DTYPE_SIZES[dtype] * math.prod(shape)
            infos[name] = TensorInfo(name, dtype, tuple(shape), cursor, end)
            cursor = end
        virtual.append(Header(out_dir / f["name"], cursor, 0, infos, {}))
    return tuple(virtual)


def _check_tiling(where: str, manifest: dict, blocks, tensors) -> None:
    """The distinct blocks of each tensor tile it exactly; every tensor not dropped has some."""
    dropped = set(manifest.get("dropped", []))
    for name, (_, info) in tensors.items():
        found = blocks.get(name, [])
        if name in dropped and not found:
            continue
        volume = sum(math.prod(b - a for a, b in zip(k.start, k.stop)) for k in found)
        if volume != info.numel or (len(found) <= 64 and _overlap(found)):
            raise OutputError(
                f"{where}: the rank files hold {volume} of the {info.numel} elements of source "
                f"tensor '{name}' (or overlapping blocks). The manifest is inconsistent; "
                "convert from the original model."
            )
    extra = sorted(set(blocks) - set(tensors))
    if extra:
        raise OutputError(
            f"{where}: pieces come from '{extra[0]}', which is not in the source record. The "
            "manifest is inconsistent; convert from the original model."
        )


def _overlap(found: list[Block]) -> bool:
    for i, a in enumerate(found):
        for b in found[i + 1 :]:
            if all(
                max(a0, b0) < min(a1, b1)
                for a0, a1, b0, b1 in zip(a.start, a.stop, b.start, b.stop)
            ):
                return True
    return False


class OutputReader:
    """Reads row blocks of source tensors out of the rank files (see the module docstring)."""

    def __init__(self, out_dir: Path, manifest: Manifest, blocks, headers: dict[str, Header]):
        self.out_dir = out_dir
        self.manifest = manifest
        self.blocks = blocks
        self.headers = headers
        self.hashers: dict[tuple[str, str], list] = {}  # (file, tensor) -> [xxh3, bytes hashed]
        # Rows on their way to a gather, for the torch block reader below (read_block);
        # re-layout, export and verify use the byte path (io/output_jobs.py)
        # and never import torch.
        self.scratch = None

    def byte_jobs(self, source: Source, consumers: dict[str, list]) -> list:
        """The writer's jobs for these consumers (source tensor -> (target, piece) pairs):
        each target pulled from the rank-file tensors, each of those hashed (io/pull.py)."""
        return pull_jobs(self, consumers)

    def check_reads(self, source: Source, consumers: dict[str, list]) -> list[tuple]:
        """The rank-file tensors holding the consumers' pieces, each with its manifest hash."""
        return rank_tensor_jobs(self, consumers)

    def file_digests(self, source: Source) -> list[list]:
        """[name, size, digest] per original file: the hash of this output's manifest file,
        whose hashes cover every byte of its rank files."""
        digest = self.source_record(source)["made_from"]["manifest_file_xxh3_128"]
        return [[h.path.name, h.size, digest] for h in source.headers]

    def describe(self, files: int) -> str:
        return f"the manifest of a reshard output ({files} original files; no weights read)"

    def reads_from(self, folder: Path) -> bool:
        return self.out_dir == folder

    def source_record(self, source: Source) -> dict[str, Any]:
        """The original's record, carried over, plus the output the bytes were read from."""
        record = dict(self.manifest.source)
        made_from = {
            "path": str(self.out_dir),
            "manifest_file_xxh3_128": xxhash.xxh3_128(
                (self.out_dir / MANIFEST).read_bytes()
            ).hexdigest(),
            "layout": self.manifest.layout.degrees,
        }
        if record.get("made_from"):
            made_from["made_from"] = record["made_from"]
        record["made_from"] = made_from
        return record

    def read_block(self, name: str, info: TensorInfo, index: tuple) -> torch.Tensor:
        """tensor[index] for an index of slices whose first one picks rows (verify's reads)."""
        if not index:
            return self._assemble(name, info, 0, max(info.shape[0], 1) if info.shape else 1)
        rows = index[0]
        a, b = rows.start or 0, info.shape[0] if rows.stop is None else rows.stop
        return self._assemble(name, info, a, b)[(slice(None), *index[1:])]

    def _assemble(self, name: str, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        import torch

        shape = info.shape or (1,)
        dtype = torch_dtypes()[info.dtype]
        buf = torch.empty((b - a, *shape[1:]), dtype=dtype)
        groups: dict[tuple[str, str], list[Block]] = {}
        for block in self.blocks.get(name, []):
            if not info.shape or (block.start[0] < b and block.stop[0] > a):
                groups.setdefault((block.file, block.tensor), []).append(block)
        for key, blocks in groups.items():
            self._copy_group(key, blocks, buf, a, b, bool(info.shape))
        return buf

    def _copy_group(self, key, blocks: list[Block], buf: torch.Tensor, a: int, b: int, has_rows):
        """Read the rank-file rows these blocks need once, and put each block into buf."""
        out = self.headers[key[0]].tensors[key[1]]
        if not has_rows:  # a scalar
            self._read_rows(key, out, 0, 1, into=buf.view(-1))
            return
        spans = [(k.dest[0] + max(a, k.start[0]) - k.start[0], k) for k in blocks]
        if len(spans) == 1 and _whole_rows(spans[0][1], out, buf):
            d, k = spans[0]  # whole rows to whole rows: read straight into buf
            lo, hi = max(a, k.start[0]), min(b, k.stop[0])
            self._read_rows(key, out, d, d + hi - lo, into=buf[lo - a : hi - a])
            return
        r0 = min(d for d, _ in spans)
        r1 = max(d + min(b, k.stop[0]) - max(a, k.start[0]) for d, k in spans)
        rows = self._read_rows(key, out, r0, r1)
        for d, k in spans:
            lo, hi = max(a, k.start[0]), min(b, k.stop[0])
            src = (slice(d - r0, d - r0 + hi - lo),) + tuple(
                slice(o, o + e - s) for o, s, e in zip(k.dest[1:], k.start[1:], k.stop[1:])
            )
            dst = (slice(lo - a, hi - a),) + tuple(
                slice(s, e) for s, e in zip(k.start[1:], k.stop[1:])
            )
            buf[dst] = rows[src]

    def _read_rows(self, key, out: TensorInfo, r0: int, r1: int, into=None) -> torch.Tensor:
        """Rows r0:r1 of a rank-file tensor, into `into` (contiguous) or a reused scratch
        buffer, hashed on the way when read in order."""
        import torch

        from .tensor_bytes import tensor_bytes

        shape = out.shape or (1,)
        row_bytes = out.nbytes // shape[0] if shape[0] else 0
        n = (r1 - r0) * row_bytes
        if into is None:
            if self.scratch is None or self.scratch.numel() < n:
                self.scratch = torch.empty(n, dtype=torch.uint8)
            into = self.scratch[:n].view(torch_dtypes()[out.dtype]).view(r1 - r0, *shape[1:])
        data = tensor_bytes(into)
        _read_exact(self.out_dir / key[0], data, out.begin + r0 * row_bytes)
        state = self.hashers.setdefault(key, [xxhash.xxh3_128(), 0])
        if state[1] == r0 * row_bytes:
            state[0].update(data)
            state[1] += n
        return into

    def check_hashes(self) -> None:
        """Every rank-file tensor read so far matches its manifest hash (the unread rest, e.g.
        padding rows or rows read out of order, is read now). Raises OutputError (exit 2)."""
        entries = self.manifest.tensor_entries()
        for key, (hasher, hashed) in sorted(self.hashers.items()):
            out = self.headers[key[0]].tensors[key[1]]
            path = self.out_dir / key[0]
            with open(path, "rb") as f:
                f.seek(out.begin + hashed)
                left = out.nbytes - hashed
                while left:
                    data = f.read(min(left, CHUNK_BYTES))
                    hasher.update(data)
                    left -= len(data)
            want = entries[key]["xxh3_128"]
            if hasher.hexdigest() != want:
                raise OutputError(
                    f"{path}: tensor '{key[1]}' hash {hasher.hexdigest()} != manifest {want}: "
                    "the output is corrupt. Re-copy it, or convert from the original model."
                )
        self.hashers.clear()


def _whole_rows(block: Block, out: TensorInfo, buf: torch.Tensor) -> bool:
    """The block is whole rows of the source, stored as whole rows of the rank-file tensor."""
    full = tuple(buf.shape[1:])
    return (
        not any(block.start[1:])
        and not any(block.dest[1:])
        and tuple(block.stop[1:]) == full
        and tuple(out.shape[1:]) == full
        and torch_dtypes()[out.dtype] == buf.dtype
    )


def _read_exact(path: Path, view: memoryview, offset: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = preadv_exact(fd, [view], offset)
            if got < len(view):
                raise OutputError(
                    f"{path}: ended at {offset + got} bytes while reading {len(view)} at "
                    f"{offset}. The file shrank while being read; re-copy it."
                )
        finally:
            os.close(fd)
    except OSError as e:
        raise io_error(e, path) from None
