"""Node-aware placement, the variance-penalised placement and the EPLB re-implementation on
plain numbers: no duplicate on a GPU and groups on nodes under hypothesis, the cross-node
share on hand-made maps, EPLB against the published algorithm's known behaviour."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from reshard.cli import main
from reshard.errors import LayoutError
from reshard.layout.experts.eplb import (
    count_duplicates,
    pack_balanced,
    rebalance_experts,
    replicate,
)
from reshard.layout.experts.nodes import (
    NodeLayout,
    check_node_layout,
    cross_node_share,
    place_node_aware,
    place_on_nodes,
)
from reshard.layout.experts.place import place_experts
from reshard.layout.experts.robust import place_robust

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"


@st.composite
def grouped_layouts(draw):
    """(load, NodeLayout, redundant): nodes divide groups, R a multiple of nodes."""
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpn = draw(st.sampled_from([1, 2, 4]))
    groups = nodes * draw(st.integers(1, 3))
    size = draw(st.integers(1, 4))
    num_experts = groups * size
    per_node = num_experts // nodes
    extra = [r for r in range(0, 3 * gpn + 1) if (per_node + r) % gpn == 0]
    extra = [r for r in extra if r <= per_node * (gpn - 1)]
    redundant = nodes * draw(st.sampled_from(extra))
    load = draw(st.lists(st.integers(0, 1000), min_size=num_experts, max_size=num_experts))
    return load, NodeLayout(nodes * gpn, gpn, groups), redundant


def nodes_of_group(phy2log, nodes, num_experts):
    size = num_experts // nodes.num_groups
    per_node = len(phy2log) // nodes.num_nodes
    out = {}
    for slot, e in enumerate(phy2log):
        out.setdefault(e // size, set()).add(slot // per_node)
    return out


@settings(max_examples=120, deadline=None)
@given(grouped_layouts())
def test_groups_on_nodes_never_duplicate_and_keep_groups_whole(case):
    load, nodes, redundant = case
    p = place_on_nodes(load, nodes, redundant)
    assert count_duplicates(p.phy2log, nodes.ep) == 0
    assert sorted(set(p.phy2log)) == list(range(len(load)))
    assert all(len(n) == 1 for n in nodes_of_group(p.phy2log, nodes, len(load)).values())
    assert cross_node_share(p.phy2log, load, nodes) == 0.0


@settings(max_examples=120, deadline=None)
@given(grouped_layouts(), st.sampled_from([0.0, 0.01, 1.0]))
def test_node_aware_never_duplicates_and_keeps_its_promise(case, max_loss):
    load, nodes, redundant = case
    p, kind = place_node_aware(load, nodes, redundant, max_loss=max_loss)
    assert count_duplicates(p.phy2log, nodes.ep) == 0
    flat = place_experts(load, nodes.ep, redundant)
    assert balance(p, load) >= balance(flat, load) - max_loss - 1e-12
    if kind == "grouped":
        assert all(len(n) == 1 for n in nodes_of_group(p.phy2log, nodes, len(load)).values())
    if max_loss == 1.0:
        assert kind == "grouped"


def balance(p, load):
    loads = p.rank_load(load)
    return 1.0 if max(loads) == 0 else sum(loads) / len(loads) / max(loads)


def test_cross_node_share_counts_tokens_off_the_group_home():
    nodes = NodeLayout(ep=2, gpus_per_node=1, num_groups=2)  # 2 nodes, groups {0,1}, {2,3}
    # node 0 holds experts 0, 2; node 1 holds 1, 3: each group splits over both nodes
    assert cross_node_share([0, 2, 1, 3], [10, 30, 5, 5], nodes) == pytest.approx(15 / 50)
    assert cross_node_share([0, 1, 2, 3], [10, 30, 5, 5], nodes) == 0.0


def test_node_layout_errors_name_the_numbers():
    with pytest.raises(LayoutError, match="gpus_per_node=3 does not divide ep=8"):
        check_node_layout(NodeLayout(8, 3, 4), 16, 0)
    with pytest.raises(LayoutError, match="16 experts in 3 groups over 2 nodes"):
        check_node_layout(NodeLayout(8, 4, 3), 16, 0)
    with pytest.raises(LayoutError, match="redundant=3 does not split evenly over 2 nodes"):
        check_node_layout(NodeLayout(8, 4, 4), 16, 3)


def test_node_aware_falls_back_when_grouping_costs_balance():
    # one group carries nearly all tokens: whole groups per node would idle the other node
    load = [100, 100, 100, 100, 1, 1, 1, 1]
    nodes = NodeLayout(ep=4, gpus_per_node=2, num_groups=2)
    p, kind = place_node_aware(load, nodes, 4, max_loss=0.01)
    assert kind != "grouped"
    assert balance(p, load) >= balance(place_experts(load, 4, 4), load) - 0.01


@settings(max_examples=60, deadline=None)
@given(grouped_layouts(), st.floats(0.0, 2.0))
def test_robust_placement_is_a_valid_map(case, penalty):
    load, nodes, redundant = case
    p = place_robust(load, nodes.ep, redundant, penalty=penalty)
    assert count_duplicates(p.phy2log, nodes.ep) == 0
    assert p.logcnt == place_experts(load, nodes.ep, redundant).logcnt


def test_robust_search_never_raises_the_peak_risk():
    load = [60, 25, 20, 14, 9, 8, 5, 3, 1, 1, 1, 1]
    for penalty in (0.5, 1.0, 3.0):
        assert peak_risk(place_robust(load, 4, 4, penalty=penalty), load, penalty) <= peak_risk(
            place_experts(load, 4, 4), load, penalty
        )


def peak_risk(p, load, penalty):
    weight = [x / c for x, c in zip(load, p.logcnt, strict=True)]
    ranks = [[weight[e] for e in p.rank_experts(r)] for r in range(p.ep)]
    return max(sum(w) + penalty * sum(x * x for x in w) ** 0.5 for w in ranks)


def test_eplb_pack_and_replicate_follow_the_published_greedy():
    assert pack_balanced([5, 1, 4, 2], 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    phy2log, logcnt = replicate([9, 3, 1], 5)
    assert phy2log == [0, 1, 2, 0, 0] and logcnt == [3, 1, 1]


def test_eplb_stacks_replicas_reshard_does_not():
    # EPLB replicates experts 1 and 2, then packs the six equal-share replicas by weight
    # alone: each GPU gets both replicas of one expert; reshard's placement never does
    load = [4, 10, 10, 1]
    phy2log = rebalance_experts(load, 6, 1, 1, 2)
    assert phy2log == [1, 1, 0, 2, 2, 3]
    assert count_duplicates(phy2log, 2) == 2
    assert count_duplicates(place_experts(load, 2, 2).phy2log, 2) == 0


def grouped_mixtral(tmp_path):
    """Mixtral-8x7B's config.json plus n_group = 4 (DeepSeek's grouped-routing key), and a
    load file whose groups {0,1} {2,3} {4,5} {6,7} carry equal tokens."""
    config = json.loads((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    model = tmp_path / "grouped"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**config, "n_group": 4}))
    layers = {str(i): [70, 10, 50, 30, 60, 20, 45, 35] for i in range(32)}
    doc = {"format": "reshard-expert-load", "version": 1, "num_experts": 8, "layers": layers}
    load = tmp_path / "expert_load.json"
    load.write_text(json.dumps(doc))
    return model, load


def test_plan_reports_cross_node_share_before_and_after(tmp_path):
    model, load = grouped_mixtral(tmp_path)
    flags = ["--tp", 4, "--ep", 4, "--redundant", 4, "--expert-load", load]
    result = CliRunner().invoke(
        main, ["plan", str(model), *map(str, flags), "--gpus-per-node", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "nodes of 2 GPUs, 4 expert groups, R=4, on calibration load (layers: 32 homed)" in (
        result.output
    )
    # balanced: ranks {0,4,1} {0,2,6} | {7,2,6} {3,4,5}; off-home tokens per group: 0, 25
    # (half of expert 2), 30 (half of 4), 22.5 (half of 6) = 77.5 of 320 = 24.2%
    assert "tokens served off their group's node: balanced 24.2% -> node-aware 17.2%" in (
        result.output
    )
    assert "balancedness (sum): balanced 0.9697 -> node-aware 0.9697" in result.output


def test_recipe_key_and_refusal_without_groups(tmp_path):
    model, load = grouped_mixtral(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[layout]\ntp = 4\nep = 4\n[experts]\ngpus_per_node = 2\nload = "{load}"\n')
    result = CliRunner().invoke(main, ["plan", str(model), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "nodes of 2 GPUs, 4 expert groups, R=0" in result.output
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    result = CliRunner().invoke(main, ["plan", str(plain), "--recipe", str(recipe)])
    assert result.exit_code == 2
    assert (
        f"error: {recipe}: gpus_per_node=2 keeps expert groups (config.json n_group) on nodes, "
        "but MixtralForCausalLM has no expert groups; drop --gpus-per-node" in result.output
    )
    recipe.write_text("[experts]\ngpus_per_node = 0\n")
    result = CliRunner().invoke(main, ["plan", str(model), "--recipe", str(recipe)])
    assert result.exit_code == 2
    assert "experts.gpus_per_node must be a positive integer, got 0." in result.output


NODES = NodeLayout(ep=4, gpus_per_node=2, num_groups=4)


def test_convert_keeps_groups_on_nodes_and_verifies_bitwise(tmp_path):
    pytest.importorskip("transformers")
    from checkpoints import write_checkpoint

    src = write_checkpoint(tmp_path / "src", "MixtralForCausalLM", num_local_experts=8, n_group=4)
    assert json.loads((src / "config.json").read_text())["n_group"] == 4
    # the flat balanced placement splits groups here (20% of tokens off-node); grouped
    # placement balances as well (0.897 both)
    layers = {str(i): [18, 73, 98, 9, 33, 16, 64, 98] for i in range(3)}
    assert cross_node_share(place_experts(layers["0"], 4, 0).phy2log, layers["0"], NODES) > 0.19
    load = tmp_path / "expert_load.json"
    doc = {"format": "reshard-expert-load", "version": 1, "num_experts": 8, "layers": layers}
    load.write_text(json.dumps(doc))
    out = tmp_path / "out"
    flags = ["--tp", "4", "--ep", "4", "--gpus-per-node", "2", "--expert-load", str(load)]
    result = CliRunner().invoke(main, ["convert", str(src), *flags, "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    experts = json.loads((out / "manifest.json").read_text())["layout"]["experts"]
    for entry in experts["layers"].values():
        phy2log = entry["phy2log"]
        assert count_duplicates(phy2log, 4) == 0
        assert all(len(n) == 1 for n in nodes_of_group(phy2log, NODES, 8).values())
    result = CliRunner().invoke(main, ["verify", str(out), "--level", "weights"])
    assert result.exit_code == 0, result.output
