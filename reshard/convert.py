"""`reshard convert`: source -> roles -> stages/experts -> plan -> writer -> manifest.

This module wires the pure pieces to the I/O pieces in the order of the data flow. It owns
the output folder's life cycle, under OUT's lock (reshard/out_dir.py): the previous run's own
files out, shards in, side files copied, manifest last.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import InputError
from .hparams import HParams
from .manifest import MANIFEST, build_manifest, write_manifest
from .moe_layout import SGLANG_FILE, TRTLLM_FILE
from .out_dir import build_record, check_out_apart, claim_out_dir, lock_out_dir
from .output_source import open_model
from .plan import Plan, Stage, build_plan, check_layout
from .recipe import Recipe
from .source import Source
from .specs import match_tensors
from .specs.consistency import check_tensors_against_config
from .writer import write_atomic, write_plan

EXPORT_FILES = (SGLANG_FILE, TRTLLM_FILE)


@dataclass(frozen=True)
class ConvertResult:
    out_dir: Path
    plan: Plan
    source: Source
    seconds: float
    bytes_read: int
    bytes_written: int
    stage_plan: object | None = None  # pipeline.StagePlan when pp > 1


def plan_source(source: Source, recipe: Recipe, stages: tuple[Stage, ...] | None = None) -> Plan:
    """Everything the writer will do, decided before a byte of weights is read. `stages`:
    already solved (convert keeps the stage report), else solved here."""
    hp = source.hparams
    check_layout(hp, recipe)
    tensors = {
        name: (info.dtype, info.shape) for h in source.headers for name, info in h.tensors.items()
    }
    roles = match_tensors(hp, tensors, where=str(source.path))
    files = {name: str(header.path) for name, (header, _) in source.tensors.items()}
    check_tensors_against_config(
        hp, tensors, roles, cast=recipe.dtype, files=files, config=str(source.path / "config.json")
    )
    stages = stages or resolve_stages(hp, recipe)
    placements = resolve_placements(hp, recipe)
    return build_plan(hp, tensors, roles, recipe, stages, placements)


def resolve_stages(hp: HParams, recipe: Recipe) -> tuple[Stage, ...]:
    if recipe.pp == 1:
        return (Stage(0, 0, hp.num_layers - 1, True, True),)
    from .pipeline import solve_stages

    return solve_stages(hp, recipe)


def resolve_placements(hp: HParams, recipe: Recipe) -> dict:
    from .moe_layout import check_gpus_per_node, solve_placements

    check_gpus_per_node(hp, recipe)
    if not hp.is_moe:
        return {}

    return solve_placements(hp, recipe)


def convert_model(
    model: str,
    out_dir: Path,
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = False,
) -> ConvertResult:
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_no_output(out_dir, force=force)  # before any work: refuse early and cheaply
    scratch = out_dir.parent / f".{out_dir.name}.reshard-pickle"
    try:
        source = open_model(model, allow_pickle=allow_pickle, scratch=scratch)
        check_not_source(source, out_dir)
        check_out_apart(out_dir, source)
        stage_plan = _stage_plan(source.hparams, recipe)
        plan = plan_source(source, recipe, stage_plan.stages if stage_plan else None)
        with lock_out_dir(out_dir):  # a second convert into OUT exits 2 from here on
            record = build_record(plan, source, output_names(plan, source))
            prepare_out_dir(out_dir, record, force=force)
            read_total, sizes = _write_output(plan, source, recipe, out_dir, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    return ConvertResult(
        out_dir, plan, source, seconds, read_total, sum(sizes.values()), stage_plan
    )


def _stage_plan(hp: HParams, recipe: Recipe):
    """The solved split with its report (pp > 1), so convert can print what it wrote."""
    check_layout(hp, recipe)  # the layout's own errors come before the solver's
    if recipe.pp == 1:
        return None
    from .pipeline import plan_stages

    return plan_stages(hp, recipe)


def _write_output(plan: Plan, source: Source, recipe: Recipe, out_dir: Path, progress: bool):
    read_total = _bytes_to_read(plan, source)
    with tqdm(
        total=read_total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
        desc="convert", mininterval=0.5,
    ) as bar:  # fmt: skip
        written = write_plan(plan, source, out_dir, progress=bar)
    for side in source.side_files():
        write_atomic(out_dir / side.name, side.read_bytes())
    for name, data in _exports(plan).items():
        write_atomic(out_dir / name, data)
    sizes = {f.name: (out_dir / f.name).stat().st_size for f in plan.files}
    manifest = build_manifest(plan, source, written, sizes, experts=_experts_entry(plan, recipe))
    write_manifest(out_dir, manifest)
    return read_total, sizes


def _bytes_to_read(plan: Plan, source: Source) -> int:
    needed = {p.source for f in plan.files for t in f.tensors for p in t.pieces}
    return sum(source.info(n).nbytes for n in needed)


def _exports(plan: Plan) -> dict[str, bytes]:
    if not plan.placements:
        return {}
    from .moe_layout import export_files

    return export_files(plan)


def _experts_entry(plan: Plan, recipe: Recipe) -> dict | None:
    if not plan.placements:
        return None
    from .moe_layout import placements_entry

    return placements_entry(plan, recipe)


def check_not_source(source: Source, out_dir: Path) -> None:
    if source.reader is not None and source.path == out_dir.resolve():
        raise InputError(
            f"{out_dir}: is the reshard output being read; converting it into itself would "
            "delete its rank files. Choose another folder with -o."
        )


def check_no_output(out_dir: Path, *, force: bool) -> None:
    if (out_dir / MANIFEST).exists() and not force:
        raise InputError(
            f"{out_dir}: already holds a reshard output ({MANIFEST}). Pass --force to "
            "replace it, or choose another folder with -o."
        )


def output_names(plan: Plan, source: Source) -> list[str]:
    """Every file this run writes into OUT (each also as `.partial` while being written)."""
    names = [f.name for f in plan.files] + [p.name for p in source.side_files()]
    exports = list(EXPORT_FILES) if plan.placements else []
    return names + exports + [MANIFEST]


def prepare_out_dir(out_dir: Path, record: dict, *, force: bool) -> None:
    """Under the lock: refuse to clobber a finished output unless forced (checked again: a
    convert that finished while this one planned has written its manifest), then claim OUT."""
    check_no_output(out_dir, force=force)
    claim_out_dir(out_dir, record)
