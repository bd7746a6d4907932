"""The stage report: a split over items next to the lower bound and the engines' default even
split (efficiency, gap, engine knob), as figures, a dict for --json and a text table.
Pure: the split itself comes from reshard.layout.stages.solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...units import format_bytes, format_ns
from .solve import (
    Split,
    StageLayers,
    check_costs,
    check_weights,
    engine_knob,
    even_split,
    items_from_layers,
    stage_layers,
)


@dataclass(frozen=True)
class StageRow:
    items: tuple[int, int]  # (first_item, last_item) inclusive
    layers: StageLayers
    cost: int
    weight_bytes: int


@dataclass(frozen=True)
class StageReport:
    """A split against the lower bound max(ceil(total/pp), largest item) and the even split."""

    pp: int
    total_cost: int
    lower_bound: int
    stages: tuple[StageRow, ...]
    even: tuple[StageRow, ...]  # the engine's default split
    engine: str

    @property
    def bottleneck(self) -> int:
        return max(row.cost for row in self.stages)

    @property
    def even_bottleneck(self) -> int:
        return max(row.cost for row in self.even)

    @property
    def efficiency(self) -> float:
        return self.total_cost / self.pp / self.bottleneck if self.bottleneck else 1.0

    @property
    def even_efficiency(self) -> float:
        return self.total_cost / self.pp / self.even_bottleneck if self.even_bottleneck else 1.0

    @property
    def gap(self) -> float:
        """How far the bottleneck is above the lower bound (0.0 = provably optimal)."""
        return self.bottleneck / self.lower_bound - 1 if self.lower_bound else 0.0

    @property
    def even_gap(self) -> float:
        return self.even_bottleneck / self.lower_bound - 1 if self.lower_bound else 0.0

    @property
    def knob(self) -> str:
        split = tuple((r.layers.first_layer, r.layers.last_layer) for r in self.stages)
        return engine_knob(split, engine=self.engine)

    def to_dict(self) -> dict[str, Any]:
        names = ("bottleneck", "even_bottleneck", "efficiency", "even_efficiency", "gap")
        return {
            "pp": self.pp,
            "total_cost": self.total_cost,
            "lower_bound": self.lower_bound,
            **{name: getattr(self, name) for name in (*names, "even_gap", "knob")},
            "stages": [_row_dict(row) for row in self.stages],
            "even": [_row_dict(row) for row in self.even],
        }

    def render(self) -> str:
        """A plain-text table for the CLI: costs (ns) as durations, weights in GB (10^9)."""
        lines = [
            f"{'stage':>5}  {'layers':<11}  {'items':<8} {'cost':>11}  {'weights':>10}   "
            f"{'even: layers':<12}  {'cost':>10}"
        ]
        for i, (row, even) in enumerate(zip(self.stages, self.even, strict=True)):
            lines.append(
                f"{i:>5}  {_layers_text(row.layers):<11}  {row.items[0]:>3}-{row.items[1]:<4} "
                f"{format_ns(row.cost):>11}  {format_bytes(row.weight_bytes):>10}   "
                f"{_layers_text(even.layers):<12}  {format_ns(even.cost):>10}"
            )
        lines.append(
            f"bottleneck {format_ns(self.bottleneck)} (even {format_ns(self.even_bottleneck)}); "
            f"lower bound {format_ns(self.lower_bound)}; efficiency {self.efficiency:.3f} (even "
            f"{self.even_efficiency:.3f}); gap {self.gap:.1%} (even {self.even_gap:.1%})"
        )
        lines.append(self.knob)
        return "\n".join(lines)


def _row_dict(row: StageRow) -> dict[str, Any]:
    layers = row.layers
    return {
        "items": list(row.items),
        "layers": [layers.first_layer, layers.last_layer],
        "embed": layers.embed,
        "head": layers.head,
        "cost": row.cost,
        "weight_bytes": row.weight_bytes,
    }


def _layers_text(layers: StageLayers) -> str:
    return f"{layers.first_layer}-{layers.last_layer}" if layers.n_layers else "none"


def report_stages(
    costs: Sequence[int], weights: Sequence[int], item_split: Split, *, engine: str = "vllm"
) -> StageReport:
    """Figures for a split over items [embedding, layers..., head] next to the engine's even
    split. `costs` and `weights` have one entry per item."""
    costs, weights = check_costs(costs), check_weights(weights, len(costs))
    n_layers, pp = len(costs) - 2, len(item_split)
    even_items = items_from_layers(even_split(n_layers, pp, engine=engine))
    total = sum(costs)
    return StageReport(
        pp=pp,
        total_cost=total,
        lower_bound=max(-(-total // pp) if isinstance(total, int) else total / pp, max(costs)),
        stages=_rows(costs, weights, item_split, n_layers),
        even=_rows(costs, weights, even_items, n_layers),
        engine=engine,
    )


def _rows(
    costs: list[int], weights: list[int], item_split: Split, n_layers: int
) -> tuple[StageRow, ...]:
    layers = stage_layers(item_split, n_layers)
    return tuple(
        StageRow((a, b), stage, sum(costs[a : b + 1]), sum(weights[a : b + 1]))
        for (a, b), stage in zip(item_split, layers, strict=True)
    )
