"""A recipe settled into one plan for a model: the layout checked against its hyper-parameters,
stages solved (or taken as given), experts placed, then the pure plan. `reshard convert` and
`reshard plan` both come through here, so plan shows exactly what convert writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..models.consistency import check_tensors_against_config
from ..models.hparams import HParams
from ..models.rules import TensorRole, match_tensors
from .check import check_layout
from .experts.moe import check_gpus_per_node, solve_placements
from .plan import Plan, Stage, build_plan
from .recipe import Recipe
from .stages.pipeline import solve_stages

if TYPE_CHECKING:  # a Source is only read here; io/ imports layout/, not the other way
    from ..io.source import Source


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


def plan_tensors(
    hp: HParams,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    roles: dict[str, TensorRole],
    recipe: Recipe,
    stages: tuple[Stage, ...] | None = None,
) -> Plan:
    """The plan over tensors already matched to roles. `stages`: already solved, else here."""
    stages = stages or resolve_stages(hp, recipe)
    return build_plan(hp, tensors, roles, recipe, stages, resolve_placements(hp, recipe))


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
    return plan_tensors(hp, tensors, roles, recipe, stages)
