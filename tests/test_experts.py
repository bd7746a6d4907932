"""Expert placement on plain numbers: replica counts against brute force, the no-duplicate
rule and map consistency under hypothesis, balance on a skewed load, the lower bound against
exhaustive search, error messages by their text, the load file, and the engine exports."""

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reshard.errors import InputError, LayoutError
from reshard.layout.experts.place import (
    Placement,
    fits_after,
    pack_replicas,
    place_experts,
    place_model,
    replica_counts,
)
from reshard.layout.experts.report import (
    ExpertLoad,
    balancedness,
    format_placement_report,
    imbalance_ratio,
    lower_bound_max_load,
    overall_balancedness,
    read_expert_load,
    redundant_bytes,
    report_placement,
    to_sglang,
    to_trtllm_yaml,
    write_expert_load,
)


@st.composite
def layouts(draw, max_ep=6, max_experts=24):
    """(load, ep, redundant) with (E + R) % ep == 0 and R small enough to place."""
    ep = draw(st.integers(1, max_ep))
    num_experts = draw(st.integers(1, max_experts))
    extra = draw(st.integers(0, 3))
    redundant = (-num_experts) % ep + extra * ep
    if redundant > num_experts * (ep - 1):
        redundant = (-num_experts) % ep
    counts = st.one_of(st.integers(0, 5), st.floats(0, 1e6, allow_nan=False))
    load = draw(st.lists(counts, min_size=num_experts, max_size=num_experts))
    return load, ep, redundant


def peak_per_replica(load, counts):
    return max(x / c for x, c in zip(load, counts, strict=True))


def check_maps(p: Placement, num_experts: int, ep: int) -> None:
    """Every invariant an engine relies on."""
    assert p.ep == ep and p.num_slots == ep * p.slots_per_rank
    for r in range(ep):
        held = p.rank_experts(r)
        assert len(set(held)) == len(held), f"rank {r} holds a duplicate: {held}"
    assert all(c >= 1 for c in p.logcnt) and len(p.logcnt) == num_experts
    width = max(p.logcnt)
    for e, row in enumerate(p.log2phy):
        assert len(row) == width
        assert row[: p.logcnt[e]] == tuple(sorted(row[: p.logcnt[e]]))
        assert all(s == -1 for s in row[p.logcnt[e] :])
        assert all(p.phy2log[s] == e for s in row[: p.logcnt[e]])
    assert sum(p.logcnt) == p.num_slots


# -- replica counts -----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=5),
    st.integers(0, 5),
    st.integers(1, 4),
)
def test_replica_counts_optimal_against_brute_force(load, extra, cap):
    slots = len(load) + extra
    if slots > len(load) * cap:
        with pytest.raises(LayoutError):
            replica_counts(load, slots, max_replicas=cap)
        return
    counts = replica_counts(load, slots, max_replicas=cap)
    assert sum(counts) == slots and all(1 <= c <= cap for c in counts)
    best = min(
        peak_per_replica(load, c)
        for c in itertools.product(range(1, cap + 1), repeat=len(load))
        if sum(c) == slots
    )
    assert math.isclose(peak_per_replica(load, counts), best)


def test_replicas_capped_at_ep_unlike_eplb():
    # Uncapped (EPLB), expert 0 takes 3 of 4 slots on 2 ranks: two copies must share a rank.
    assert replica_counts([10, 1], 4) == [3, 1]
    p = place_experts([10, 1], ep=2, redundant=2)
    assert p.logcnt == (2, 2) and p.rank_experts(0) != (0, 0)


def test_replica_counts_break_ties_by_lowest_id():
    assert replica_counts([5, 5, 5], 5) == [2, 2, 1]
    assert replica_counts([0, 0], 3) == [2, 1]


# -- placement invariants -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_balanced_never_duplicates_and_maps_agree(layout):
    load, ep, redundant = layout
    p = place_experts(load, ep, redundant)
    check_maps(p, len(load), ep)
    assert list(p.logcnt) == replica_counts(load, len(load) + redundant, max_replicas=ep)
    assert p == place_experts(load, ep, redundant), "placement must be deterministic"


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_contiguous_maps_agree(layout):
    load, ep, redundant = layout
    p = place_experts(load, ep, redundant, placement="contiguous")
    check_maps(p, len(load), ep)
    assert p.phy2log == tuple(s % len(load) for s in range(len(load) + redundant))


def test_contiguous_and_round_robin_layouts():
    contiguous = place_experts([1.0] * 8, 4, placement="contiguous")
    assert [contiguous.rank_experts(r) for r in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    robin = place_experts([1.0] * 8, 4, placement="round_robin")
    assert [robin.rank_experts(r) for r in range(4)] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_gale_ryser_fallback_avoids_stacking():
    # Heaviest-first alone fills rank 1 with the three 1s, leaving expert 4's two replicas
    # only rank 0: EPLB's packing would stack them there.
    held = pack_replicas([100, 1, 1, 1, 0.5], [1, 1, 1, 1, 2], ep=2, slots_per_rank=3)
    assert all(4 in rank for rank in held)
    # One expert needs 1 rank, one needs 2 distinct ranks: [1, 2] free fits, [0, 3] not.
    assert fits_after([2, 2], [0], [0, 1, 1]) and not fits_after([1, 3], [0], [0, 1, 1])


def test_swap_search_fixes_heaviest_first():
    # LPT puts {3, 2, 2} = 7 on one rank; the optimum is {3, 3, 0} / {2, 2, 2} = 6 each.
    p = place_experts([3, 3, 2, 2, 2, 0], 2)
    assert p.rank_load([3, 3, 2, 2, 2, 0]) == (6.0, 6.0)


def test_choose_replica_cycles_over_replicas():
    load = [100.0] + [1.0] * 7
    p = place_experts(load, 4, 4)
    assert p.logcnt[0] == 4
    ranks = [p.choose_replica(0, t) for t in range(8)]
    assert sorted(ranks[:4]) == [0, 1, 2, 3] and ranks[4:] == ranks[:4]
    assert all(5 in p.rank_experts(p.choose_replica(5, t)) for t in range(3))


def test_from_phy2log_refuses_a_duplicate_on_a_rank():
    with pytest.raises(LayoutError, match="ep_rank 0 holds expert 1 twice"):
        Placement.from_phy2log([1, 1, 0, 2], ep=2, num_experts=3)
    with pytest.raises(LayoutError, match=r"experts \[2\] have no slot"):
        Placement.from_phy2log([0, 1, 0, 1], ep=2, num_experts=3)


# -- quality ------------------------------------------------------------------------------


def lognormal_load(seed=0, n=128, sigma=2.0):
    rng = random.Random(seed)
    return [rng.lognormvariate(0.0, sigma) for _ in range(n)]


def test_balanced_reaches_099_on_skewed_128_experts_over_8_ranks():
    # sigma = 2: the heaviest expert alone carries 1.68x a rank's fair share, so with R = 0
    # no placement beats mean/max = 0.597 (the lower bound). R = 8, one spare slot per rank
    # (+6% expert memory), lets it take 2 replicas; then balance is near perfect.
    load = lognormal_load()
    fair = sum(load) / 8
    assert max(load) / fair == pytest.approx(1.68, abs=0.01)
    without = place_experts(load, 8, 0)
    bound_r0 = fair / lower_bound_max_load(load, 8, 0)
    assert balancedness(without.rank_load(load)) == pytest.approx(0.594, abs=0.001)
    assert balancedness(without.rank_load(load)) <= bound_r0 + 1e-12
    assert balancedness(without.rank_load(load)) >= 0.99 * bound_r0
    with_spare = place_experts(load, 8, 8)
    assert balancedness(with_spare.rank_load(load)) >= 0.99
    contiguous = place_experts(load, 8, 8, placement="contiguous")
    assert balancedness(contiguous.rank_load(load)) < 0.6


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=4),
    st.sampled_from([(2, 0), (2, 2), (3, 0), (3, 3)]),
)
def test_lower_bound_holds_against_every_placement(load, ep_and_extra):
    ep, extra = ep_and_extra
    redundant = (-len(load)) % ep + extra
    if redundant > len(load) * (ep - 1) or (len(load) + redundant) % ep:
        return
    per_rank = (len(load) + redundant) // ep
    bound = lower_bound_max_load(load, ep, redundant)
    best = math.inf
    rank_sets = list(itertools.combinations(range(len(load)), per_rank))
    for ranks in itertools.product(rank_sets, repeat=ep):
        try:
            p = Placement.from_phy2log([e for rank in ranks for e in rank], ep, len(load))
        except LayoutError:
            continue
        best = min(best, max(p.rank_load(load)))
    assert bound <= best + 1e-9
    assert max(place_experts(load, ep, redundant).rank_load(load)) >= bound - 1e-9


def test_balancedness_figures():
    assert balancedness([2, 2, 2]) == 1.0 and balancedness([0, 0]) == 1.0
    assert balancedness([1, 3]) == 2 / 3 and imbalance_ratio([1, 3]) == pytest.approx(0.5)
    mean, total = overall_balancedness([[1, 1], [0, 2]])
    assert mean == 0.75 and total == pytest.approx(2 / 3)
    assert redundant_bytes(32, 10, num_moe_layers=58) == 32 * 10 * 58


# -- errors -------------------------------------------------------------------------------


def test_indivisible_slots_suggest_valid_redundant():
    with pytest.raises(LayoutError) as err:
        place_experts([1.0] * 60, 8)
    assert str(err.value) == "E=60 is not divisible by ep=8; use redundant = 4 or 12"
    with pytest.raises(LayoutError) as err:
        place_experts([1.0] * 60, 8, 7)
    assert str(err.value) == "E+R=60+7=67 is not divisible by ep=8; use redundant = 4 or 12"


def test_other_layout_refusals_name_the_fix():
    with pytest.raises(LayoutError, match="round_robin has no place for redundant=4"):
        place_experts([1.0] * 4, 4, 4, placement="round_robin")
    with pytest.raises(LayoutError, match="use redundant <= 4"):
        place_experts([1.0] * 4, 2, 6)
    with pytest.raises(LayoutError, match="unknown placement 'greedy'"):
        place_experts([1.0] * 4, 2, placement="greedy")
    with pytest.raises(InputError, match="expert 1 has load -1"):
        place_experts([1.0, -1.0], 2)


def test_place_model_uniform_and_checked_loads():
    placed = place_model(None, 8, [1, 2], 4, 4)
    assert sorted(placed) == [1, 2] and placed[1].logcnt == (2, 2, 2, 2, 1, 1, 1, 1)
    with pytest.raises(InputError, match=r"missing \[2\]"):
        place_model({1: [1.0] * 8}, 8, [1, 2], 4)
    with pytest.raises(InputError, match="layer 1 has loads for 7 experts, the model has 8"):
        place_model({1: [1.0] * 7}, 8, [1], 4)


# -- load file ----------------------------------------------------------------------------


def write_doc(path, **changes):
    doc = {
        "format": "reshard-expert-load",
        "version": 1,
        "model": "toy",
        "num_experts": 4,
        "layers": {"1": [1, 2, 3, 4], "3": [4, 3, 2, 1]},
        "heldout": {"1": [1, 1, 1, 1], "3": [2, 2, 2, 2]},
        "prompts": 8,
        "heldout_prompts": 2,
    }
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def test_load_file_round_trip(tmp_path):
    data = ExpertLoad("toy", 2, {5: (1, 2.5)}, {5: (0, 3)}, prompts=4, heldout_prompts=1)
    write_expert_load(tmp_path / "expert_load.json", data)
    assert read_expert_load(tmp_path / "expert_load.json") == data
    assert json.loads((tmp_path / "expert_load.json").read_text())["layers"] == {"5": [1, 2.5]}
    assert read_expert_load(write_doc(tmp_path / "b.json")).layers[3] == (4, 3, 2, 1)
    with pytest.raises(ValueError):
        write_expert_load(tmp_path / "nan.json", ExpertLoad("toy", 1, {0: (math.nan,)}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers": {"1": [1, 2, 3]}}, "layers layer 1 has 3 expert counts, num_experts is 4"),
        ({"layers": {"2": [1, -2, 3, 4]}}, "layers layer 2 expert 1 is negative (-2)"),
        ({"layers": {"2": [1, "x", 3, 4]}}, "layers layer 2 expert 1 is 'x', not a number"),
        ({"layers": {"2": [1, True, 3, 4]}}, "layers layer 2 expert 1 is True, not a number"),
        ({"heldout": {"1": [0, 0, 0, 0.5, 1]}}, "heldout layer 1 has 5 expert counts"),
        ({"heldout": {"1": [0] * 4}}, "heldout covers layers [1]..., layers covers [1, 3]"),
        ({"layers": {"first": [1] * 4}}, "layers has key 'first'; keys are layer numbers"),
        ({"layers": {"03": [1] * 4}}, "layers has key '03'; keys are layer numbers"),
        ({"layers": {}}, '"layers" is empty'),
        ({"format": "eplb"}, "format is 'eplb', not 'reshard-expert-load'"),
        ({"version": 2}, "version 2, this reshard reads 1"),
        ({"num_experts": 0}, "num_experts is 0, need an integer >= 1"),
    ],
)
def test_load_file_errors_name_file_layer_and_fix(tmp_path, changes, message):
    path = write_doc(tmp_path / "expert_load.json", **changes)
    with pytest.raises(InputError) as err:
        read_expert_load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_load_file_not_json_or_missing(tmp_path):
    bad = tmp_path / "expert_load.json"
    for text, says in [('{"layers": [NaN]}', "NaN is not JSON"), ("[" * 2000, "deeper than 127")]:
        bad.write_text(text)
        with pytest.raises(InputError, match=f"{bad}: .*{says}.*reshard profile experts"):
            read_expert_load(bad)
    with pytest.raises(InputError, match="no such expert load file"):
        read_expert_load(tmp_path / "absent.json")
    write_doc(bad, layers={"1": [1, math.nan, 1, 1], "3": [1] * 4})
    with pytest.raises(InputError, match="key 'layers.1.1': NaN is not JSON"):
        read_expert_load(bad)


# -- engine exports and the report --------------------------------------------------------


def model_placements(redundant=4):
    loads = {3: [9, 1, 1, 1, 5, 1, 1, 1], 4: [1, 1, 1, 1, 1, 1, 1, 9]}
    return loads, place_model(loads, 8, [3, 4], 4, redundant)


def test_sglang_export_structure():
    _, placed = model_placements()
    doc = json.loads(json.dumps(to_sglang(placed, num_layers=6)))
    assert list(doc) == ["physical_to_logical_map"]
    rows = doc["physical_to_logical_map"]
    assert len(rows) == 6 and all(len(row) == 12 for row in rows)
    assert rows[3] == list(placed[3].phy2log) and rows[4] == list(placed[4].phy2log)
    assert rows[0] == [p % 8 for p in range(12)]  # dense layer: SGLang's trivial map
    with pytest.raises(LayoutError, match="num_layers=4 but MoE layer 4 is placed"):
        to_sglang(placed, num_layers=4)


def test_trtllm_export_structure():
    _, placed = model_placements()
    text = to_trtllm_yaml(placed)
    assert text.splitlines()[:3] == [
        "num_slots: 12",
        "layer_updates_per_iter: 0",
        "initial_global_assignments:",
    ]
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(text)
    assert doc["num_slots"] == 12 and doc["layer_updates_per_iter"] == 0
    assert doc["initial_global_assignments"] == {k: list(p.phy2log) for k, p in placed.items()}


def test_exports_refuse_mixed_layers():
    placed = {1: place_experts([1.0] * 8, 4), 2: place_experts([1.0] * 8, 4, 4)}
    with pytest.raises(LayoutError, match="engines need the same for every layer"):
        to_trtllm_yaml(placed)


def test_report_balanced_beats_contiguous():
    loads, _ = model_placements()
    heldout = {k: [x + 1 for x in v] for k, v in loads.items()}
    report = report_placement(loads, heldout, ep=4, redundant=(0, 4), bytes_per_expert=1000)
    names = [(s.placement, s.redundant) for s in report.strategies]
    assert names == [("contiguous", 0), ("balanced", 0), ("contiguous", 4), ("balanced", 4)]
    contiguous, balanced = report.strategies[2], report.strategies[3]
    assert balanced.sum > contiguous.sum and balanced.heldout_sum is not None
    assert balanced.gap >= 0 and balanced.extra_bytes == 4 * 1000 * 2
    text = format_placement_report(report)
    assert "balanced R=4" in text and len(text.splitlines()) == 4 + 2 + 4  # head, layers, overall


def test_place_experts_reads_a_tensor_row_and_checks_its_types():
    torch = pytest.importorskip("torch")
    counts = torch.tensor([5.0, 1.0, 1.0, 3.0])
    assert place_experts(counts, 2) == place_experts([5.0, 1.0, 1.0, 3.0], 2)
    with pytest.raises(InputError) as e:
        place_experts(torch.ones(2, 4), 2)
    assert str(e.value) == (
        "expert 0 has load [1.0, 1.0, 1.0, 1.0] (list); loads are token counts >= 0, one "
        "number per expert"
    )
    with pytest.raises(InputError, match=r"^ep=2.0 \(float\); give an int.$"):
        place_experts([1, 2, 3, 4], 2.0)
    with pytest.raises(InputError, match=r"^load is a str; give one number per expert"):
        place_experts("1234", 2)


def test_place_model_wants_a_dict_of_layers():
    with pytest.raises(InputError) as e:
        place_model([[1, 2, 3, 4]], 4, [0], 2)
    assert str(e.value) == (
        "loads is a list; give a dict {MoE layer index: [load per expert]} (as `reshard "
        "profile experts` writes it), or None for uniform"
    )
    with pytest.raises(InputError, match=r"^moe_layers is 0; give a list of layer indices$"):
        place_model({0: [1, 2, 3, 4]}, 4, 0, 2)
    assert place_model({0: (1, 2, 3, 4)}, 4, [0], 2)[0] == place_experts([1, 2, 3, 4], 2)
