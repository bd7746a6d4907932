"""The sharded runtime on gloo worlds of 2 and 4 CPU processes against the world-size-1
reference, on shards written by reshard's own planner and writer (`convert_model`) and checked
through `verify_output`'s three tiers: identical greedy ids and logits within the fp32
tolerance, on distinct prompts of different lengths. The layouts here are the runtime's hard
cases (kv replication, padded vocab, biases, DP replicas of a pipeline, sliding window, fused
3-D experts with replicas); tests/test_parallel_e2e.py covers stages and expert maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from checkpoints import config_for, write_checkpoint  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import assert_all_tiers_pass, assert_bitwise_rebuild  # noqa: E402
from tolerances import MODEL_ULPS, assert_close_scaled, scaled_bound  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import CheckpointError, OutputError  # noqa: E402
from reshard.io.manifest import write_manifest  # noqa: E402
from reshard.io.manifest_value import Manifest  # noqa: E402
from reshard.io.seal import SEAL_KEY  # noqa: E402
from reshard.layout.experts.place import Placement  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.models.hparams import load_hparams  # noqa: E402
from reshard.runtime.dist import Comm  # noqa: E402
from reshard.runtime.generate import PromptResult, generate_greedy  # noqa: E402
from reshard.runtime.launch import generate_reference, generate_sharded  # noqa: E402
from reshard.runtime.load import load_rank  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402
from reshard.runtime.moe import build_expert_map  # noqa: E402
from reshard.verify.compare import Tolerance, compare_results  # noqa: E402
from reshard.verify.levels import LEVELS, verify_output  # noqa: E402

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 6
PROMPT_FLAGS = [f for p in PROMPTS for f in ("--prompt-ids", ",".join(map(str, p)))]
# E=4 experts on ep=2 ranks with 3 slots each: experts 0 and 1 have two replicas.
REDUNDANT = {
    "ep": 2,
    "slots_per_rank": 3,
    "phy2log": [0, 1, 2, 3, 0, 1],
    "log2phy": [[0, 4], [1, 5], [2, -1], [3, -1]],
    "logcnt": [2, 2, 1, 1],
}


def write_fused_checkpoint(path: Path, arch: str, *, seed: int = 0, **overrides) -> Path:
    """transformers 5's in-memory state dict saved as is: every MoE layer stores
    `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I] (save_pretrained
    writes per-expert tensors instead). Same seed and config = same weights as
    write_checkpoint."""
    import transformers

    torch.manual_seed(seed)
    config = config_for(arch, **overrides)
    state = getattr(transformers, arch)(config).state_dict()
    if not any(name.endswith("experts.gate_up_proj") for name in state):
        pytest.skip("this transformers keeps experts per expert in memory (fused needs 5.x)")
    path.mkdir(parents=True)
    tensors = {name: t.contiguous() for name, t in state.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    return path


# --- worlds ----------------------------------------------------------------------------------


@pytest.mark.float_sensitive
@pytest.mark.world
def test_tp4_llama_from_convert(tmp_path):
    """kv_heads 2 < tp 4 (replicated kv), vocab 101 padded to 104, tied embeddings, o/mlp biases."""
    src = write_checkpoint(
        tmp_path / "src", "LlamaForCausalLM", tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, initializer_range=0.5,
    )  # fmt: skip
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4))
    rows = assert_all_tiers_pass(out, prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r["prompt_ids"] for r in rows] == PROMPTS


@pytest.mark.world
def test_dp2_pp2_mistral_tied_sliding_window(tmp_path):
    """Two replicas (replica_of) of a 2-stage pipeline; each replica generates half the
    prompts; the window (4) is shorter than the prompts; the tied head sits on stage 1."""
    src = write_checkpoint(
        tmp_path / "src", "MistralForCausalLM", sliding_window=4, tie_word_embeddings=True,
        initializer_range=0.5,
    )  # fmt: skip
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(pp=2, dp=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["replica_of"] for r in manifest["ranks"]] == [None, None, 0, 1]
    assert sorted(manifest["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    assert_all_tiers_pass(out, prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.mark.world
def test_tp4_ep2_qwen3_moe_fused_experts(tmp_path):
    """Fused 3-D experts in the source, ep=2 x etp=2 with two redundant replicas: each rank
    holds [3 slots, 2*I/2, H] in slot order, rebuilt bitwise, and generates."""
    src = write_fused_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM", initializer_range=0.5)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4, ep=2, redundant=2))
    assert_bitwise_rebuild(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    phy2log = manifest["layout"]["experts"]["layers"]["1"]["phy2log"]
    for entry in manifest["ranks"]:
        gate_up = entry["tensors"]["model.layers.1.mlp.experts.gate_up_proj"]
        down = entry["tensors"]["model.layers.1.mlp.experts.down_proj"]
        assert gate_up["shape"] == [3, 2 * 32 // 2, 64] and down["shape"] == [3, 64, 32 // 2]
        mine = phy2log[entry["ep_rank"] * 3 : entry["ep_rank"] * 3 + 3]
        assert [p["start"][0] for p in down["pieces"]] == mine  # slot order, logical ids
    assert_all_tiers_pass(out, prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.mark.world
def test_bf16_qwen2_tp4_verifies_in_float32_with_identical_tokens(tmp_path):
    """The common real case: bf16 weights. With float32 compute (the default) the sharded
    tokens equal the reference's on every prompt, nothing is exempted, and the logits agree to
    fp32 rounding of their own scale. The JSON names dtypes as plain strings."""
    src = write_checkpoint(
        tmp_path / "src", "Qwen2ForCausalLM", dtype=torch.bfloat16, hidden_size=96,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=1001, initializer_range=0.5,
        num_hidden_layers=2,
    )  # fmt: skip
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4))
    report = tmp_path / "verify.json"
    result = CliRunner().invoke(
        main, ["verify", str(out), "--level", "generate", "--device", "cpu", "--json",
               str(report), "--max-new-tokens", "8", "--prompt-ids", "5,17,300,999", *PROMPT_FLAGS],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bfloat16 weights computed in float32" in result.output
    generation = json.loads(report.read_text())["generation"]
    assert (generation["dtype"], generation["compute_dtype"]) == ("bfloat16", "float32")
    assert generation["exempted"] == 0
    rows = generation["prompts"]
    for row in rows:
        assert row["reference_ids"] == row["sharded_ids"] and not row["near_tie"], row
        bound = scaled_bound(torch.tensor(row["max_abs_logit"]), MODEL_ULPS, torch.float32)
        assert row["max_abs_logit_diff"] <= bound, row
    assert len({t for r in rows for t in r["reference_ids"]}) > 8  # tokens vary


@pytest.mark.world
def test_generate_catches_an_expert_map_the_files_disagree_with(tmp_path):
    """Swap two slots of one rank in the manifest's map, files untouched, manifest re-sealed:
    hashes and weights still pass (each piece is still its source block); only generation can
    see that the fused slots now compute the wrong experts, and it must fail."""
    src = write_fused_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM", initializer_range=0.5)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, ep=2, redundant=2))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["layout"]["experts"]["layers"]["0"]
    phy2log = entry["phy2log"]
    phy2log[0], phy2log[1] = phy2log[1], phy2log[0]
    entry["log2phy"] = [list(row) for row in Placement.from_phy2log(phy2log, 2, 4).log2phy]
    del manifest[SEAL_KEY]
    write_manifest(out, manifest)  # sealed again, as convert would
    options = {"prompt_ids": PROMPTS, "max_new_tokens": NEW_TOKENS, "device": "cpu"}
    _, results = verify_output(out, levels=LEVELS, generate_options=options)
    assert [r.passed for r in results] == [True, True, False]
    assert any("differs" in f for f in results[-1].failures), results[-1].failures


@pytest.mark.world
def test_rank_errors_reach_the_caller_as_reshard_errors(tmp_path):
    """A spawned rank that fails to load raises the same error class in the caller."""
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    (tmp_path / "out" / "rank-00001.safetensors").unlink()
    with pytest.raises(OutputError, match="rank 1"):
        generate_sharded(tmp_path / "out", PROMPTS, 2, device="cpu")


# --- in-process pieces (no world) ----------------------------------------------------------


@pytest.mark.float_sensitive
def test_expert_replicas_are_computed_exactly_once(tmp_path):
    """Summing every ep rank's routed partial output gives the unsharded MoE output. In
    float64, so that only the order of the additions differs (outputs are of size ~10-100)."""
    src = write_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM", initializer_range=0.5)
    hp = load_hparams(src)
    full = {k: v.double() for k, v in load_file(src / "model.safetensors").items()}
    block = build_model(hp, full).model.layers["0"].mlp
    x = torch.randn(40, hp.hidden_size, generator=torch.Generator().manual_seed(0)).double()
    weights, experts = block.route(x)
    expected = block.routed_partial(x, weights, experts)
    total = torch.zeros_like(expected)
    for ep_rank in range(2):
        block.emap = build_expert_map(hp.num_experts, REDUNDANT, ep_rank)
        total += block.routed_partial(x, weights, experts)
    assert expected.abs().max() > 1  # the scale the bound follows
    assert_close_scaled(total, expected, ulps=16, what="sum of ep partials")
    emap = build_expert_map(hp.num_experts, REDUNDANT, 1)
    assert emap.local_experts == (3, 0, 1)
    assert emap.local_slot[0].tolist() == [-1, 1]  # replica 1 of expert 0 is slot 4 = local 1


@pytest.mark.float_sensitive
def test_fused_source_runs_like_per_expert_source(tmp_path):
    """The runtime reads gate_up_proj as [gate rows; up rows], as transformers means it: the
    same weights saved fused and per expert generate the same ids and logits."""
    fused = write_fused_checkpoint(tmp_path / "fused", "Qwen2MoeForCausalLM", initializer_range=0.5)
    split = write_checkpoint(tmp_path / "split", "Qwen2MoeForCausalLM", initializer_range=0.5)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in load_file(split / "model.safetensors")
    a = generate_reference(fused, PROMPTS, NEW_TOKENS, device="cpu")
    b = generate_reference(split, PROMPTS, NEW_TOKENS, device="cpu")
    assert [r.tokens for r in a] == [r.tokens for r in b]
    for x, y in zip(a, b):
        assert_close_scaled(y.logits, x.logits, what=f"prompt {x.index} logits")


def test_missing_rank_file_is_an_output_error(tmp_path):
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    (tmp_path / "out" / "rank-00001.safetensors").unlink()
    manifest = Manifest.from_doc(json.loads((tmp_path / "out" / "manifest.json").read_text()))
    with pytest.raises(OutputError, match=r"rank-00001.safetensors: missing \(rank 1\)"):
        load_rank(tmp_path / "out", manifest, 1, comm=Comm(tp=2, tp_rank=1))


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


def test_compare_exempts_narrow_near_ties_only_when_asked():
    tol = Tolerance(atol=0.1, rtol=0.0, kl=1.0)
    ref = _result([0, 1], [[3.0, 0.0, 0.0], [0.0, 2.0, 1.95]])
    tie = _result([0, 2], [[3.0, 0.0, 0.0], [0.0, 1.95, 2.0]])  # step 1: 2.0 vs 1.95
    (c_tie,) = compare_results([ref], [tie], tol, near_ties=True)
    assert (c_tie.first_mismatch, c_tie.near_tie, c_tie.passed) == (1, True, True)
    assert c_tie.margin == pytest.approx(0.05, abs=1e-6)  # 2.0 - 1.95 in the reference
    # float32 compute: the same divergence fails, however close the tie.
    (c_strict,) = compare_results([ref], [tie], tol)
    assert (c_strict.first_mismatch, c_strict.near_tie, c_strict.passed) == (1, False, False)
    # Margin 0.05 but the sharded row moved only 0.02: rounding there cannot swap the two.
    small = _result([0, 2], [[3.0, 0.0, 0.0], [0.0, 2.0, 1.97]])
    small.tokens[1] = 2
    (c_small,) = compare_results([ref], [small], tol, near_ties=True)
    assert (c_small.near_tie, c_small.passed) == (False, False)


def test_compare_flags_real_divergence_and_logits_off():
    tol = Tolerance(atol=0.1, rtol=0.0, kl=1.0)
    ref = _result([0, 1], [[3.0, 0.0, 0.0], [0.0, 2.0, 1.95]])
    wrong = _result([0, 2], [[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # the reference says 1.95 vs 2
    off = _result([0, 1], [[3.0, 0.5, 0.0], [0.0, 2.0, 1.95]])  # same ids, logits off
    ref_far = _result([0, 1], [[3.0, 0.0, 0.0], [0.0, 2.0, 0.5]])
    (c_wrong,) = compare_results([ref_far], [wrong], tol, near_ties=True)
    assert (c_wrong.first_mismatch, c_wrong.near_tie, c_wrong.passed) == (1, False, False)
    assert c_wrong.margin == 1.5
    (c_off,) = compare_results([ref], [off], tol)
    assert c_off.first_mismatch is None and not c_off.passed and c_off.max_abs == 0.5
    assert c_off.max_abs_reference == 3.0


def test_last_stage_without_lm_head_is_refused(tmp_path):
    """Tied embeddings under pp > 1: the head must be written on the last stage."""
    src = write_checkpoint(tmp_path / "src", "Qwen3ForCausalLM", tie_word_embeddings=True)
    full = load_file(src / "model.safetensors")
    last_stage = {k: v for k, v in full.items() if k != "model.embed_tokens.weight"}
    with pytest.raises(CheckpointError, match="lm_head.weight is missing on pipeline stage 1"):
        build_model(load_hparams(src), last_stage, comm=Comm(pp=2, pp_stage=1), where="unit")
