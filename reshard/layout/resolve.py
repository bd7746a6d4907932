"""A recipe settled into one plan for a model: the layout checked against its hyper-parameters
(once, here), stages solved (with their report), experts placed, then the pure plan.
`reshard convert` and `reshard plan` both come through here, so plan shows exactly what
convert writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..models.consistency import check_tensors_against_config
from ..models.hparams import HParams
from ..models.rules import TensorRole, match_tensors
from .check import check_layout
from .experts.moe import check_gpus_per_node, solve_placements
from .plan import Plan, Stage, build_plan
from .recipe import Recipe
from .stages.pipeline import StagePlan, plan_stages, solve_stages

if TYPE_CHECKING:  # a Source is only read here; io/ sits above layout/
    from ..io.source import Source

Tensors = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), source file order


@dataclass(frozen=True)
class Resolved:
    """The plan, and the stage split it uses with its report (None at pp 1 unless asked)."""

    plan: Plan
    stages: StagePlan | None


def resolve(
    hp: HParams,
    tensors: Tensors,
    roles: dict[str, TensorRole],
    recipe: Recipe,
    *,
    device: str = "H100",
    stage_report: bool = False,
) -> Resolved:
    """The plan over tensors already matched to roles. `device`: whose roofline the stage
    solver uses; `stage_report`: solve (and report) the split at pp 1 too."""
    check_layout(hp, recipe)  # the layout's own errors come before the stage solver's
    stages = _solve(hp, recipe, device, stage_report)
    return _settle(hp, tensors, roles, recipe, stages)


def resolve_source(
    source: Source, recipe: Recipe, *, device: str = "H100", stage_report: bool = False
) -> Resolved:
    """Everything the writer will do, decided before a byte of weights is read: the layout,
    the stages, then the source's tensors matched and checked against config.json."""
    hp = source.hparams
    check_layout(hp, recipe)
    stages = _solve(hp, recipe, device, stage_report)
    tensors = {
        name: (info.dtype, info.shape) for h in source.headers for name, info in h.tensors.items()
    }
    roles = match_tensors(hp, tensors, where=str(source.path))
    files = {name: str(header.path) for name, (header, _) in source.tensors.items()}
    check_tensors_against_config(
        hp, tensors, roles, cast=recipe.dtype, files=files, config=str(source.path / "config.json")
    )
    return _settle(hp, tensors, roles, recipe, stages)


def resolve_stages(hp: HParams, recipe: Recipe) -> tuple[Stage, ...]:
    """One stage holding everything, or the recipe's / the solver's split."""
    if recipe.pp == 1:
        return (Stage(0, 0, hp.num_layers - 1, True, True),)
    return solve_stages(hp, recipe)


def resolve_placements(hp: HParams, recipe: Recipe) -> dict:
    """MoE layer -> expert Placement ({} for a dense model)."""
    check_gpus_per_node(hp, recipe)
    if not hp.is_moe:
        return {}
    return solve_placements(hp, recipe)


def _solve(hp: HParams, recipe: Recipe, device: str, report: bool) -> StagePlan | None:
    return plan_stages(hp, recipe, device=device) if recipe.pp > 1 or report else None


def _settle(hp, tensors: Tensors, roles, recipe: Recipe, stages: StagePlan | None) -> Resolved:
    split = stages.stages if stages is not None and recipe.pp > 1 else resolve_stages(hp, recipe)
    plan = build_plan(hp, tensors, roles, recipe, split, resolve_placements(hp, recipe))
    return Resolved(plan, stages)
