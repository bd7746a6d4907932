"""Pictures of expert load and placement for `plan --plot` and `profile experts --plot`: a
layers x experts heatmap of measured load, layers x EP ranks tokens per GPU for contiguous
and the chosen placement on one colour scale, and balancedness per layer. matplotlib is an
optional extra (`pip install 'reshard[plot]'`); decides nothing, only draws."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from reshard.errors import InputError, ReshardIOError
from reshard.layout.experts.moe import solve_placements
from reshard.layout.experts.place import Placement, place_model
from reshard.layout.experts.report import balancedness, read_expert_load
from reshard.layout.recipe import Recipe
from reshard.models.hparams import HParams

if TYPE_CHECKING:  # a type only: profile.experts loads torch, a plot of a plan does not need it
    from reshard.profile.experts import ExpertProfile

INSTALL = "pip install 'reshard[plot]'"


def require_matplotlib() -> None:
    """InputError (exit 2) with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(f"--plot needs matplotlib, an optional extra: {INSTALL}") from None


def plot_placement(
    path: str | os.PathLike,
    loads: Mapping[int, Sequence[float]],
    heldout: Mapping[int, Sequence[float]] | None,
    chosen: Mapping[int, Placement],
    *,
    title: str,
) -> None:
    """Write the three panels to `path` (PNG): load, per-GPU load (contiguous vs chosen),
    balancedness per layer on held-out load (calibration when there is none)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(loads)
    first = chosen[layers[0]]
    contiguous = place_model(loads, first.num_experts, layers, first.ep, 0, "contiguous")
    fig, axes = plt.subplots(2, 2, figsize=(14, 9), dpi=100, layout="constrained")
    draw_load(fig, axes[0][0], loads, layers)
    draw_ranks(fig, axes[1], loads, layers, contiguous, chosen)
    draw_balance(axes[0][1], heldout or loads, layers, contiguous, chosen, heldout is not None)
    fig.suptitle(title)
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise ReshardIOError(f"{os.fspath(path)}: cannot write the plot ({err.strerror})") from None
    finally:
        plt.close(fig)


def plot_plan(path: str | os.PathLike, hp: HParams, recipe: Recipe) -> None:
    """`reshard plan --plot`: the recipe's placement over its expert load file."""
    if not (hp.is_moe and recipe.ep > 1 and recipe.load is not None):
        raise InputError(
            "--plot draws the expert placement: it needs a mixture-of-experts model, --ep > 1 "
            "and --expert-load FILE (from `reshard profile experts`)"
        )
    load = read_expert_load(recipe.load)
    chosen = solve_placements(hp, recipe)
    title = f"{load.model or hp.architecture}: ep={recipe.ep}, placement {recipe.placement}"
    plot_placement(path, load.layers, load.heldout or None, chosen, title=title)


def plot_profile(path: str | os.PathLike, profile: ExpertProfile) -> None:
    """`reshard profile experts --plot`: the balanced placement at the report's ep."""
    load = profile.load
    if profile.report_ep is None:
        raise InputError(
            f"--plot needs an ep to place {load.num_experts} experts on; pass --ep N (N divides "
            f"{load.num_experts})"
        )
    layers = sorted(load.layers)
    chosen = place_model(load.layers, load.num_experts, layers, profile.report_ep)
    title = f"{load.model}: ep={profile.report_ep}, balanced placement"
    plot_placement(path, load.layers, load.heldout or None, chosen, title=title)


def draw_load(fig, ax, loads, layers) -> None:
    rows = [list(loads[k]) for k in layers]  # [layers, experts]
    image = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(title="measured load (tokens)", xlabel="expert", ylabel="MoE layer (row)")
    label_layers(ax, layers)
    fig.colorbar(image, ax=ax)


def draw_ranks(fig, axes, loads, layers, contiguous, chosen) -> None:
    """Tokens per EP rank, contiguous left and chosen right, one colour scale."""
    first = chosen[layers[0]]
    panels = [
        ("contiguous R=0", [contiguous[k].rank_load(loads[k]) for k in layers]),
        (
            f"chosen R={first.num_slots - first.num_experts}",
            [chosen[k].rank_load(loads[k]) for k in layers],
        ),
    ]
    top = max(max(max(row) for row in rows) for _, rows in panels) or 1.0
    for ax, (name, rows) in zip(axes, panels, strict=True):
        image = ax.imshow(rows, aspect="auto", interpolation="nearest", vmin=0, vmax=top)
        ax.set(title=f"tokens per GPU, {name}", xlabel="EP rank", ylabel="MoE layer (row)")
        label_layers(ax, layers)
    fig.colorbar(image, ax=list(axes))


def draw_balance(ax, scored, layers, contiguous, chosen, is_heldout: bool) -> None:
    for name, placed in (("contiguous", contiguous), ("chosen", chosen)):
        ax.plot(layers, [balancedness(placed[k].rank_load(scored[k])) for k in layers], label=name)
    which = "held-out" if is_heldout else "calibration (no held-out load)"
    ax.set(title=f"balancedness per layer, {which}", xlabel="MoE layer", ylim=(0, 1.02))
    ax.legend()


def label_layers(ax, layers: Sequence[int]) -> None:
    step = max(1, len(layers) // 12)
    ax.set_yticks(range(0, len(layers), step), [str(k) for k in layers[::step]])
