"""Pipeline stages for a conversion or a plan: per-item costs (measured `costs.json`, else the
analytic roofline), the exact split (or the recipe's explicit one), and its report.

The solver and the report are in solve.py and report.py, the costs in costs.py; this module
only wires them to a recipe and turns the result into plan.Stage values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...dtypes import CAST_SIZES
from ...models.hparams import HParams
from ..plan import Stage
from ..recipe import Recipe
from .costs import Item, analytic_costs, item_costs_from_profile, read_costs
from .report import StageReport, report_stages
from .solve import balance_layers, check_stage_layers, items_from_layers, stage_layers


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    report: StageReport
    items: tuple[Item, ...]
    cost_source: str  # "measured: costs.json" or "analytic roofline (...)"
    explicit: bool  # the recipe gave the boundaries


def stage_costs(hp: HParams, recipe: Recipe, *, device: str = "H100") -> tuple[list[Item], str]:
    """Measured costs when the recipe names a costs.json, else the roofline on `device`."""
    if recipe.costs is not None:
        items = item_costs_from_profile(hp, read_costs(recipe.costs), where=str(recipe.costs))
        return items, f"measured: {recipe.costs}"
    dtype_bytes = CAST_SIZES.get(hp.torch_dtype, 2)
    if recipe.dtype != "keep":
        dtype_bytes = CAST_SIZES[recipe.dtype]
    items = analytic_costs(hp, dtype_bytes=dtype_bytes, device=device)
    source = f"analytic roofline (decode, batch 1, {device})"
    return items, source + "; measure with `reshard profile layers`"


def plan_stages(hp: HParams, recipe: Recipe, *, device: str = "H100") -> StagePlan:
    items, cost_source = stage_costs(hp, recipe, device=device)
    costs = [i.cost for i in items]
    weights = [i.weight_bytes for i in items]
    if recipe.stages is not None:
        layers = check_stage_layers(recipe.stages, hp.num_layers, pp=recipe.pp, where=recipe.origin)
        item_split = items_from_layers(layers)
    else:
        item_split = balance_layers(costs, recipe.pp, weights=weights)
    spans = stage_layers(item_split, hp.num_layers)
    stages = tuple(
        Stage(i, s.first_layer, s.last_layer, s.embed, s.head) for i, s in enumerate(spans)
    )
    report = report_stages(costs, weights, item_split)
    return StagePlan(stages, report, tuple(items), cost_source, recipe.stages is not None)


def solve_stages(hp: HParams, recipe: Recipe) -> tuple[Stage, ...]:
    return plan_stages(hp, recipe).stages
