"""A reshard output (a folder with manifest.json) as a source: the original checkpoint's
tensors, reassembled in row blocks from the rank files the manifest says hold them.

Each source tensor is read from one copy of each of its distinct blocks (replicas are never
read): on the byte path by io/pull.py and io/output_jobs.py, or as torch boxes by `read_box`
(verify's reads of a rank tensor stored transposed), which hashes each rank tensor whole
against the manifest before it uses a byte of it. Does not write anything.
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
from .files import io_call
from .manifest import MANIFEST, read_sealed_manifest
from .manifest_value import Manifest
from .output_jobs import check_digest, rank_tensor_jobs
from .pull import pull_jobs
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
        self.checked: set[tuple[str, str]] = set()  # (file, tensor) read_box found whole
        self.entries = manifest.tensor_entries()  # (file, tensor) -> its manifest entry
        # the rank tensors stored transposed (OutTensor.transposed)
        self.transposed = frozenset(k for k, meta in self.entries.items() if meta.get("transposed"))

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

    def stored_transposed(self, name: str) -> bool:
        """True when some of the source tensor's bytes lie in a rank tensor stored transposed
        (read them with read_box, not as byte runs)."""
        return any((b.file, b.tensor) in self.transposed for b in self.blocks.get(name, []))

    def read_box(self, source: Source, name: str, lo: tuple, hi: tuple) -> torch.Tensor:
        """The source tensor's [lo:hi] (per dim), from every block that meets it. A rank
        tensor is hashed whole against the manifest the first time it is read (OutputError,
        exit 2, when it differs)."""
        import torch

        from .transposed import read_box

        info = source.info(name)
        out = torch.empty(tuple(b - a for a, b in zip(lo, hi, strict=True)), dtype=_dtype(info))
        for block in self.blocks.get(name, []):
            a = tuple(max(x, y) for x, y in zip(lo, block.start, strict=True))
            b = tuple(min(x, y) for x, y in zip(hi, block.stop, strict=True))
            if any(x >= y for x, y in zip(a, b, strict=True)):
                continue
            key = (block.file, block.tensor)
            self._check_whole(key)
            path = self.out_dir / block.file
            fd = io_call(os.open, path, os.O_RDONLY, path=path)
            try:
                box = read_box(
                    fd, path, self.headers[block.file].tensors[block.tensor],
                    tuple(d + x - s for d, x, s in zip(block.dest, a, block.start, strict=True)),
                    tuple(d + y - s for d, y, s in zip(block.dest, b, block.start, strict=True)),
                    key in self.transposed,
                )  # fmt: skip
            finally:
                os.close(fd)
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo, strict=True))] = box
        return out

    def _check_whole(self, key: tuple[str, str]) -> None:
        """The rank-file tensor's bytes, all of them, hash as the manifest records."""
        if key in self.checked:
            return
        out = self.headers[key[0]].tensors[key[1]]
        path = self.out_dir / key[0]
        hasher = xxhash.xxh3_128()
        with open(path, "rb") as f:
            f.seek(out.begin)
            left = out.nbytes
            while left:
                data = f.read(min(left, CHUNK_BYTES))
                if not data:
                    break
                hasher.update(data)
                left -= len(data)
        check_digest(path, key[1], hasher.hexdigest(), self.entries[key]["xxh3_128"])
        self.checked.add(key)


def _dtype(info: TensorInfo):
    return torch_dtypes()[info.dtype]
