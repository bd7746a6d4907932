"""`reshard verify`: the first two tiers, which need no torch.distributed.

1. hashes: every file present with the recorded size, every tensor's xxh3-128 matches.
2. weights: every output tensor's pieces equal the source tensors bitwise (after the recorded
   cast), padding rows are zero, and the pieces cover every element of every source tensor.
The generation tier lives in verify/generate.py; `verify_output` runs all the tiers asked for.
The first two import no torch (the weights tier's byte comparison is verify/weights.py; torch
only for a piece the recipe cast); generate is imported only when asked for.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import xxhash

from ..dtypes import DTYPE_SIZES
from ..errors import OutputError
from ..headers import read_header
from ..io.manifest import MANIFEST, manifest_seal_failure, read_manifest, side_file_failures
from ..io.manifest_value import Manifest
from ..io.output_source import is_output, open_model
from ..io.rank_subset import check_partial_set
from ..io.source import resolve_model
from ..progress import progress_bar
from .result import LEVELS, LevelResult
from .weights import compare_weights

HASH_BLOCK = 16 << 20  # read into one reused buffer: fresh memory costs a fault per 4 KiB


def check_complete(out_dir: Path, manifest: Manifest) -> None:
    """Exit-2 territory: files the manifest names are missing or have the wrong size."""
    for name, meta in manifest.files.items():
        path = Path(out_dir) / name
        if not path.is_file():
            raise OutputError(
                f"{path}: missing (rank {meta['rank']}). {out_dir} is not a complete reshard "
                "output; copy the whole folder, or re-run reshard convert."
            )


def verify_hashes(out_dir: Path, manifest: Manifest, *, progress: bool = False) -> LevelResult:
    """The manifest's seal, then every rank file's size, header and tensor hashes."""
    total = sum(meta["size"] for meta in manifest.files.values())
    with progress_bar(total, desc="hashes", enabled=progress) as bar:
        failures, checked = _hash_files(out_dir, manifest, bar)
    sides = manifest.side_files
    covered = f"{len(sides)} side files" if sides is not None else "side files NOT covered"
    detail = f"{checked} tensors in {len(manifest.files)} files, {covered}"
    return LevelResult("hashes", not failures, detail, failures)


def _hash_files(out_dir: Path, manifest: Manifest, bar) -> tuple[list[str], int]:
    failures = [f for f in [manifest_seal_failure(out_dir, manifest)] if f]
    failures += side_file_failures(out_dir, manifest.side_files)  # config, tokenizer, expert maps
    checked = 0
    for name, meta in manifest.files.items():
        path = Path(out_dir) / name
        size = path.stat().st_size
        if size != meta["size"]:
            failures.append(f"{path}: {size} bytes, the manifest says {meta['size']}")
            continue
        try:
            header = read_header(path)
        except Exception as e:  # a corrupt header is a verification failure, not bad input
            failures.append(f"{path}: unreadable header ({e})")
            continue
        with open(path, "rb", buffering=0) as f:
            digest = xxhash.xxh3_128(f.read(header.data_start)).hexdigest()
        bar.update(header.data_start)
        if digest != meta["header_xxh3_128"]:
            failures.append(
                f"{path}: header hash {digest} != manifest {meta['header_xxh3_128']}: the "
                "header (names, shapes, offsets or metadata) was altered; re-copy the file"
            )
        failures += _check_file_hashes(path, header, manifest, meta["rank"], bar)
        checked += len(header.tensors)
    return failures, checked


def _check_file_hashes(path: Path, header, manifest: Manifest, rank: int, bar) -> list[str]:
    expected = {t: e for t, e in manifest.ranks[rank]["tensors"].items() if e["file"] == path.name}
    failures = [f"{path}: tensor '{t}' is missing" for t in expected if t not in header.tensors]
    buf = memoryview(bytearray(HASH_BLOCK))
    with open(path, "rb", buffering=0) as f:
        for name, info in header.tensors.items():
            entry = expected.get(name)
            if entry is None:
                failures.append(f"{path}: tensor '{name}' is not in the manifest")
                continue
            if problem := header_mismatch(info, entry):
                failures.append(f"{path}: tensor '{name}' (rank {rank}) {problem}")
                continue
            h = _hash_range(f, info.begin, info.nbytes, buf, bar)
            if h.hexdigest() != entry["xxh3_128"]:
                failures.append(
                    f"{path}: tensor '{name}' (rank {rank}) hash {h.hexdigest()} != manifest "
                    f"{entry['xxh3_128']}: the file is corrupt; re-copy it or re-run convert"
                )
    return failures


def _hash_range(f, offset: int, n: int, buf: memoryview, bar) -> xxhash.xxh3_128:
    """xxh3-128 of the file's bytes [offset, offset + n), read into `buf` block by block."""
    h = xxhash.xxh3_128()
    f.seek(offset)
    while n:
        got = f.readinto(buf[: min(n, len(buf))])
        if not got:
            break  # the file is shorter: the hash differs
        h.update(buf[:got])
        n -= got
        bar.update(got)
    return h


def header_mismatch(info, entry: dict) -> str | None:
    """The rank file's header and the manifest disagree on a tensor's dtype or shape."""
    if info.dtype != entry["dtype"] or list(info.shape) != entry["shape"]:
        return (
            f"is {info.dtype} {list(info.shape)} in the file but {entry['dtype']} "
            f"{entry['shape']} in the manifest; one of them was altered"
        )
    return None


def resolve_source_dir(manifest: Manifest, source: str | None) -> Path | None:
    """--source, else the output a re-layout was made from, else the original's path."""
    if source is not None:
        return resolve_model(source)[0]
    made_from = manifest.made_from
    if made_from and Path(made_from["path"]).is_dir():
        return Path(made_from["path"])
    path = manifest.source_path
    return path if path.is_dir() else None


def reference_dir(manifest: Manifest, source_dir: Path) -> Path | None:
    """The generate tier's reference runs an HF checkpoint: for a reshard output as the
    source, the original it records (if still there)."""
    if not is_output(source_dir):
        return source_dir
    path = manifest.source_path
    return path if path.is_dir() and not is_output(path) else None


def verify_weights(
    out_dir: Path, manifest: Manifest, source_dir: Path, *, progress: bool = False
) -> LevelResult:
    """Compare every piece with the source, bitwise; check coverage and zero padding."""
    with tempfile.TemporaryDirectory(prefix="reshard-verify-") as scratch:
        # A source the user converted from pickle with --allow-pickle is re-read the same way.
        allow = manifest.from_pickle
        src = open_model(str(source_dir), allow_pickle=allow, scratch=Path(scratch))
        total = sum(_output_bytes(e) for e in manifest.ranks if e.get("replica_of") is None)
        with progress_bar(total, desc="weights", enabled=progress) as bar:
            return _verify_weights(out_dir, manifest, src, bar)


def _output_bytes(entry: dict) -> int:
    tensors = (entry.get("tensors") or {}).values()
    return sum(math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]] for t in tensors)


def _verify_weights(out_dir: Path, manifest: Manifest, src, bar) -> LevelResult:
    failures = unknown_sources(manifest, src)
    if not failures:
        failures += compare_weights(out_dir, manifest, src, bar)
    failures += check_coverage(manifest, {n: src.info(n).shape for n in src.tensors})
    n = sum(len(e.get("tensors") or {}) for e in manifest.ranks)
    return LevelResult("weights", not failures, f"{n} tensors vs {src.path}", failures)


def unknown_sources(manifest: Manifest, src) -> list[str]:
    """Pieces whose source tensor the source does not hold: the wrong source, or an edit."""
    failures = []
    for entry in manifest.ranks:
        for name, meta in (entry.get("tensors") or {}).items():
            for j, p in enumerate(meta["pieces"]):
                if p["source"] not in src.tensors:
                    failures.append(
                        f"ranks[{entry['rank']}].tensors['{name}'].pieces[{j}].source "
                        f"'{p['source']}' is not a tensor of {src.path}: the manifest was "
                        "altered, or pass the right --source"
                    )
    return failures


def check_coverage(manifest: Manifest, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every element of every source tensor is in some shard. Replicated pieces repeat the
    same block, so identical blocks count once; distinct blocks must not overlap."""
    blocks: dict[str, set] = {name: set() for name in shapes}
    for entry in manifest.ranks:
        for meta in (entry.get("tensors") or {}).values():
            for p in meta["pieces"]:
                blocks.setdefault(p["source"], set()).add((tuple(p["start"]), tuple(p["stop"])))
    failures = []
    for name, shape in shapes.items():
        if name in manifest.dropped:
            continue
        found = blocks.get(name, set())
        volume = sum(_volume(a, b) for a, b in found)
        total = _volume((0,) * len(shape), shape)
        if volume != total or (len(found) <= 64 and _overlap(found)):
            failures.append(
                f"source tensor '{name}': the shards hold {volume} of its {total} elements "
                "(or overlapping blocks); the output is incomplete"
            )
    return failures


def _volume(start, stop) -> int:
    return math.prod(b - a for a, b in zip(start, stop, strict=True))


def _overlap(found) -> bool:
    boxes = sorted(found)
    for i, (a0, a1) in enumerate(boxes):
        for b0, b1 in boxes[i + 1 :]:
            if all(max(x0, y0) < min(x1, y1) for x0, x1, y0, y1 in zip(a0, a1, b0, b1)):
                return True
    return False


def _checks_files_here() -> bool:
    """Under torchrun, the file tiers run once per node (local rank 0), not once per GPU:
    sixteen ranks re-hashing the same 140 GB would read it sixteen times."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _elsewhere(level: str) -> LevelResult:
    return LevelResult(level, None, "checked by local rank 0 of this node", elsewhere=True)


def verify_output(
    out_dir: Path,
    *,
    levels: tuple[str, ...] = LEVELS,
    source: str | None = None,
    generate_options: dict | None = None,
    progress: bool = False,
) -> tuple[Manifest, list[LevelResult]]:
    """Run the requested tiers in order. Raises OutputError when OUT is incomplete, and
    InputError for bad generate options before any tier runs."""
    check_partial_set(Path(out_dir))  # --ranks runs still under way: name the missing ranks
    manifest = read_manifest(out_dir)
    if "generate" in levels:
        from .generate import check_generate_options  # torch: only for the generate tier

        vocab = manifest.hparams.vocab_size
        positions = (manifest.hparams.max_position_embeddings, f"{out_dir}/{MANIFEST}")
        check_generate_options(vocab=vocab, max_positions=positions, **(generate_options or {}))
    check_complete(out_dir, manifest)
    results = []
    file_checks = _checks_files_here()
    if "hashes" in levels:
        hashes = verify_hashes(out_dir, manifest, progress=progress) if file_checks else None
        results.append(hashes or _elsewhere("hashes"))
    source_dir = resolve_source_dir(manifest, source)
    for level in ("weights", "generate"):
        if level not in levels:
            continue
        if level == "weights" and not file_checks:
            results.append(_elsewhere(level))
        elif source_dir is None:
            results.append(
                LevelResult(
                    level, None,
                    f"skipped: source {manifest.source_path} is gone; pass --source",
                )
            )  # fmt: skip
        elif level == "weights":
            results.append(verify_weights(out_dir, manifest, source_dir, progress=progress))
        elif reference_dir(manifest, source_dir) is None:
            results.append(
                LevelResult(
                    level, None,
                    f"skipped: {source_dir} is a reshard output and the original is gone; "
                    "pass the original as --source",
                )
            )  # fmt: skip
        else:
            from .generate import verify_generation

            ref = reference_dir(manifest, source_dir)
            options = {"progress": progress, **(generate_options or {})}
            results.append(verify_generation(out_dir, manifest, ref, **options))
    return manifest, results
