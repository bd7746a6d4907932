"""`reshard convert`: source -> roles -> stages/experts -> plan -> writer -> manifest.

This module wires the pure pieces to the I/O pieces in the order of the data flow. It owns
the output folder's life cycle, under OUT's lock (reshard/io/out_dir.py): the previous run's own
files out, shards in, side files copied, manifest last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .io.commit import hold_interrupts
from .io.files import write_atomic
from .io.manifest import MANIFEST, build_manifest, hash_side_files, write_manifest
from .io.out_dir import (
    build_record,
    check_out_apart,
    check_unfinished,
    claim_folder,
    claim_out_dir,
    flock_path,
    lock_out_dir,
    read_record,
    remove_names,
)
from .io.output_source import open_model
from .io.rank_subset import (
    SUBSETS_LOCK,
    all_file_ranks,
    check_manifest_absent,
    check_marker_claims,
    check_record_matches,
    file_ranks,
    hold_subset_locks,
    marker_name,
    marker_names,
    missing_ranks,
    parse_ranks,
    read_markers,
    subset_plan,
    write_marker,
    written_from_markers,
)
from .io.source import Source
from .io.torchrun import torchrun_world
from .io.writer import Written, write_plan
from .layout.experts.moe import SGLANG_FILE, TRTLLM_FILE, export_files
from .layout.formats import format_named
from .layout.plan import Plan
from .layout.recipe import Recipe
from .layout.resolve import resolve_source
from .layout.stages.pipeline import StagePlan

EXPORT_FILES = (SGLANG_FILE, TRTLLM_FILE)


@dataclass(frozen=True)
class ConvertResult:
    out_dir: Path
    plan: Plan
    source: Source
    seconds: float
    bytes_read: int
    bytes_written: int
    stage_plan: StagePlan | None = None  # when pp > 1: the split written, with its report
    ranks_written: tuple[int, ...] | None = None  # some ranks only (--ranks, --resume, torchrun)
    missing: tuple[int, ...] | None = None  # ranks still unwritten (None: not known here)


def convert_model(
    model: str,
    out_dir: Path,
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = False,
    workers: int | None = None,
    ranks: str | None = None,
    resume: bool = False,
) -> ConvertResult:
    """`ranks` (a --ranks spec), `resume`, or a torchrun world (WORLD_SIZE > 1): write some
    ranks' files; the run completing the set writes the manifest (reshard/io/rank_subset.py)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    world = torchrun_world()
    subset = ranks is not None or resume or world is not None
    if subset and force:
        raise InputError(
            "--force: cannot be combined with --ranks, --resume or a torchrun world (it would "
            "delete other runs' ranks). Clear OUT with one full convert --force, or use -o."
        )
    if not subset:
        check_unfinished(out_dir, force=force)  # before any work: refuse early and cheaply
    # Per process: it is deleted below, before or without OUT's lock, so a run refused as
    # busy must not delete the scratch of the run it found there.
    scratch = out_dir.parent / f".{out_dir.name}.reshard-pickle-{os.getpid()}"
    try:
        source = open_model(model, allow_pickle=allow_pickle, scratch=scratch)
        check_not_source(source, out_dir)
        check_out_apart(out_dir, source)
        resolved = resolve_source(source, recipe)
        plan, stage_plan = resolved.plan, resolved.stages
        done = None
        if subset:
            read_total, sizes, done = convert_subset(
                plan,
                source,
                recipe,
                out_dir,
                ranks=ranks,
                world=world,
                resume=resume,
                progress=progress,
                workers=workers,
            )
        else:
            read_total, sizes = _convert_full(
                plan, source, recipe, out_dir, force, progress, workers
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    return ConvertResult(
        out_dir, plan, source, seconds, read_total, sum(sizes.values()), stage_plan,
        *(done or (None, None)),
    )  # fmt: skip


def _convert_full(plan, source, recipe, out_dir: Path, force: bool, progress: bool, workers):
    with (
        lock_out_dir(out_dir),  # a second convert into OUT exits 2 from here on
        flock_path(out_dir, SUBSETS_LOCK, busy=_busy_subsets(out_dir)),
    ):
        record = build_record(plan, source, output_names(plan, source))
        claim_folder(out_dir, record, force=force)
        return _write_output(plan, source, recipe, out_dir, progress, workers)


def _busy_subsets(out_dir: Path) -> str:
    return (
        f"{out_dir}: reshard convert --ranks runs are writing into this folder. Wait for them, "
        "or write elsewhere with -o."
    )


def convert_subset(
    plan, source, recipe, out_dir: Path, *, ranks, world, resume, progress, workers=None
):
    """Claim (short lock), write the chosen ranks' files, mark them, finish (short lock)."""
    chosen = _chosen_ranks(plan, ranks, world)  # a bad --ranks is refused before OUT exists
    # The rank locks come first: nothing of a rank (its files, partials, marker) is deleted
    # unless this run holds that rank, so a refused run never breaks the one writing it.
    with hold_subset_locks(out_dir, chosen):
        with lock_out_dir(out_dir, wait=True):
            check_manifest_absent(out_dir)
            check_unfinished(out_dir, force=False)
            record = build_record(plan, source, output_names(plan, source))
            todo = _unfinished(plan, out_dir, chosen) if resume else chosen
            _join_out_dir(out_dir, record, plan, todo)
        part = subset_plan(plan, todo)
        read_total = _bytes_to_read(part, source)
        with _progress_bar(read_total, progress) as bar:
            written = write_plan(part, source, out_dir, progress=bar, workers=workers)
        sizes = {f.name: (out_dir / f.name).stat().st_size for f in part.files}
        for rank in todo:
            write_marker(out_dir, plan, rank, written, sizes)
    if world is not None:
        world.barrier()
        if world.rank != 0:
            return read_total, sizes, (todo, None)
    with lock_out_dir(out_dir, wait=True):
        missing = finish_if_complete(plan, source, recipe, out_dir, written)
    return read_total, sizes, (todo, missing)


def _chosen_ranks(plan: Plan, ranks, world) -> tuple[int, ...]:
    if ranks is not None:
        chosen = file_ranks(plan, parse_ranks(ranks, plan.layout.world_size))
    else:
        chosen = all_file_ranks(plan)
    if world is not None:  # whole files each, round robin over the world's processes
        chosen = chosen[world.rank :: world.size]
    return chosen


def _unfinished(plan: Plan, out_dir: Path, chosen) -> tuple[int, ...]:
    """--resume: the chosen ranks without a marker whose files match (size, header hash)."""
    done = read_markers(out_dir, plan) if read_record(out_dir) else {}
    return tuple(r for r in chosen if r not in done)


def _join_out_dir(out_dir: Path, record: dict, plan: Plan, todo) -> None:
    """Under the lock: the first run claims OUT; later ones must match its plan and source.
    The ranks this run writes are cleared (their files, partials and markers)."""
    existing = read_record(out_dir)
    if existing is None:
        claim_out_dir(out_dir, record)
        return
    check_record_matches(out_dir, existing, record)
    names = [f.name for f in plan.files if f.rank in set(todo)]
    remove_names(out_dir, names + [marker_name(r) for r in todo])


def finish_if_complete(
    plan: Plan, source: Source, recipe: Recipe, out_dir: Path, own: Written
) -> tuple:
    """Under the lock: when every rank has its marker and no manifest is there yet, check what
    the markers claim against the files (`own`: what this process wrote, known good), write the
    side files, exports and manifest (exactly once), then drop the markers. Returns the ranks
    still missing."""
    if (out_dir / MANIFEST).exists():
        return ()
    markers = read_markers(out_dir, plan)
    missing = tuple(missing_ranks(plan, markers))
    if missing:
        return missing
    check_marker_claims(out_dir, markers, own)
    written, sizes = written_from_markers(markers)
    with hold_interrupts(out_dir):
        _commit(plan, source, recipe, out_dir, written, sizes)
        remove_names(out_dir, marker_names(plan))
    return ()


def _write_output(plan: Plan, source: Source, recipe: Recipe, out_dir: Path, progress, workers):
    read_total = _bytes_to_read(plan, source)
    with _progress_bar(read_total, progress) as bar:
        written = write_plan(plan, source, out_dir, progress=bar, workers=workers)
    sizes = {f.name: (out_dir / f.name).stat().st_size for f in plan.files}
    with hold_interrupts(out_dir):
        _commit(plan, source, recipe, out_dir, written, sizes)
    return read_total, sizes


def _commit(plan, source, recipe, out_dir: Path, written, sizes) -> None:
    """Side files, expert maps, then the manifest (listing their hashes) last."""
    sides = _write_side_files(plan, source, out_dir)
    manifest = build_manifest(
        plan, source, written, sizes,
        side_files=hash_side_files(out_dir, sides),
    )  # fmt: skip
    write_manifest(out_dir, manifest)


def _progress_bar(total: int, show: bool):
    if not show:  # no bar, no tqdm import: a quiet run starts faster
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert", mininterval=0.5
    )


def _write_side_files(plan: Plan, source: Source, out_dir: Path) -> list[str]:
    names = []
    for side in source.side_files():
        write_atomic(out_dir / side.name, side.read_bytes())
        names.append(side.name)
    for name, data in {
        **_exports(plan),
        **format_named(plan.layout.format).side_files(plan),
    }.items():
        write_atomic(out_dir / name, data)
        names.append(name)
    return names


def _bytes_to_read(plan: Plan, source: Source) -> int:
    needed = {p.source for f in plan.files for t in f.tensors for p in t.pieces}
    return sum(source.info(n).nbytes for n in needed)


def _exports(plan: Plan) -> dict[str, bytes]:
    if not plan.placements:
        return {}
    return export_files(plan)


def check_not_source(source: Source, out_dir: Path) -> None:
    if source.reader.reads_from(out_dir.resolve()):
        raise InputError(
            f"{out_dir}: is the reshard output being read; converting it into itself would "
            "delete its rank files. Choose another folder with -o."
        )


def output_names(plan: Plan, source: Source) -> list[str]:
    """Every file this run writes into OUT (each also as `.partial` while being written)."""
    names = [f.name for f in plan.files] + [p.name for p in source.side_files()]
    exports = list(EXPORT_FILES) if plan.placements else []
    exports += list(format_named(plan.layout.format).side_files(plan))
    return names + exports + [MANIFEST] + marker_names(plan)
