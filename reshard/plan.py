"""`reshard plan` end to end: read MODEL's tensor shapes (its safetensors headers when the folder
has them, else config.json alone: a folder, a bare config.json, or a hub id), build the Plan
convert would execute, and attach per-rank memory, the stage report and the expert placement
report. Reads no weights. The memory model and formatting are layout/memory/'s.
"""

from __future__ import annotations

from pathlib import Path

from .io.manifest import MANIFEST
from .io.output_source import open_model
from .io.source import INDEX, SINGLE, open_config
from .layout.memory.activation import EngineLimits
from .layout.memory.model import Gpu, memory_report
from .layout.memory.shapes import (
    ModelShapes,
    PlanMemory,
    config_shapes,
    expert_report,
    kv_budget,
    plan_notes,
    resolve_context,
    roofline_device,
)
from .layout.plan import Plan
from .layout.recipe import Recipe
from .layout.resolve import Resolved, resolve, resolve_source
from .models.rules import match_tensors


def load_shapes(model: str, *, dtype: str = "keep") -> ModelShapes:
    """Shapes from the headers of a local safetensors checkpoint, else from config.json alone
    (in its torch_dtype, or in `dtype` when the config's is not a float dtype reshard sizes)."""
    path = Path(model).expanduser()
    if path.is_dir() and any((path / n).is_file() for n in (INDEX, SINGLE, MANIFEST)):
        source = open_model(model)  # a reshard output describes its original's tensors
        tensors = {n: (i.dtype, i.shape) for h in source.headers for n, i in h.tensors.items()}
        roles = match_tensors(source.hparams, tensors, where=str(source.path))
        origin = source.reader.describe(len(source.headers))
        return ModelShapes(model, source.hparams, tensors, roles, origin, source)
    config, _, where = open_config(model)
    return config_shapes(model, config, where=where, dtype=dtype)


def plan_model(shapes: ModelShapes, recipe: Recipe) -> Plan:
    """Exactly the plan `reshard convert` would execute for this recipe."""
    return resolve_shapes(shapes, recipe).plan


def resolve_shapes(shapes: ModelShapes, recipe: Recipe, **options) -> Resolved:
    """resolve() over a source's headers (checked against config.json as convert checks
    them) or over shapes from config.json alone."""
    if shapes.source is not None:
        return resolve_source(shapes.source, recipe, **options)
    return resolve(shapes.hparams, shapes.tensors, shapes.roles, recipe, **options)


def plan_memory(
    shapes: ModelShapes,
    recipe: Recipe,
    *,
    gpu: Gpu | None,
    context: int | None = None,
    batch: int = 1,
    limits: EngineLimits | None = None,
) -> PlanMemory:
    hp = shapes.hparams
    # One split for the report and the memory: solved on --gpu's roofline (at decode batch 1
    # every item is bandwidth-bound, so convert's H100 roofline picks the same split).
    resolved = resolve_shapes(shapes, recipe, device=roofline_device(gpu), stage_report=True)
    plan, stages = resolved.plan, resolved.stages
    tokens, origin = resolve_context(hp, context)
    budget = kv_budget(shapes, recipe, context=tokens, batch=batch)
    report = memory_report(plan, gpu, budget, limits)
    placement = expert_report(shapes, recipe)
    return PlanMemory(
        shapes, recipe, report, stages, placement, origin, plan_notes(hp, recipe, budget)
    )
