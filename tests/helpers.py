"""Shared helpers of the test modules, so no test module imports another for its asserts:
load and rebuild rank files bitwise, run every verify tier on a gloo world, convert and check
a MoE output's stages, expert maps and exports, write a skewed expert load, greedy ids from a
transformers twin.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tolerances import MODEL_ULPS, scaled_bound

from reshard.convert import convert_model
from reshard.layout.experts.moe import SGLANG_FILE, TRTLLM_FILE
from reshard.layout.experts.place import Placement
from reshard.layout.experts.report import ExpertLoad, write_expert_load
from reshard.layout.recipe import build_recipe
from reshard.verify.levels import LEVELS, verify_output

TWIN_NEW_TOKENS = 8  # twin_generate's greedy steps (the quantized tests' NEW_TOKENS)


# --- rank files, rebuilt bitwise ------------------------------------------------------------


def load_source(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_rank(out: Path, rank: int) -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = {}
    for name in manifest["ranks"][rank]["files"]:
        tensors.update(load_file(out / name))
    return tensors


def rebuild(out: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Un-shard in memory from the rank files; every element must be written exactly once
    per distinct block, and replicated blocks must agree."""
    manifest = json.loads((out / "manifest.json").read_text())
    built: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for entry in manifest["ranks"]:
        if entry["replica_of"] is not None:
            continue
        shard = load_rank(out, entry["rank"])
        assert set(shard) == set(entry["tensors"])
        for name, meta in entry["tensors"].items():
            for p in meta["pieces"]:
                src = p["source"]
                if src not in built:
                    built[src] = torch.zeros(shapes[src], dtype=shard[name].dtype)
                    seen[src] = torch.zeros(shapes[src], dtype=torch.bool)
                dst = tuple(
                    slice(d, d + e - s) for d, s, e in zip(p["dest"], p["start"], p["stop"])
                )
                tgt = tuple(slice(s, e) for s, e in zip(p["start"], p["stop"]))
                block = shard[name][dst]
                if seen[src][tgt].any():  # a replica: must equal what is already there
                    assert torch.equal(built[src][tgt], block), (name, entry["rank"])
                built[src][tgt] = block
                seen[src][tgt] = True
            if meta["padding"]:
                assert not shard[name][-meta["padding"] :].any()
    for name, mask in seen.items():
        assert mask.all(), f"{name}: {int((~mask).sum())} elements not in any shard"
    return built


def assert_bitwise_rebuild(src_dir: Path, out: Path) -> None:
    source = load_source(src_dir)
    built = rebuild(out, {k: tuple(v.shape) for k, v in source.items()})
    assert set(built) == set(source)
    for name, tensor in source.items():
        assert built[name].dtype == tensor.dtype, name
        raw = built[name].reshape(-1).view(torch.uint8)  # reshape: 0-dim scalars too
        assert torch.equal(raw, tensor.reshape(-1).view(torch.uint8)), name


# --- every verify tier on a gloo world -----------------------------------------------------


def assert_all_tiers_pass(out: Path, **generate_options) -> list[dict]:
    """hashes, weights and generate through `verify_output` on a CPU gloo world; greedy ids
    identical to the reference on every prompt (no near-tie excuse). Returns the prompt rows."""
    options = {"device": "cpu", **generate_options}
    _, results = verify_output(out, levels=LEVELS, generate_options=options)
    assert [r.level for r in results] == list(LEVELS)
    for result in results:
        assert result.passed, (result.level, result.failures)
    rows = results[-1].data["generation"]["prompts"]
    assert len({tuple(r["prompt_ids"]) for r in rows}) == len(rows) > 1  # distinct prompts
    for row in rows:
        assert row["reference_ids"] == row["sharded_ids"], row
        bound = scaled_bound(torch.tensor(row["max_abs_logit"]), MODEL_ULPS, torch.float32)
        assert row["max_abs_logit_diff"] <= bound, row
    assert len({t for r in rows for t in r["reference_ids"]}) > 3  # generation is not degenerate
    return rows


# --- a converted MoE output: stages, expert maps, exports ----------------------------------


GENERATE = {"max_new_tokens": 8}  # verify's own default prompts: 4 distinct, lengths 3..16


_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$"
)


_COLUMN = ("w1", "w3", "gate_proj", "up_proj")


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


SKEW = (900, 400, 120, 60, 25, 5, 3, 1)  # tokens per expert, rotated per layer


def skewed_load(path: Path, num_experts: int, layers: list[int]) -> Path:
    rows = {i: tuple(SKEW[(e + 3 * i) % len(SKEW)] for e in range(num_experts)) for i in layers}
    write_expert_load(path, ExpertLoad("skewed", num_experts, rows, prompts=8))
    return path


# --- a transformers twin -------------------------------------------------------------------


@torch.no_grad()
def twin_generate(twin, prompt: list[int]) -> list[int]:
    """Greedy with transformers' own forward, no EOS stop (the runtime does not stop)."""
    ids = list(prompt)
    for _ in range(TWIN_NEW_TOKENS):
        ids.append(int(twin(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    """transformers' logits at every position of one prompt, fp32: [L, V]."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def hf_generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy `generate`: the new ids only."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()
