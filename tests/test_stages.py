"""Pipeline stage balancing: the solver against brute force, its tie-break, its refusals, the
engines' even split, boundary validation and the report. Pure numbers, no files."""

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reshard.errors import InputError, LayoutError
from reshard.layout.stages.report import report_stages
from reshard.layout.stages.solve import (
    balance_layers,
    balance_stages,
    check_stage_layers,
    engine_knob,
    even_split,
    items_from_layers,
    layers_from_counts,
    stage_layers,
)


def all_splits(n: int, pp: int):
    for cuts in combinations(range(1, n), pp - 1):
        bounds = (0, *cuts, n)
        yield tuple((bounds[i], bounds[i + 1] - 1) for i in range(pp))


def brute_force(costs, pp, weights=None, mem_cap=None, min_layers=False):
    """The best split by (bottleneck, sum of squares, ends), or None when none is feasible."""
    weights = weights or [0] * len(costs)
    best = None
    for split in all_splits(len(costs), pp):
        if mem_cap is not None and any(sum(weights[a : b + 1]) > mem_cap for a, b in split):
            continue
        n_layers = len(costs) - 2
        if min_layers and any(min(b, n_layers) < max(a, 1) for a, b in split):
            continue
        sums = [sum(costs[a : b + 1]) for a, b in split]
        key = (max(sums), sum(s * s for s in sums), tuple(b for _, b in split))
        if best is None or key < best[0]:
            best = (key, split)
    return best


chains = st.lists(st.integers(0, 30), min_size=1, max_size=9)


@settings(max_examples=300, deadline=None)
@given(costs=chains, pp=st.integers(1, 4))
def test_balance_matches_brute_force(costs, pp):
    best = brute_force(costs, pp)
    if best is None:
        with pytest.raises(LayoutError, match=f"pp={pp} stages need at least {pp} items"):
            balance_stages(costs, pp)
        return
    split = balance_stages(costs, pp)
    assert max(sum(costs[a : b + 1]) for a, b in split) == best[0][0]
    assert split == best[1]  # the documented tie-break, not just the same bottleneck


@settings(max_examples=300, deadline=None)
@given(data=st.data(), costs=chains, pp=st.integers(1, 4), mem_cap=st.integers(0, 60))
def test_balance_with_memory_cap_matches_brute_force(data, costs, pp, mem_cap):
    weights = data.draw(st.lists(st.integers(0, 25), min_size=len(costs), max_size=len(costs)))
    best = brute_force(costs, pp, weights, mem_cap)
    if best is None:
        with pytest.raises(LayoutError, match=rf"pp={pp}|cap of {mem_cap} bytes"):
            balance_stages(costs, pp, weights=weights, mem_cap=mem_cap)
        return
    split = balance_stages(costs, pp, weights=weights, mem_cap=mem_cap)
    assert split == best[1]
    assert all(sum(weights[a : b + 1]) <= mem_cap for a, b in split)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    costs=st.lists(st.integers(0, 30), min_size=3, max_size=9),
    pp=st.integers(1, 4),
    mem_cap=st.none() | st.integers(0, 60),
)
def test_balance_layers_keeps_a_layer_per_stage(data, costs, pp, mem_cap):
    weights = data.draw(st.lists(st.integers(0, 25), min_size=len(costs), max_size=len(costs)))
    best = brute_force(costs, pp, weights, mem_cap, min_layers=True)
    if best is None:
        with pytest.raises(LayoutError, match=r"decoder layers|bytes"):
            balance_layers(costs, pp, weights=weights, mem_cap=mem_cap)
        return
    split = balance_layers(costs, pp, weights=weights, mem_cap=mem_cap)
    assert split == best[1]
    assert all(s.n_layers >= 1 for s in stage_layers(split, len(costs) - 2))


def test_tie_break_prefers_even_then_earlier_ends():
    # (5 | 5 5) and (5 5 | 5) tie on bottleneck and squares: the smaller ends win.
    assert balance_stages([5, 5, 5], 2) == ((0, 0), (1, 2))
    # Bottleneck 40 both ways; 21,30,30,40 is more even than 31,30,20,40.
    costs = [1] + [10] * 8 + [40]
    assert balance_stages(costs, 4) == ((0, 2), (3, 5), (6, 8), (9, 9))


def test_infeasible_layouts_name_the_numbers():
    with pytest.raises(LayoutError, match=r"pp=4 stages need at least 4 items, .* has 3.*pp <= 3"):
        balance_stages([1, 2, 3], 4)
    with pytest.raises(LayoutError, match="pp=0: a pipeline needs at least 1 stage"):
        balance_stages([1, 2, 3], 0)
    with pytest.raises(LayoutError, match="item 1 needs 50 bytes, more than .* cap of 40 bytes"):
        balance_stages([1, 1, 1], 2, weights=[5, 50, 5], mem_cap=40)
    with pytest.raises(
        LayoutError,
        match=r"cap of 40 bytes holds the 120 bytes .* no fewer than 4 stages, more "
        r"than pp=3\. Use pp >= 4",
    ):
        balance_stages([1, 1, 1, 1], 3, weights=[30] * 4, mem_cap=40)
    with pytest.raises(LayoutError, match="pp=5 stages need at least 5 decoder layers.*has 4"):
        balance_layers([1] * 6, 5)
    with pytest.raises(LayoutError, match=r"layer 3 \(\+ final norm and lm_head\) needs 60 bytes"):
        balance_layers([1] * 6, 2, weights=[10, 10, 10, 10, 30, 30], mem_cap=50)
    with pytest.raises(InputError, match="2 weights for 3 items"):
        balance_stages([1, 2, 3], 2, weights=[1, 2])
    with pytest.raises(InputError, match=">= 0"):
        balance_stages([1, -2, 3], 2)


def test_lm_head_heavy_model_beats_even_split():
    # 8 layers of cost 10, a cheap embedding, an lm_head worth 4 layers (big vocab), pp 4.
    costs, weights = [1] + [10] * 8 + [40], [100] + [10] * 8 + [100]
    even = items_from_layers(even_split(8, 4))
    assert even == ((0, 2), (3, 4), (5, 6), (7, 9))
    split = balance_layers(costs, 4, weights=weights)
    assert split == ((0, 2), (3, 4), (5, 7), (8, 9))
    report = report_stages(costs, weights, split)
    assert [row.cost for row in report.stages] == [21, 20, 30, 50]
    assert [row.cost for row in report.even] == [21, 20, 20, 60]
    assert [row.weight_bytes for row in report.stages] == [120, 20, 30, 110]
    assert (report.bottleneck, report.even_bottleneck, report.lower_bound) == (50, 60, 40)
    assert report.efficiency == pytest.approx(121 / 4 / 50)
    assert report.even_efficiency == pytest.approx(121 / 4 / 60)
    assert (report.gap, report.even_gap) == (pytest.approx(0.25), pytest.approx(0.5))
    assert report.knob == "VLLM_PP_LAYER_PARTITION=2,2,3,1"
    # Letting the head sit alone on a stage reaches the lower bound.
    alone = report_stages(costs, weights, balance_stages(costs, 4))
    assert alone.bottleneck == alone.lower_bound == 40
    assert alone.knob == "VLLM_PP_LAYER_PARTITION=2,3,3,0"


def test_even_split_matches_the_engines():
    assert even_split(32, 4) == layers_from_counts([8, 8, 8, 8])
    # vLLM get_pp_indices: the remainder goes to stages pp-2, pp-3, ... never the last.
    assert even_split(30, 4) == layers_from_counts([7, 8, 8, 7])
    assert even_split(31, 4) == layers_from_counts([8, 8, 8, 7])
    assert even_split(5, 2) == layers_from_counts([3, 2])
    # SGLang: the remainder goes to the last stages.
    assert even_split(30, 4, engine="sglang") == layers_from_counts([7, 7, 8, 8])
    with pytest.raises(LayoutError, match=r"pp=5 stages for 4 decoder layers.*1 <= pp <= 4"):
        even_split(4, 5)
    with pytest.raises(InputError, match="engine='trt'"):
        even_split(4, 2, engine="trt")


def test_items_and_layers_convert_both_ways():
    layers = layers_from_counts([8, 9, 9, 6])
    items = items_from_layers(layers)
    assert items == ((0, 8), (9, 17), (18, 26), (27, 33))
    stages = stage_layers(items, 32)
    assert [(s.first_layer, s.last_layer) for s in stages] == list(layers)
    assert [s.embed for s in stages] == [True, False, False, False]
    assert [s.head for s in stages] == [False, False, False, True]
    head_only = stage_layers(((0, 8), (9, 9)), 8)
    assert head_only[1].n_layers == 0 and head_only[1].head
    assert engine_knob(layers, engine="sglang") == "SGLANG_PP_LAYER_PARTITION=8,9,9,6"
    with pytest.raises(LayoutError, match=r"stage 1 covers items \[10, 33\] but should start"):
        stage_layers(((0, 8), (10, 33)), 32)


def test_explicit_stage_boundaries():
    assert check_stage_layers([[0, 9], [10, 31]], 32, pp=2) == ((0, 9), (10, 31))
    cases = [
        ([[0, 9], [12, 31]], "stage 1 starts at layer 12, .* ended at layer 9.* Start it at 10"),
        ([[0, 9], [9, 31]], "stage 1 starts at layer 9"),
        ([[0, 9], [10, 30]], r"cover layers 0..30, but the model has 32 .* at layer 31"),
        ([[0, 9], [10, 9], [10, 31]], r"stage 1 is \[10, 9\], which is empty"),
        ([[0, 9, 3], [10, 31]], r"stage 0 is \[0, 9, 3\]; write \[first, last\]"),
        ([[1, 9], [10, 31]], "stage 0 starts at layer 1"),
    ]
    for stages, message in cases:
        with pytest.raises(LayoutError, match=message):
            check_stage_layers(stages, 32)
    with pytest.raises(LayoutError, match="recipe.toml: 2 stages given but pp=4"):
        check_stage_layers([[0, 9], [10, 31]], 32, pp=4, where="recipe.toml")


def test_report_serialises_and_renders():
    costs, weights = [1] + [10] * 8 + [40], [1] * 10
    report = report_stages(costs, weights, balance_layers(costs, 4))
    data = report.to_dict()
    assert data["knob"] == report.knob and data["bottleneck"] == 50
    assert data["stages"][0] == {
        "items": [0, 2],
        "layers": [0, 1],
        "embed": True,
        "head": False,
        "cost": 21,
        "weight_bytes": 3,
    }
    text = report.render()
    assert "VLLM_PP_LAYER_PARTITION=2,2,3,1" in text and "lower bound 40 ns;" in text
    row = ["0", "0-1", "0-2", "21", "ns", "3", "B", "0-1", "21", "ns"]  # costs in ns, sizes in B
    assert text.splitlines()[1].split() == row


def test_float_costs_are_solved_exactly_not_truncated():
    """int() would make every cost 0 and return a split with bottleneck 1.3, not 1.2."""
    assert balance_stages([0.4, 0.4, 0.4, 0.9], 2) == ((0, 2), (3, 3))
    assert balance_stages([0.1, 0.2, 0.3], 3) == ((0, 0), (1, 1), (2, 2))
    assert balance_stages([2.5, 0.5, 0.5, 2.75], 2) == ((0, 1), (2, 3))  # int(): ((0, 0), (1, 3))


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.floats(0, 30, allow_subnormal=False), min_size=1, max_size=8),
       pp=st.integers(1, 4))  # fmt: skip
def test_float_balance_matches_exact_brute_force(costs, pp):
    from fractions import Fraction

    exact = [Fraction(c) for c in costs]
    best = brute_force(exact, pp)
    if best is not None:
        split = balance_stages(costs, pp)
        assert max(sum(exact[a : b + 1]) for a, b in split) == best[0][0]
        assert split == best[1]


@pytest.mark.parametrize(
    "costs, message",
    [
        ([1, -1, 2], "costs[1] is -1; costs, weights and caps must be finite and >= 0."),
        ([1, float("nan")], "costs[1] is nan; costs, weights and caps must be finite and >= 0."),
        ([float("inf"), 1], "costs[0] is inf; costs, weights and caps must be finite and >= 0."),
        (["3", 1], "costs[0] is '3' (str); give an int or float."),
        ([True, 1], "costs[0] is True (bool); give an int or float."),
    ],
)
def test_bad_costs_are_refused_by_name(costs, message):
    with pytest.raises(InputError) as e:
        balance_stages(costs, 1)
    assert str(e.value) == message
    with pytest.raises(InputError, match="weights\\[0\\] is -5"):
        balance_stages([1, 2], 1, weights=[-5, 1], mem_cap=10)
    with pytest.raises(InputError, match=r"pp=2.0 \(float\)|pp=2.0: the number of stages"):
        balance_stages([1, 2], 2.0)
