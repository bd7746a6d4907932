"""Expert placement's files and figures: the `expert_load.json` format (read, validated,
written), balancedness per layer and overall, the lower bound on the busiest rank, the
memory redundant slots cost, the balanced-vs-contiguous report, and the SGLang /
TensorRT-LLM placement files. It decides nothing: placements come from `place.py`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import InputError, LayoutError, ReshardIOError
from reshard.layout.experts.nodes import NodeLayout, NodeReport, format_node_report, report_nodes
from reshard.layout.experts.place import Placement, place_model, replica_counts
from reshard.strict_json import read_json
from reshard.units import format_gb

LOAD_FORMAT = "reshard-expert-load"
LOAD_VERSION = 1
MAX_TOKENS = 1e15  # tokens per expert: past it sums lose precision (and it is a typo)
REMAKE = "make it with `reshard profile experts MODEL --prompts FILE -o expert_load.json`"


@dataclass(frozen=True)
class ExpertLoad:
    """Contents of `expert_load.json`: tokens routed to each expert per MoE layer, on
    calibration prompts and (optionally) on held-out prompts used only for evaluation."""

    model: str
    num_experts: int
    layers: dict[int, tuple[float, ...]]
    heldout: dict[int, tuple[float, ...]] = field(default_factory=dict)
    prompts: int = 0
    heldout_prompts: int = 0


def write_expert_load(path: str | os.PathLike, data: ExpertLoad) -> None:
    """Write `data` as `expert_load.json`, one line per layer (temporary file, then rename:
    never half a file). Refuses NaN/inf, which strict JSON readers reject."""
    head = {
        "format": LOAD_FORMAT,
        "version": LOAD_VERSION,
        "model": data.model,
        "num_experts": data.num_experts,
        "prompts": data.prompts,
        "heldout_prompts": data.heldout_prompts,
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(f'  "layers": {dump_layers(data.layers)},')
    lines.append(f'  "heldout": {dump_layers(data.heldout)}')
    partial = Path(f"{os.fspath(path)}.partial")
    partial.write_text("{\n" + "\n".join(lines) + "\n}\n")
    os.replace(partial, path)


def dump_layers(layers: Mapping[int, Sequence[float]]) -> str:
    rows = [f'    "{k}": {json.dumps(list(v), allow_nan=False)}' for k, v in sorted(layers.items())]
    return "{\n" + ",\n".join(rows) + "\n  }" if rows else "{}"


def read_expert_load(path: str | os.PathLike) -> ExpertLoad:
    """Read and validate `expert_load.json`; InputError names the file, the layer and the fix."""
    doc = load_json(path)
    where = os.fspath(path)
    if not isinstance(doc, dict) or doc.get("format") != LOAD_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{where}: format is {found!r}, not {LOAD_FORMAT!r}; {REMAKE}")
    if doc.get("version") != LOAD_VERSION:
        raise InputError(
            f"{where}: version {doc.get('version')!r}, this reshard reads {LOAD_VERSION}; {REMAKE}"
        )
    num_experts = doc.get("num_experts")
    if not is_count(num_experts) or num_experts < 1:
        raise InputError(f"{where}: num_experts is {num_experts!r}, need an integer >= 1")
    layers = parse_layers(where, "layers", doc.get("layers"), num_experts)
    if not layers:
        raise InputError(f'{where}: "layers" is empty; {REMAKE}')
    heldout = parse_layers(where, "heldout", doc.get("heldout", {}), num_experts)
    if heldout and set(heldout) != set(layers):
        raise InputError(
            f"{where}: heldout covers layers {sorted(heldout)[:4]}..., layers covers "
            f"{sorted(layers)[:4]}...; both must list the same MoE layers; {REMAKE}"
        )
    counts = [doc.get(k, 0) for k in ("prompts", "heldout_prompts")]
    if not all(is_count(c) and c >= 0 for c in counts):
        raise InputError(f"{where}: prompts/heldout_prompts {counts} must be integers >= 0")
    model = doc.get("model", "")
    return ExpertLoad(str(model), num_experts, layers, heldout, counts[0], counts[1])


def load_json(path: str | os.PathLike) -> object:
    """Parsed JSON of `path`; a missing or malformed file is bad input (exit 2)."""
    try:
        return read_json(Path(path), what="expert load file", fix=REMAKE)  # strict JSON
    except FileNotFoundError:
        raise InputError(f"{os.fspath(path)}: no such expert load file; {REMAKE}") from None
    except OSError as err:
        raise ReshardIOError(f"{os.fspath(path)}: cannot read ({err.strerror})") from None


def is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_layers(
    where: str, key: str, raw: object, num_experts: int
) -> dict[int, tuple[float, ...]]:
    """{"<layer>": [tokens per expert]} -> {layer: tuple}, every entry checked."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: {key!r} must map layer numbers to lists; {REMAKE}")
    out = {}
    for name, counts in raw.items():
        digits = name.isascii() and name.isdigit() and len(name) <= 9  # int() of 5000 raises
        if not (digits and str(int(name)) == name):
            raise InputError(
                f'{where}: {key} has key {_short(name)}; keys are layer numbers like "3"'
            )
        layer = int(name)
        if not isinstance(counts, list) or len(counts) != num_experts:
            n = len(counts) if isinstance(counts, list) else type(counts).__name__
            raise InputError(
                f"{where}: {key} layer {layer} has {n} expert counts, num_experts is "
                f"{num_experts}; profile again with the model you convert"
            )
        for e, x in enumerate(counts):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise InputError(
                    f"{where}: {key} layer {layer} expert {e} is {_short(x)}, not a number; "
                    "each entry is a token count"
                )
            if x > MAX_TOKENS:
                raise InputError(
                    f"{where}: {key} layer {layer} expert {e} is {_short(x)} tokens, past "
                    f"{MAX_TOKENS:.0e}; each entry is a token count. {REMAKE}"
                )
            if x < 0:
                raise InputError(
                    f"{where}: {key} layer {layer} expert {e} is negative ({x}); token "
                    "counts are >= 0"
                )
        out[layer] = tuple(counts)
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def balancedness(rank_loads: Sequence[float]) -> float:
    """mean / max tokens per rank (vLLM, SGLang): 1.0 is perfect; an idle layer counts 1.0."""
    peak = max(rank_loads)
    return 1.0 if peak == 0 else sum(rank_loads) / len(rank_loads) / peak


def imbalance_ratio(rank_loads: Sequence[float]) -> float:
    """(max - mean) / mean, TensorRT-LLM's figure; equals 1 / balancedness - 1."""
    return 1.0 / balancedness(rank_loads) - 1.0


def overall_balancedness(layer_rank_loads: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean over layers of per-layer balancedness, sum-based figure).

    The sum-based figure is sum of layer means / sum of layer maxima: layers run one after
    another and each waits for its busiest rank, so it is the ideal/actual time ratio of a
    forward pass. The per-layer mean weighs a near-idle layer like a busy one.
    """
    per_layer = [balancedness(loads) for loads in layer_rank_loads]
    means = sum(sum(loads) / len(loads) for loads in layer_rank_loads)
    peaks = sum(max(loads) for loads in layer_rank_loads)
    return sum(per_layer) / len(per_layer), (1.0 if peaks == 0 else means / peaks)


def lower_bound_max_load(load: Sequence[float], ep: int, redundant: int = 0) -> float:
    """No placement of E + redundant slots on ep ranks (a rank never holding two copies of
    an expert, tokens split evenly over replicas) has a busiest rank below this.

    max(total / ep, w*): the busiest rank carries at least the mean; and whatever the
    replica counts c (1 <= c_e <= ep, sum E + R), some rank holds a replica of the expert
    maximising load_e / c_e, which is >= w* = the minimum over counts of that maximum,
    reached by `replica_counts` (greedy is optimal for it). Not always attainable: slot
    counts per rank are fixed, which the bound ignores.
    """
    counts = replica_counts(load, len(load) + redundant, max_replicas=ep)
    heaviest = max(x / c for x, c in zip(load, counts, strict=True))
    return max(sum(load) / ep, heaviest)


def redundant_bytes(redundant: int, bytes_per_expert: int, num_moe_layers: int = 1) -> int:
    """Extra weight memory of the redundant slots over the whole EP group: R whole experts
    per MoE layer (each rank holds (E + R) / ep experts instead of E / ep)."""
    return redundant * bytes_per_expert * num_moe_layers


@dataclass(frozen=True)
class LayerScore:
    """One layer under one strategy. gap = busiest rank / lower bound - 1, on calibration."""

    layer: int
    balancedness: float
    heldout: float | None
    gap: float


@dataclass(frozen=True)
class StrategyScore:
    """One (placement, redundant) choice over all MoE layers. `mean` is the mean over layers
    of per-layer balancedness, `sum` the sum-based figure (see overall_balancedness); the
    heldout_* pair evaluates the calibration placement on held-out load. `mean_gap` is the
    mean per-layer gap, `gap` the sum of busiest ranks over the sum of lower bounds - 1."""

    placement: str
    redundant: int
    layers: tuple[LayerScore, ...]
    mean: float
    sum: float
    heldout_mean: float | None
    heldout_sum: float | None
    mean_gap: float
    gap: float
    extra_bytes: int | None


@dataclass(frozen=True)
class PlacementReport:
    num_experts: int
    ep: int
    strategies: tuple[StrategyScore, ...]
    nodes: NodeReport | None = None


def report_placement(
    loads: Mapping[int, Sequence[float]],
    heldout: Mapping[int, Sequence[float]] | None = None,
    *,
    ep: int,
    redundant: Sequence[int] = (0,),
    placements: Sequence[str] = ("contiguous", "balanced"),
    bytes_per_expert: int | None = None,
    nodes: NodeLayout | None = None,
) -> PlacementReport:
    """Score every (placement, redundant) pair on the calibration loads it was built from
    and, when given, on held-out loads it never saw."""
    layers = sorted(loads)
    if not layers:
        raise InputError("no expert loads to report on; profile with `reshard profile experts`")
    if heldout and sorted(heldout) != layers:
        raise InputError(
            f"held-out loads cover layers {sorted(heldout)[:4]}..., calibration loads "
            f"{layers[:4]}...; give both for the same MoE layers"
        )
    num_experts = len(loads[layers[0]])
    strategies = tuple(
        score_strategy(loads, heldout or None, num_experts, ep, r, name, bytes_per_expert)
        for r in redundant
        for name in placements
    )
    node_report = None if nodes is None else report_nodes(loads, heldout, nodes, max(redundant))
    return PlacementReport(num_experts, ep, strategies, node_report)


def score_strategy(
    loads: Mapping[int, Sequence[float]],
    heldout: Mapping[int, Sequence[float]] | None,
    num_experts: int,
    ep: int,
    redundant: int,
    name: str,
    bytes_per_expert: int | None,
) -> StrategyScore:
    layers = sorted(loads)
    placed = place_model(loads, num_experts, layers, ep, redundant, name)
    calib = [placed[k].rank_load(loads[k]) for k in layers]
    held = None if heldout is None else [placed[k].rank_load(heldout[k]) for k in layers]
    bounds = [lower_bound_max_load(loads[k], ep, redundant) for k in layers]
    scores = tuple(
        LayerScore(
            layer=k,
            balancedness=balancedness(calib[i]),
            heldout=None if held is None else balancedness(held[i]),
            gap=max(calib[i]) / bounds[i] - 1.0 if bounds[i] else 0.0,
        )
        for i, k in enumerate(layers)
    )
    mean, total = overall_balancedness(calib)
    held_mean, held_sum = (None, None) if held is None else overall_balancedness(held)
    bound_sum = sum(bounds)
    peak_sum = sum(max(x) for x in calib)
    return StrategyScore(
        placement=name,
        redundant=redundant,
        layers=scores,
        mean=mean,
        sum=total,
        heldout_mean=held_mean,
        heldout_sum=held_sum,
        mean_gap=sum(x.gap for x in scores) / len(scores),
        gap=peak_sum / bound_sum - 1.0 if bound_sum else 0.0,
        extra_bytes=None
        if bytes_per_expert is None
        else redundant_bytes(redundant, bytes_per_expert, len(layers)),
    )


def format_placement_report(report: PlacementReport) -> str:
    """A text table: one row per layer, three columns per strategy (calibration and
    held-out balancedness, gap to the lower bound), then the overall rows."""
    strategies = report.strategies
    lines = [
        f"expert placement: E={report.num_experts}, ep={report.ep}, "
        f"{len(strategies[0].layers)} MoE layers",
        "balancedness = mean/max tokens per rank (1 = perfect); held = the calibration "
        "placement scored on held-out load; gap = busiest rank / lower bound - 1 (calib)",
        format_row("", [f"{s.placement} R={s.redundant}".center(CELL) for s in strategies]),
        format_row("layer", [f"{'calib':>6} {'held':>6} {'gap':>8}" for _ in strategies]),
    ]
    for i, layer in enumerate(s.layer for s in strategies[0].layers):
        rows = [s.layers[i] for s in strategies]
        cells = [format_cells(x.balancedness, x.heldout, x.gap) for x in rows]
        lines.append(format_row(str(layer), cells))
    mean = [format_cells(s.mean, s.heldout_mean, s.mean_gap) for s in strategies]
    total = [format_cells(s.sum, s.heldout_sum, s.gap) for s in strategies]
    lines += [format_row("mean", mean), format_row("sum", total)]
    trtllm = [format_cells(1 / s.sum - 1, held_imbalance(s), None) for s in strategies]
    lines.append(format_row("trtllm", trtllm) + "  (max-mean)/mean from the sum row")
    if strategies[0].extra_bytes is not None:
        extra = [f"{format_gb(s.extra_bytes):>13}".ljust(CELL) for s in strategies]
        lines.append(format_row("GB+", extra) + "  redundant slots, whole EP group")
    if report.nodes is not None:
        lines += format_node_report(report.nodes)
    return "\n".join(lines)


CELL = 22  # width of one strategy's three columns


def format_row(label: str, cells: Sequence[str]) -> str:
    return f"{label:>6} " + " | ".join(cells)


def format_cells(calib: float, heldout: float | None, gap: float | None) -> str:
    held = "-" if heldout is None else f"{heldout:.4f}"
    return f"{calib:>6.4f} {held:>6} {'' if gap is None else f'{gap:.2%}':>8}"


def held_imbalance(score: StrategyScore) -> float | None:
    return None if score.heldout_sum is None else 1 / score.heldout_sum - 1


def to_sglang(placements: Mapping[int, Placement], *, num_layers: int | None = None) -> dict:
    """SGLang `--init-expert-location` JSON: {"physical_to_logical_map": [[slot -> expert]
    per layer]}. SGLang indexes rows by global layer id over all `num_layers` decoder
    layers (default: last MoE layer + 1); rows of dense layers hold its trivial map p % E."""
    first = check_uniform(placements)
    num_layers = max(placements) + 1 if num_layers is None else num_layers
    if num_layers <= max(placements):
        raise LayoutError(f"num_layers={num_layers} but MoE layer {max(placements)} is placed")
    trivial = [p % first.num_experts for p in range(first.num_slots)]
    rows = [list(placements[k].phy2log) if k in placements else trivial for k in range(num_layers)]
    return {"physical_to_logical_map": rows}


def to_trtllm_yaml(placements: Mapping[int, Placement]) -> str:
    """TensorRT-LLM `moe_load_balancer.yaml` (the `moe_config.load_balancer` file): num_slots
    is the whole EP group's slot count; initial_global_assignments maps the global layer id
    to its slot -> expert list (rank-major, as phy2log); layer_updates_per_iter 0 = static."""
    first = check_uniform(placements)
    lines = [f"num_slots: {first.num_slots}", "layer_updates_per_iter: 0"]
    lines.append("initial_global_assignments:")
    for layer in sorted(placements):
        lines.append(f"  {layer}: [{', '.join(map(str, placements[layer].phy2log))}]")
    return "\n".join(lines) + "\n"


def check_uniform(placements: Mapping[int, Placement]) -> Placement:
    """Engines take one slot count and one expert count for every layer."""
    if not placements:
        raise LayoutError("no MoE layers were placed; nothing to export")
    first = placements[min(placements)]
    for layer, p in placements.items():
        if (p.num_slots, p.num_experts, p.ep) != (first.num_slots, first.num_experts, first.ep):
            raise LayoutError(
                f"layer {layer} has {p.num_slots} slots / {p.num_experts} experts / ep={p.ep}, "
                f"layer {min(placements)} has {first.num_slots} / {first.num_experts} / "
                f"ep={first.ep}; engines need the same for every layer"
            )
    return first
