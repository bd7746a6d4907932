"""The sharded runtime on gloo worlds of 2 and 4 CPU processes against the world-size-1
reference: identical greedy ids and logits within the fp32 tolerance, on distinct prompts of
different lengths. TP uses reshard's own convert; layouts whose planner pieces are not
exercised here (PP, EP placements, fused experts, DP) are sharded in this file by
docs/conventions.md, which also pins that contract from the runtime's side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402

from reshard.errors import CheckpointError, OutputError  # noqa: E402
from reshard.hparams import HParams, load_hparams  # noqa: E402
from reshard.runtime.compare import Tolerance, compare_results, tolerance_for  # noqa: E402
from reshard.runtime.dist import Comm  # noqa: E402
from reshard.runtime.generate import PromptResult, generate_greedy  # noqa: E402
from reshard.runtime.launch import generate_reference, generate_sharded  # noqa: E402
from reshard.runtime.load import load_rank  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402
from reshard.runtime.moe import build_expert_map  # noqa: E402
from reshard.runtime.verify_generate import verify_generation  # noqa: E402

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 6
# E=4 experts on ep=2 ranks with 3 slots each: experts 0 and 1 have two replicas.
REDUNDANT = {
    "ep": 2,
    "slots_per_rank": 3,
    "phy2log": [0, 1, 2, 3, 0, 1],
    "log2phy": [[0, 4], [1, 5], [2, -1], [3, -1]],
    "logcnt": [2, 2, 1, 1],
}


# --- test-side sharding by docs/conventions.md ---------------------------------------------


def shard_tensor(hp: HParams, name: str, t: torch.Tensor, tp_rank: int, lay: dict):
    """This rank's local tensor for `name`, or None if the rank does not hold it."""
    tp, etp = lay["tp"], lay["tp"] // lay["ep"]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        padded = torch.cat([t, t.new_zeros(lay["vocab_padded"] - t.shape[0], t.shape[1])])
        return padded.chunk(tp)[tp_rank]
    if ".experts." in name:
        return _shard_expert(name, t, tp_rank // etp, tp_rank % etp, etp, lay)
    last = name.rsplit(".", 2)[-2]
    if last == "q_proj":
        return t.chunk(tp)[tp_rank]
    if last in ("k_proj", "v_proj"):
        if hp.num_kv_heads >= tp:
            return t.chunk(tp)[tp_rank]
        return t.chunk(hp.num_kv_heads)[tp_rank * hp.num_kv_heads // tp]
    if last in ("gate_proj", "up_proj"):
        return t.chunk(tp)[tp_rank]
    if last in ("o_proj", "down_proj") and name.endswith("weight"):
        return t.chunk(tp, dim=1)[tp_rank]
    return t  # norms, router gate, shared_expert_gate, o/down biases: whole


def _shard_expert(name, t, ep_rank, etp_rank, etp, lay):
    expert = int(name.split(".experts.")[1].split(".")[0])
    layer_map = lay["experts"]["layers"]["0"] if lay["experts"] else None
    if layer_map is not None:
        per = layer_map["slots_per_rank"]
        if expert not in layer_map["phy2log"][ep_rank * per : (ep_rank + 1) * per]:
            return None
    if name.endswith(("w2.weight", "down_proj.weight")):
        return t.chunk(etp, dim=1)[etp_rank]
    return t.chunk(etp)[etp_rank]


def fuse_experts(tensors: dict, experts_in_slot_order: list[int]) -> dict:
    """Per-expert Qwen names -> experts.gate_up_proj [E_l, 2I_l, H] / down_proj [E_l, H, I_l]."""
    out, prefixes = {}, set()
    for name, t in tensors.items():
        if ".experts." in name:
            prefixes.add(name.split("experts.")[0])
        else:
            out[name] = t
    for p in prefixes:
        gu = [torch.cat([tensors[f"{p}experts.{e}.{w}.weight"] for w in ("gate_proj", "up_proj")])
              for e in experts_in_slot_order]  # fmt: skip
        out[f"{p}experts.gate_up_proj"] = torch.stack(gu).contiguous()
        downs = [tensors[f"{p}experts.{e}.down_proj.weight"] for e in experts_in_slot_order]
        out[f"{p}experts.down_proj"] = torch.stack(downs).contiguous()
    return out


def shard_checkpoint(src: Path, out: Path, *, tp=1, pp=1, dp=1, ep=1, experts=None, fused=False):
    """Write rank-NNNNN.safetensors + a minimal manifest.json for the given layout."""
    hp, full = load_hparams(src), load_file(src / "model.safetensors")
    if hp.tie_word_embeddings:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    vp = -(-hp.vocab_size // tp) * tp
    layers = [list(c) for c in torch.arange(hp.num_layers).tensor_split(pp)]
    emaps = {str(i): experts for i in hp.moe_layers} if experts else None
    lay = dict(tp=tp, pp=pp, ep=ep, dp=dp, world_size=tp * pp * dp, vocab_size=hp.vocab_size,
               vocab_padded=vp, dtype="keep", experts={"layers": emaps} if emaps else None,
               stages=[{"stage": s, "layers": [int(ls[0]), int(ls[-1])], "embed": s == 0,
                        "head": s == pp - 1} for s, ls in enumerate(layers)])  # fmt: skip
    ranks = []
    for rank in range(tp * pp * dp):
        dp_index, stage, tp_rank = rank // (tp * pp), rank // tp % pp, rank % tp
        entry = dict(rank=rank, dp_index=dp_index, pp_stage=stage, tp_rank=tp_rank,
                     ep_rank=tp_rank // (tp // ep), files=[f"rank-{rank:05d}.safetensors"],
                     replica_of=rank - dp_index * tp * pp if dp_index else None)  # fmt: skip
        if dp_index == 0:
            entry["tensors"] = _write_rank(hp, full, out, lay, entry, layers[stage], fused)
        ranks.append(entry)
    manifest = dict(format="reshard-manifest", format_version=1, hparams=hp.to_dict(),
                    layout=lay, files={}, ranks=ranks)  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))


def _write_rank(hp, full, out, lay, entry, stage_layers, fused):
    keep = {}
    for name, t in full.items():
        if not _on_stage(name, stage_layers, entry["pp_stage"], lay["pp"]):
            continue
        local = shard_tensor(hp, name, t, entry["tp_rank"], lay)
        if local is not None:
            keep[name] = local.contiguous().clone()
    if fused:
        layer_map = lay["experts"]["layers"]["0"]
        per, ep_rank = layer_map["slots_per_rank"], entry["ep_rank"]
        keep = fuse_experts(keep, layer_map["phy2log"][ep_rank * per : (ep_rank + 1) * per])
    file = entry["files"][0]
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, out / file)
    return {n: {"file": file, "shape": list(t.shape)} for n, t in keep.items()}


def _on_stage(name: str, stage_layers: list, stage: int, pp: int) -> bool:
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) in stage_layers
    if name == "model.embed_tokens.weight":
        return stage == 0
    return stage == pp - 1  # final norm, lm_head


# --- worlds ----------------------------------------------------------------------------------


def assert_matches_reference(src: Path, out: Path) -> None:
    reference = generate_reference(src, PROMPTS, NEW_TOKENS)
    sharded = generate_sharded(out, PROMPTS, NEW_TOKENS, device="cpu")
    assert [r.index for r in sharded] == list(range(len(PROMPTS)))
    for c in compare_results(reference, sharded, tolerance_for(torch.float32)):
        assert c.passed, c
        assert c.reference_ids == c.sharded_ids
    assert len({t for r in reference for t in r.tokens}) > 3  # fixture sanity


def test_tp4_llama_from_convert(tmp_path):
    """kv_heads 2 < tp 4 (replicated kv), vocab 101 padded to 104, tied embeddings, o/mlp biases."""
    from reshard.convert import convert_model
    from reshard.recipe import Recipe

    src = write_checkpoint(
        tmp_path / "src", "LlamaForCausalLM", tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, initializer_range=0.5,
    )  # fmt: skip
    out = tmp_path / "out"
    convert_model(str(src), out, Recipe(tp=4))
    manifest = json.loads((out / "manifest.json").read_text())
    level = verify_generation(out, manifest, src, prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert level.passed, level.failures
    rows = level.data["generation"]["prompts"]
    assert [r["prompt_ids"] for r in rows] == PROMPTS
    assert all(r["reference_ids"] == r["sharded_ids"] for r in rows)
    assert all(r["max_abs_logit_diff"] <= 1e-4 for r in rows)


def test_tp2_ep2_qwen2_moe_redundant_experts(tmp_path):
    """Shared expert + routed experts split over ep=2 with replicated experts 0 and 1."""
    src = write_checkpoint(tmp_path / "src", "Qwen2MoeForCausalLM", initializer_range=0.5)
    shard_checkpoint(src, tmp_path / "out", tp=2, ep=2, experts=REDUNDANT)
    assert_matches_reference(src, tmp_path / "out")


def test_dp2_pp2_mistral_sliding_window(tmp_path):
    """Two replicas (replica_of) of a 2-stage pipeline; the window (4) is shorter than prompts."""
    src = write_checkpoint(
        tmp_path / "src", "MistralForCausalLM", sliding_window=4, initializer_range=0.5
    )
    shard_checkpoint(src, tmp_path / "out", pp=2, dp=2)
    assert_matches_reference(src, tmp_path / "out")


def test_tp2_pp2_mixtral(tmp_path):
    """Every expert on every rank, split etp=2 ways; stages pass hidden states."""
    src = write_checkpoint(tmp_path / "src", "MixtralForCausalLM", initializer_range=0.5)
    shard_checkpoint(src, tmp_path / "out", tp=2, pp=2)
    assert_matches_reference(src, tmp_path / "out")


def test_tp4_ep2_qwen3_moe_fused_experts(tmp_path):
    """ep=2 x etp=2, redundant experts, fused 3-D expert tensors in slot order."""
    src = write_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM", initializer_range=0.5)
    shard_checkpoint(src, tmp_path / "out", tp=4, ep=2, experts=REDUNDANT, fused=True)
    assert_matches_reference(src, tmp_path / "out")


# --- in-process pieces (no world) ----------------------------------------------------------


def test_expert_replicas_are_computed_exactly_once(tmp_path):
    """Summing every ep rank's routed partial output gives the unsharded MoE output."""
    src = write_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM", initializer_range=0.5)
    hp, full = load_hparams(src), load_file(src / "model.safetensors")
    block = build_model(hp, full).model.layers["0"].mlp
    x = torch.randn(40, hp.hidden_size)
    weights, experts = block.route(x)
    expected = block.routed_partial(x, weights, experts)
    total = torch.zeros_like(expected)
    for ep_rank in range(2):
        block.emap = build_expert_map(hp.num_experts, REDUNDANT, ep_rank)
        total += block.routed_partial(x, weights, experts)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    emap = build_expert_map(hp.num_experts, REDUNDANT, 1)
    assert emap.local_experts == (3, 0, 1)
    assert emap.local_slot[0].tolist() == [-1, 1]  # replica 1 of expert 0 is slot 4 = local 1


def test_missing_rank_file_is_an_output_error(tmp_path):
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM")
    shard_checkpoint(src, tmp_path / "out", tp=2)
    (tmp_path / "out" / "rank-00001.safetensors").unlink()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    with pytest.raises(OutputError, match=r"rank-00001.safetensors: missing \(rank 1\)"):
        load_rank(tmp_path / "out", manifest, 1, comm=Comm(tp=2, tp_rank=1))


def test_rank_errors_reach_the_caller_as_reshard_errors(tmp_path):
    """A spawned rank that fails to load raises the same error class in the caller."""
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM")
    shard_checkpoint(src, tmp_path / "out", tp=2)
    (tmp_path / "out" / "rank-00001.safetensors").unlink()
    with pytest.raises(OutputError, match="rank 1"):
        generate_sharded(tmp_path / "out", PROMPTS, 2, device="cpu")


def test_expert_load_counts_real_tokens_only(tmp_path):
    src = write_checkpoint(tmp_path / "src", "MixtralForCausalLM")
    model = build_model(load_hparams(src), load_file(src / "model.safetensors"))
    model.enable_expert_load()
    generate_greedy(model, PROMPTS, 3)  # prefill + 2 decode steps, padding excluded
    tokens = sum(len(p) for p in PROMPTS) + 2 * len(PROMPTS)
    load = model.read_expert_load()
    assert sorted(load) == [0, 1, 2]
    assert all(sum(counts) == tokens * 2 for counts in load.values())  # top-2


def _result(tokens, logits):
    return PromptResult(0, [1, 2], tokens, torch.tensor(logits, dtype=torch.float32))


def test_compare_accepts_near_ties_and_flags_real_divergence():
    tol = Tolerance(atol=0.1, rtol=0.0, kl=1.0)
    ref = _result([0, 1], [[3.0, 0.0, 0.0], [0.0, 2.0, 1.95]])
    tie = _result([0, 2], [[3.0, 0.0, 0.0], [0.0, 1.95, 2.0]])  # step 1: 2.0 vs 1.95
    wrong = _result([0, 2], [[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # the reference says 1.95 vs 2
    off = _result([0, 1], [[3.0, 0.5, 0.0], [0.0, 2.0, 1.95]])  # same ids, logits off
    (c_tie,) = compare_results([ref], [tie], tol)
    assert (c_tie.first_mismatch, c_tie.near_tie, c_tie.passed) == (1, True, True)
    ref_far = _result([0, 1], [[3.0, 0.0, 0.0], [0.0, 2.0, 0.5]])
    (c_wrong,) = compare_results([ref_far], [wrong], tol)
    assert (c_wrong.first_mismatch, c_wrong.near_tie, c_wrong.passed) == (1, False, False)
    (c_off,) = compare_results([ref], [off], tol)
    assert c_off.first_mismatch is None and not c_off.passed and c_off.max_abs == 0.5


def test_last_stage_without_lm_head_is_refused(tmp_path):
    """Tied embeddings under pp > 1: the head must be written on the last stage."""
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM", tie_word_embeddings=True)
    full = load_file(src / "model.safetensors")
    last_stage = {k: v for k, v in full.items() if k != "model.embed_tokens.weight"}
    with pytest.raises(CheckpointError, match="lm_head.weight is missing on pipeline stage 1"):
        build_model(load_hparams(src), last_stage, comm=Comm(pp=2, pp_stage=1), where="unit")
