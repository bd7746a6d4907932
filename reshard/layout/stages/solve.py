"""Pipeline stages: split the chain of items [embedding, decoder layer 0..L-1, final norm +
lm_head] into contiguous stages that minimise the slowest stage, optionally under a per-stage
memory cap, and report that split against the lower bound and the engines' default even split.
Pure functions over plain numbers: no I/O, no torch. Item costs come from costs.py
(integer ns); float costs are solved exactly too (scaled to integers by a power of two).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate

from ...errors import InputError, LayoutError

# (first, last) inclusive per stage; over items or over decoder layers, as each function says.
Split = tuple[tuple[int, int], ...]

# The env var each engine reads for a per-stage decoder-layer count ("8,9,9,6").
ENGINE_KNOBS = {"vllm": "VLLM_PP_LAYER_PARTITION", "sglang": "SGLANG_PP_LAYER_PARTITION"}


def balance_stages(
    costs: Sequence[float],
    pp: int,
    *,
    weights: Sequence[float] | None = None,
    mem_cap: float | None = None,
) -> Split:
    """Split items 0..n-1 into exactly `pp` non-empty contiguous stages, minimising the largest
    stage cost sum, with every stage's weight sum <= `mem_cap` when given. Exact, for int and
    float costs alike (finite, >= 0); anything else is an InputError.

    Tie-break among splits with the smallest bottleneck: the smallest sum of squared stage costs
    (the most even split), then the lexicographically smallest tuple of stage ends (earlier
    stages hold fewer items). Returns (first_item, last_item) inclusive per stage.
    """
    labels = [f"item {i}" for i in range(len(costs))]
    return _solve(costs, weights, pp, mem_cap, labels)


def balance_layers(
    costs: Sequence[int],
    pp: int,
    *,
    weights: Sequence[int] | None = None,
    mem_cap: int | None = None,
) -> Split:
    """balance_stages over the items [embedding, layers 0..L-1, head], with at least one decoder
    layer per stage: the embedding rides with layer 0 and the head with layer L-1, because the
    engines' partition knobs count decoder layers and a stage of only the head would be a 0.
    Returns the split over items (first stage starts at item 0, last ends at item L+1)."""
    n_layers = len(costs) - 2
    if n_layers < 1:
        raise InputError(f"{len(costs)} item costs: need embedding, >= 1 layer and head.")
    if pp > n_layers:
        raise LayoutError(
            f"pp={pp} stages need at least {pp} decoder layers, but the model has {n_layers}. "
            f"Use pp <= {n_layers}."
        )
    folded_weights = None if weights is None else _fold_ends(check_weights(weights, len(costs)))
    split = _solve(
        _fold_ends(check_costs(costs)), folded_weights, pp, mem_cap, _layer_labels(n_layers)
    )
    return items_from_layers(split)


def _fold_ends(values: Sequence[float]) -> list[Fraction]:
    # [embed, l0, ..., lL-1, head] -> [embed + l0, ..., lL-1 + head], summed exactly
    folded = [Fraction(v) for v in values[1:-1]]
    folded[0] += Fraction(values[0])
    folded[-1] += Fraction(values[-1])
    return folded


def _layer_labels(n_layers: int) -> list[str]:
    labels = [f"layer {i}" for i in range(n_layers)]
    labels[0] += " (+ embedding)"
    labels[-1] += " (+ final norm and lm_head)"
    return labels


def _solve(
    costs: Sequence[float],
    weights: Sequence[float] | None,
    pp: int,
    mem_cap: float | None,
    labels: Sequence[str],
) -> Split:
    if not isinstance(pp, int) or isinstance(pp, bool):
        raise InputError(f"pp={pp!r}: the number of stages is an int.")
    costs = check_costs(costs)
    weights = [0] * len(costs) if weights is None else check_weights(weights, len(costs))
    if mem_cap is not None:
        _check_number("mem_cap", mem_cap)
    _check_feasible(costs, weights, pp, mem_cap, labels)
    # Exact integers with the same order and ratios: floats are dyadic rationals.
    int_costs = exact_integers(costs)
    *int_weights, int_cap = exact_integers([*weights, 0 if mem_cap is None else mem_cap])
    cap = None if mem_cap is None else int_cap
    bottleneck = _min_bottleneck(int_costs, int_weights, pp, cap)
    return _most_even(int_costs, int_weights, pp, bottleneck, cap)


def exact_integers(values: Sequence[float]) -> list[int]:
    """Scale numbers by one common power of two (or denominator) to integers, exactly."""
    fractions = [Fraction(v) for v in values]
    scale = math.lcm(1, *(f.denominator for f in fractions))
    return [int(f * scale) for f in fractions]


def check_costs(costs: Sequence[float]) -> list[float]:
    """Item costs: finite numbers >= 0 (int or float), returned as a list."""
    costs = list(costs)
    for i, c in enumerate(costs):
        _check_number(f"costs[{i}]", c)
    return costs


def check_weights(weights: Sequence[float], n_items: int) -> list[float]:
    weights = list(weights)
    if len(weights) != n_items:
        raise InputError(f"{len(weights)} weights for {n_items} items: give one per item.")
    for i, w in enumerate(weights):
        _check_number(f"weights[{i}]", w)
    return weights


def _check_number(what: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"{what} is {value!r} ({type(value).__name__}); give an int or float.")
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{what} is {value!r}; costs, weights and caps must be finite and >= 0.")


def _check_feasible(
    costs: list[float], weights: list[float], pp: int, mem_cap: float | None,
    labels: Sequence[str],
) -> None:  # fmt: skip
    n = len(costs)
    if pp < 1:
        raise LayoutError(f"pp={pp}: a pipeline needs at least 1 stage.")
    if pp > n:
        raise LayoutError(
            f"pp={pp} stages need at least {pp} items, but the chain has {n}: every stage "
            f"holds at least one. Use pp <= {n}."
        )
    if mem_cap is None:
        return
    for label, w in zip(labels, weights, strict=True):
        if w > mem_cap:
            raise LayoutError(
                f"{label} needs {w} bytes, more than the per-stage memory cap of {mem_cap} "
                "bytes: no stage can hold it. Raise the cap (a GPU with more memory, or a "
                "larger tp to shrink each rank's share)."
            )
    needed = _count_stages(costs, weights, sum(costs), mem_cap)
    if needed > pp:
        raise LayoutError(
            f"the per-stage memory cap of {mem_cap} bytes holds the {sum(weights)} bytes of "
            f"weights in no fewer than {needed} stages, more than pp={pp}. "
            f"Use pp >= {needed} or raise the cap."
        )


def _count_stages(
    costs: list[float], weights: list[float], cost_cap: float, mem_cap: float | None
) -> int:
    """Fewest stages with every cost sum <= cost_cap and weight sum <= mem_cap. Greedy is exact
    here: both limits hold for every sub-interval of a stage that meets them."""
    stages, cost, weight = 1, 0, 0
    for c, w in zip(costs, weights, strict=True):
        if cost + c > cost_cap or (mem_cap is not None and weight + w > mem_cap):
            stages, cost, weight = stages + 1, 0, 0
        cost, weight = cost + c, weight + w
    return stages


def _min_bottleneck(costs: list[int], weights: list[int], pp: int, mem_cap: int | None) -> int:
    """Bisection on the integer bottleneck. Needing k <= pp stages means pp are possible too
    (n >= pp, and splitting a stage never raises a sum), so the probe is `count <= pp`."""
    total = sum(costs)
    low, high = max(max(costs), -(-total // pp)), total
    while low < high:
        mid = (low + high) // 2
        if _count_stages(costs, weights, mid, mem_cap) <= pp:
            high = mid
        else:
            low = mid + 1
    return low


def _most_even(
    costs: list[int], weights: list[int], pp: int, cap: int, mem_cap: int | None
) -> Split:
    """Among splits with every stage cost <= cap (and weight <= mem_cap), the one with the least
    (sum of squared stage costs, stage ends). A DP over (stages, items) keeping the least key
    per state is exact: appending a stage preserves the order of keys sharing that stage."""
    n = len(costs)
    cum_c, cum_w = [0, *accumulate(costs)], [0, *accumulate(weights)]
    # best[k][j]: least (sum of squares, ends) splitting items [0, j) into k stages.
    best: list[list[tuple[int, tuple[int, ...]] | None]] = [[None] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0, ())
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(j - 1, k - 2, -1):  # last stage = items [i, j); it grows as i falls
                cost = cum_c[j] - cum_c[i]
                if cost > cap or (mem_cap is not None and cum_w[j] - cum_w[i] > mem_cap):
                    break
                prev = best[k - 1][i]
                if prev is None:
                    continue
                key = (prev[0] + cost * cost, (*prev[1], j - 1))
                if best[k][j] is None or key < best[k][j]:
                    best[k][j] = key
    final = best[pp][n]
    assert final is not None, "bisection said feasible but the DP found no split"
    ends = final[1]
    return tuple(zip((0, *(e + 1 for e in ends[:-1])), ends, strict=True))


def even_split(n_layers: int, pp: int, *, engine: str = "vllm") -> Split:
    """The engines' default split of decoder layers, as (first_layer, last_layer) per stage.
    vLLM (get_pp_indices): L // pp each, the remainder one apiece to stages pp-2, pp-3, ...
    (never the last, which holds the head). SGLang: one apiece to the last L % pp stages."""
    if engine not in ENGINE_KNOBS:
        raise InputError(f"engine={engine!r}: known engines are {', '.join(ENGINE_KNOBS)}.")
    if pp < 1 or pp > n_layers:
        raise LayoutError(
            f"pp={pp} stages for {n_layers} decoder layers: every stage needs a layer. "
            f"Use 1 <= pp <= {n_layers}."
        )
    counts = [n_layers // pp] * pp
    for i in range(n_layers % pp):
        counts[-2 - i if engine == "vllm" else -1 - i] += 1
    return layers_from_counts(counts)


def layers_from_counts(counts: Sequence[int]) -> Split:
    """[8, 9, 9, 6] -> ((0, 7), (8, 16), (17, 25), (26, 31))."""
    starts = [0, *accumulate(counts)]
    return tuple((starts[i], starts[i + 1] - 1) for i in range(len(counts)))


def layer_counts(layer_split: Split) -> tuple[int, ...]:
    return tuple(last - first + 1 for first, last in layer_split)


def engine_knob(layer_split: Split, *, engine: str = "vllm") -> str:
    """The env setting that makes the engine use this split: VLLM_PP_LAYER_PARTITION=8,9,9,6."""
    if engine not in ENGINE_KNOBS:
        raise InputError(f"engine={engine!r}: known engines are {', '.join(ENGINE_KNOBS)}.")
    return f"{ENGINE_KNOBS[engine]}={','.join(str(c) for c in layer_counts(layer_split))}"


@dataclass(frozen=True)
class StageLayers:
    """What one stage holds, in decoder-layer terms."""

    first_layer: int
    last_layer: int  # first_layer - 1 when the stage holds no decoder layer
    embed: bool  # embed_tokens lives here (stage 0)
    head: bool  # final norm + lm_head live here (last stage)

    @property
    def n_layers(self) -> int:
        return self.last_layer - self.first_layer + 1


def stage_layers(item_split: Split, n_layers: int) -> tuple[StageLayers, ...]:
    """Items -> layers: item 0 is the embedding, item i+1 is layer i, item L+1 is the head."""
    _check_item_split(item_split, n_layers + 2)
    return tuple(
        StageLayers(max(first, 1) - 1, min(last, n_layers) - 1, first == 0, last == n_layers + 1)
        for first, last in item_split
    )


def items_from_layers(layer_split: Split) -> Split:
    """Layers -> items: the embedding joins the first stage and the head the last."""
    n_layers = layer_split[-1][1] + 1
    items = [[first + 1, last + 1] for first, last in layer_split]
    items[0][0], items[-1][1] = 0, n_layers + 1
    return tuple((first, last) for first, last in items)


def _check_item_split(item_split: Split, n_items: int) -> None:
    expected = 0
    for stage, (first, last) in enumerate(item_split):
        if first != expected or last < first:
            raise LayoutError(
                f"stage {stage} covers items [{first}, {last}] but should start at item "
                f"{expected} and be non-empty: stages must cover items 0..{n_items - 1} in order."
            )
        expected = last + 1
    if expected != n_items:
        raise LayoutError(f"stages end at item {expected - 1}, but there are {n_items} items.")


def check_stage_layers(
    stages: Sequence[Sequence[int]], n_layers: int, *, pp: int | None = None, where: str = "recipe"
) -> Split:
    """Validate explicit stage boundaries such as `stages = [[0, 9], [10, 31]]` (decoder-layer
    indices, inclusive): non-empty, contiguous, covering 0..n_layers-1, and pp of them."""
    if pp is not None and len(stages) != pp:
        raise LayoutError(f"{where}: {len(stages)} stages given but pp={pp}. Give {pp} ranges.")
    split, expected = [], 0
    for stage, bounds in enumerate(stages):
        if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds):
            raise LayoutError(f"{where}: stage {stage} is {bounds!r}; write [first, last].")
        first, last = bounds
        if first != expected:
            raise LayoutError(
                f"{where}: stage {stage} starts at layer {first}, but the previous stage ended "
                f"at layer {expected - 1}: stages must be contiguous. Start it at {expected}."
            )
        if last < first:
            raise LayoutError(f"{where}: stage {stage} is [{first}, {last}], which is empty.")
        split.append((first, last))
        expected = last + 1
    if expected != n_layers:
        raise LayoutError(
            f"{where}: stages cover layers 0..{expected - 1}, but the model has {n_layers} "
            f"(0..{n_layers - 1}). End the last stage at layer {n_layers - 1}."
        )
    return tuple(split)
