"""End to end through reshard's own planner and writer: convert tiny real checkpoints at
pipeline and expert-parallel layouts, rebuild every source tensor bitwise from the rank files,
check the manifest's stages and expert maps against what the files hold (and against the
SGLang / TensorRT-LLM exports), and run the shards on gloo worlds only where a world adds
proof: a middle pipeline stage, TP inside stages with per-layer expert maps from a measured
load, and expert replicas at etp = 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from helpers import (  # noqa: E402
    GENERATE,
    SKEW,
    assert_all_tiers_pass,
    assert_bitwise_rebuild,
    check_expert_maps,
    check_moe_output,
    check_stage_files,
    convert,
    skewed_load,
    stage_of,
)

from reshard.convert import convert_model  # noqa: E402
from reshard.layout.experts.report import balancedness  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402

CHECKPOINTS = {
    "llama": ("LlamaForCausalLM", {"num_hidden_layers": 4}),
    "llama-tied": ("LlamaForCausalLM", {"num_hidden_layers": 4, "tie_word_embeddings": True}),
    "mixtral": ("MixtralForCausalLM", {}),  # E=4, w1/w3/w2 under block_sparse_moe
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_experts": 8}),  # + shared expert
    "qwen3-moe": ("Qwen3MoeForCausalLM", {}),  # E=4, q/k norms
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every checkpoint, written once per module on first use; a large init scale so greedy
    ids vary and the router spreads tokens."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, overrides = CHECKPOINTS[name]
            folder = tmp_path_factory.mktemp(name)
            made[name] = write_checkpoint(folder, arch, initializer_range=0.5, **overrides)
        return made[name]

    return get


# --- pipeline stages -------------------------------------------------------------------------


PIPELINES = [
    ("llama", 1, 3),
    ("llama", 2, 2),
    ("llama", 4, 4),  # one layer per stage, kv heads replicated
    ("llama-tied", 1, 2),
    ("llama-tied", 2, 2),
    ("llama-tied", 4, 3),
]


@pytest.mark.parametrize("name, tp, pp", PIPELINES)
def test_pipeline_rebuild(tiny, tmp_path, name, tp, pp):
    manifest = convert(tiny(name), tmp_path / "out", tp=tp, pp=pp)
    assert manifest["layout"]["world_size"] == tp * pp
    assert_bitwise_rebuild(tiny(name), tmp_path / "out")
    check_stage_files(manifest)


@pytest.mark.parametrize("via", ["flags", "toml"])
def test_explicit_stages_are_honoured(tiny, tmp_path, via):
    """The recipe's [first, last] per stage wins over the solver's own split."""
    solved = convert(tiny("llama"), tmp_path / "solved", pp=2)
    if via == "toml":
        recipe = tmp_path / "recipe.toml"
        recipe.write_text("[layout]\npp = 2\nstages = [[0, 0], [1, 3]]\n")
        convert_model(str(tiny("llama")), tmp_path / "out", build_recipe(recipe))
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    else:
        manifest = convert(tiny("llama"), tmp_path / "out", pp=2, stages=((0, 0), (1, 3)))
    assert [s["layers"] for s in manifest["layout"]["stages"]] == [[0, 0], [1, 3]]
    assert [s["layers"] for s in solved["layout"]["stages"]] != [[0, 0], [1, 3]]
    check_stage_files(manifest)
    assert_bitwise_rebuild(tiny("llama"), tmp_path / "out")


@pytest.mark.world
def test_pp3_tied_llama_generates(tiny, tmp_path):
    """World of 3: a middle stage with neither embedding nor head passes hidden states on;
    the tied head is written from embed_tokens on the last stage."""
    manifest = convert(tiny("llama-tied"), tmp_path / "out", pp=3)
    check_stage_files(manifest)
    assert all(len(stage_of(manifest, s)) >= 1 for s in range(3))
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)


# --- expert parallelism ----------------------------------------------------------------------

MOE_LAYOUTS = {
    "tp2": {"tp": 2},  # ep 1: every expert on every rank, split etp = 2 ways
    "ep2": {"tp": 2, "ep": 2},
    "ep2-r2": {"tp": 2, "ep": 2, "redundant": 2},
    "ep2-r2-contiguous": {"tp": 2, "ep": 2, "redundant": 2, "placement": "contiguous"},
    "ep4": {"tp": 4, "ep": 4},
    "ep4-r4": {"tp": 4, "ep": 4, "redundant": 4},
    "tp4-ep2-r2": {"tp": 4, "ep": 2, "redundant": 2},  # expert TP inside each ep_rank
    "pp2-ep2-r2": {"tp": 2, "pp": 2, "ep": 2, "redundant": 2},
}


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_moe_rebuild_and_maps(tiny, tmp_path, name, layout):
    recipe = MOE_LAYOUTS[layout]
    manifest = convert(tiny(name), tmp_path / "out", **recipe)
    maps = check_moe_output(tiny(name), tmp_path / "out", manifest)
    if recipe.get("placement") == "contiguous":
        num_slots = manifest["hparams"]["num_experts"] + recipe["redundant"]
        for placement in maps.values():  # the engines' default map, copies of 0..R-1 last
            assert list(placement.phy2log) == [p % manifest["hparams"]["num_experts"]
                                               for p in range(num_slots)]  # fmt: skip


@pytest.mark.world
def test_mixtral_tp4_ep4_replicas_generate(tiny, tmp_path):
    """World of 4, etp = 1: every expert has two replicas on two ranks; each (token, expert)
    visit is computed by exactly one of them."""
    manifest = convert(tiny("mixtral"), tmp_path / "out", tp=4, ep=4, redundant=4)
    maps = check_moe_output(tiny("mixtral"), tmp_path / "out", manifest)
    assert all(p.logcnt == (2, 2, 2, 2) and p.slots_per_rank == 2 for p in maps.values())
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)


@pytest.mark.world
def test_load_aware_placement_tp2_pp2_generates(tiny, tmp_path):
    """World of 4: a skewed expert_load.json gives every layer its own map, unlike
    contiguous (not just a reordering within ranks), better balanced on that load; TP
    inside both stages, the shared expert, replicas; the shards still generate."""
    src = tiny("qwen2-moe")
    load = skewed_load(tmp_path / "expert_load.json", 8, [0, 1, 2])
    recipe = {"tp": 2, "pp": 2, "ep": 2, "redundant": 2}
    manifest = convert(src, tmp_path / "out", load=load, **recipe)
    assert manifest["layout"]["experts"]["load"] == str(load)
    maps = check_moe_output(src, tmp_path / "out", manifest)
    contiguous = convert(src, tmp_path / "contiguous", placement="contiguous", **recipe)
    trivial = check_expert_maps(contiguous)
    rows = {i: [SKEW[(e + 3 * i) % 8] for e in range(8)] for i in maps}
    for layer, placement in maps.items():
        ranks = [set(placement.rank_experts(r)) for r in range(2)]
        assert ranks != [set(trivial[layer].rank_experts(r)) for r in range(2)], layer
        ours = balancedness(placement.rank_load(rows[layer]))
        assert ours > balancedness(trivial[layer].rank_load(rows[layer])), layer
    assert len({p.phy2log for p in maps.values()}) == 3  # per-layer maps
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)
