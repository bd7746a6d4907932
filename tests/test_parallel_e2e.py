"""End to end through reshard's own planner and writer: convert tiny real checkpoints at
pipeline and expert-parallel layouts, rebuild every source tensor bitwise from the rank files,
check the manifest's stages and expert maps against what the files hold (and against the
SGLang / TensorRT-LLM exports), and run the shards on gloo worlds only where a world adds
proof: a middle pipeline stage, TP inside stages with per-layer expert maps from a measured
load, and expert replicas at etp = 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from test_convert import assert_bitwise_rebuild  # noqa: E402
from test_runtime_dist import assert_all_tiers_pass  # noqa: E402

from reshard.convert import convert_model  # noqa: E402
from reshard.layout.experts.moe import SGLANG_FILE, TRTLLM_FILE  # noqa: E402
from reshard.layout.experts.place import Placement  # noqa: E402
from reshard.layout.experts.report import ExpertLoad, balancedness, write_expert_load  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.verify.levels import verify_output  # noqa: E402

CHECKPOINTS = {
    "llama": ("LlamaForCausalLM", {"num_hidden_layers": 4}),
    "llama-tied": ("LlamaForCausalLM", {"num_hidden_layers": 4, "tie_word_embeddings": True}),
    "mixtral": ("MixtralForCausalLM", {}),  # E=4, w1/w3/w2 under block_sparse_moe
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_experts": 8}),  # + shared expert
    "qwen3-moe": ("Qwen3MoeForCausalLM", {}),  # E=4, q/k norms
}
GENERATE = {"max_new_tokens": 8}  # verify's own default prompts: 4 distinct, lengths 3..16
_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$"
)
_COLUMN = ("w1", "w3", "gate_proj", "up_proj")


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


def convert(src: Path, out: Path, **recipe) -> dict:
    convert_model(str(src), out, build_recipe(**recipe))
    return json.loads((out / "manifest.json").read_text())


def stage_of(manifest: dict, stage: int) -> range:
    first, last = manifest["layout"]["stages"][stage]["layers"]
    return range(first, last + 1)


def check_stage_files(manifest: dict) -> None:
    """Stages tile the layers in order; each rank holds exactly its stage's layers, the
    embedding on stage 0 only, the final norm and lm_head on the last stage only."""
    lay, hp = manifest["layout"], manifest["hparams"]
    stages = lay["stages"]
    assert [s["stage"] for s in stages] == list(range(lay["pp"]))
    layers = [i for s in range(lay["pp"]) for i in stage_of(manifest, s)]
    assert layers == list(range(hp["num_layers"]))
    assert [s["embed"] for s in stages] == [s == 0 for s in range(lay["pp"])]
    assert [s["head"] for s in stages] == [s == lay["pp"] - 1 for s in range(lay["pp"])]
    for entry in manifest["ranks"]:
        rank, tp, pp = entry["rank"], lay["tp"], lay["pp"]
        assert rank == (entry["dp_index"] * pp + entry["pp_stage"]) * tp + entry["tp_rank"]
        if entry["replica_of"] is not None:  # DP replicas read replica 0's files
            continue
        names = set(entry["tensors"])
        held = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert held == set(stage_of(manifest, entry["pp_stage"])), rank
        last = entry["pp_stage"] == pp - 1
        assert ("model.embed_tokens.weight" in names) == (entry["pp_stage"] == 0), rank
        assert ("model.norm.weight" in names) == last and ("lm_head.weight" in names) == last
        if last and lay["tie_word_embeddings"]:
            pieces = entry["tensors"]["lm_head.weight"]["pieces"]
            assert {p["source"] for p in pieces} == {"model.embed_tokens.weight"}


def check_expert_maps(manifest: dict) -> dict[int, Placement]:
    """Every MoE layer's map: every expert present, no rank holding two replicas of one
    expert, log2phy/logcnt consistent with phy2log. {} when ep = 1."""
    lay, hp = manifest["layout"], manifest["hparams"]
    experts, num_experts = lay["experts"], hp["num_experts"]
    if lay["ep"] == 1:
        assert experts is None
        return {}
    assert (experts["ep"], experts["etp"]) == (lay["ep"], lay["tp"] // lay["ep"])
    assert sorted(map(int, experts["layers"])) == hp["moe_layers"]
    maps = {}
    for layer, m in experts["layers"].items():
        phy2log, per = m["phy2log"], m["slots_per_rank"]
        assert len(phy2log) == num_experts + experts["redundant"] == per * lay["ep"]
        assert set(phy2log) == set(range(num_experts))
        for r in range(lay["ep"]):
            held = phy2log[r * per : (r + 1) * per]
            assert len(set(held)) == len(held), (layer, r, held)
        assert m["logcnt"] == [phy2log.count(e) for e in range(num_experts)]
        for e, slots in enumerate(m["log2phy"]):
            real = [s for s in slots if s >= 0]
            assert len(real) == m["logcnt"][e] and all(phy2log[s] == e for s in real)
        maps[int(layer)] = Placement.from_phy2log(phy2log, lay["ep"], num_experts)
    return maps


def check_expert_files(out: Path, manifest: dict, maps: dict[int, Placement]) -> None:
    """Each rank's files hold exactly the physical experts of its ep_rank on its stage's MoE
    layers, under HF names with logical ids, each the etp_rank slice of that same tensor."""
    lay, hp = manifest["layout"], manifest["hparams"]
    etp, width, hidden = lay["tp"] // lay["ep"], hp["moe_intermediate_size"], hp["hidden_size"]
    local = width // etp
    for entry in manifest["ranks"]:
        ep_rank, etp_rank = divmod(entry["tp_rank"], etp)
        assert entry["ep_rank"] == ep_rank
        if entry["replica_of"] is not None:
            continue
        assert file_tensors(out, entry) == set(entry["tensors"])
        found: dict[int, set[int]] = {}
        for name, meta in entry["tensors"].items():
            m = _EXPERT.match(name)
            if not m:
                continue
            layer, expert, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            found.setdefault(layer, set()).add(expert)
            (piece,) = meta["pieces"]
            assert piece["source"] == name  # the logical id, never the slot
            dim = 0 if kind in _COLUMN else 1
            assert meta["shape"][dim] == local and meta["shape"][1 - dim] == hidden
            assert piece["start"][dim] == etp_rank * local
        moe_here = [i for i in hp["moe_layers"] if i in stage_of(manifest, entry["pp_stage"])]
        assert sorted(found) == moe_here
        for layer in moe_here:
            every = set(range(hp["num_experts"]))
            expected = set(maps[layer].rank_experts(ep_rank)) if maps else every
            assert found[layer] == expected, (entry["rank"], layer)


def file_tensors(out: Path, entry: dict) -> set[str]:
    names: set[str] = set()
    for file in entry["files"]:
        with safe_open(str(out / file), "pt") as f:
            names.update(f.keys())
    return names


def check_exports(out: Path, manifest: dict, maps: dict[int, Placement]) -> None:
    """SGLang's physical_to_logical_map and TRT-LLM's initial_global_assignments are the
    manifest's phy2log, layer by layer; neither file exists without expert parallelism."""
    if not maps:
        assert not (out / SGLANG_FILE).exists() and not (out / TRTLLM_FILE).exists()
        return
    sglang = json.loads((out / SGLANG_FILE).read_text())["physical_to_logical_map"]
    assert len(sglang) == manifest["hparams"]["num_layers"]
    yaml = (out / TRTLLM_FILE).read_text()
    slots = len(next(iter(maps.values())).phy2log)
    assert f"num_slots: {slots}\n" in yaml
    trtllm = {
        int(layer): [int(x) for x in row.split(",")]
        for layer, row in re.findall(r"^  (\d+): \[([\d, ]+)\]$", yaml, flags=re.M)
    }
    assert sorted(trtllm) == sorted(maps)
    for layer, placement in maps.items():
        assert sglang[layer] == trtllm[layer] == list(placement.phy2log)


def check_moe_output(src: Path, out: Path, manifest: dict) -> dict[int, Placement]:
    assert_bitwise_rebuild(src, out)
    check_stage_files(manifest)
    maps = check_expert_maps(manifest)
    check_expert_files(out, manifest, maps)
    check_exports(out, manifest, maps)
    _, results = verify_output(out, levels=("hashes", "weights"))
    assert all(r.passed for r in results), [r.failures for r in results]
    return maps


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


def test_mixtral_tp4_ep4_replicas_generate(tiny, tmp_path):
    """World of 4, etp = 1: every expert has two replicas on two ranks; each (token, expert)
    visit is computed by exactly one of them."""
    manifest = convert(tiny("mixtral"), tmp_path / "out", tp=4, ep=4, redundant=4)
    maps = check_moe_output(tiny("mixtral"), tmp_path / "out", manifest)
    assert all(p.logcnt == (2, 2, 2, 2) and p.slots_per_rank == 2 for p in maps.values())
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)


SKEW = (900, 400, 120, 60, 25, 5, 3, 1)  # tokens per expert, rotated per layer


def skewed_load(path: Path, num_experts: int, layers: list[int]) -> Path:
    rows = {i: tuple(SKEW[(e + 3 * i) % len(SKEW)] for e in range(num_experts)) for i in layers}
    write_expert_load(path, ExpertLoad("skewed", num_experts, rows, prompts=8))
    return path


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
