"""DeepSeek-V3 end to end on a tiny checkpoint written by transformers (16 experts in 4
groups, 2 groups kept, low-rank q, one dense layer, a nonzero selection bias): the spec's
head splits of MLA, the skipped MTP layer, rank files rebuilt bitwise against safetensors'
reader, and token-exact generation on gloo worlds at tp 2 x ep 2 x pp 2 and at tp 4 x ep 4
with redundant experts placed from a load file. The world-1 runtime is checked against
transformers' forward pass in test_runtime_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from checkpoints import DEEPSEEK_V3, write_checkpoint  # noqa: E402
from helpers import GENERATE, assert_all_tiers_pass, check_moe_output, convert, skewed_load  # noqa: E402

from reshard.cli.report import format_convert_summary  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import CheckpointError  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.models.hparams import load_hparams, parse_hparams  # noqa: E402

ARCH = "DeepseekV3ForCausalLM"
ATTN = "model.layers.1.self_attn."


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("deepseek-v3"), ARCH, initializer_range=0.5)


def rank_tensor(out: Path, manifest: dict, rank: int, name: str):
    for file in manifest["ranks"][rank]["files"]:
        with safe_open(str(out / file), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def test_hparams_and_tp2_head_splits(deepseek, tmp_path):
    """q_b / kv_b rows and o_proj columns split on whole heads (qk 16, k_nope + v 20,
    v 12 wide); a-projections, their norms, the router and its fp32 bias whole."""
    hp = load_hparams(deepseek)
    assert (hp.family, hp.moe_layers, hp.n_group, hp.topk_group) == ("deepseek_v3", (1, 2), 4, 2)
    assert (hp.qk_head_dim, hp.head_dim, hp.shared_expert_intermediate_size) == (16, 8, 32)
    manifest = convert(deepseek, tmp_path / "out", tp=2)
    source = load_file(deepseek / "model.safetensors")
    heads = {"q_b_proj.weight": 2 * 16, "kv_b_proj.weight": 2 * 20}
    for rank in (0, 1):
        for leaf, rows in heads.items():
            got = rank_tensor(tmp_path / "out", manifest, rank, ATTN + leaf)
            assert got.equal(source[ATTN + leaf][rank * rows : (rank + 1) * rows])
        o_proj = rank_tensor(tmp_path / "out", manifest, rank, ATTN + "o_proj.weight")
        assert o_proj.equal(source[ATTN + "o_proj.weight"][:, rank * 24 : (rank + 1) * 24])
        for name in (ATTN + "q_a_proj.weight", ATTN + "kv_a_layernorm.weight",
                     "model.layers.2.mlp.gate.e_score_correction_bias"):  # fmt: skip
            assert rank_tensor(tmp_path / "out", manifest, rank, name).equal(source[name])


def add_mtp_layer(path: Path) -> list[str]:
    """Append an MTP layer (index num_hidden_layers = 3) as DeepSeek-V3's checkpoint has."""
    tensors = load_file(path / "model.safetensors")
    extra = {n.replace(".2.", ".3."): t.clone() for n, t in tensors.items() if ".layers.2." in n}
    extra["model.layers.3.eh_proj.weight"] = tensors["model.embed_tokens.weight"][:64].clone()
    extra["model.layers.3.enorm.weight"] = tensors["model.norm.weight"].clone()
    save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    return sorted(extra)


def test_mtp_layer_is_skipped_with_a_notice(tmp_path):
    src = write_checkpoint(tmp_path / "src", ARCH, initializer_range=0.5)
    mtp = add_mtp_layer(src)
    result = convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["dropped"]) == mtp
    written = {n for r in manifest["ranks"] for n in r["tensors"]}
    assert not any(n.startswith("model.layers.3.") for n in written)
    summary = format_convert_summary(result)
    assert f"skipped the multi-token-prediction layer ({len(mtp)} tensors of layer 3)" in summary
    assert "derived from config.json" not in summary


def test_bad_groups_are_refused():
    config = {"architectures": [ARCH], "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "vocab_size": 101, **DEEPSEEK_V3, "n_group": 3}  # fmt: skip
    with pytest.raises(CheckpointError, match="n_routed_experts=16 must split into n_group=3"):
        parse_hparams(config)


@pytest.mark.world
def test_tp2_ep2_pp2_generates(deepseek, tmp_path):
    """World of 8: MLA heads and shared experts split over tp, experts over ep, two stages
    (the dense layer and one MoE layer on stage 0)."""
    manifest = convert(deepseek, tmp_path / "out", tp=2, ep=2, pp=2)
    check_moe_output(deepseek, tmp_path / "out", manifest)
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)


@pytest.mark.world
def test_tp4_ep4_redundant_experts_from_load_generate(deepseek, tmp_path):
    """World of 4, etp = 1: 4 redundant slots placed from a skewed load file, per layer."""
    load = skewed_load(tmp_path / "expert_load.json", 16, [1, 2])
    manifest = convert(deepseek, tmp_path / "out", tp=4, ep=4, redundant=4, load=load)
    maps = check_moe_output(deepseek, tmp_path / "out", manifest)
    assert all(sum(p.logcnt) == 20 and max(p.logcnt) > 1 for p in maps.values())
    assert maps[1].phy2log != maps[2].phy2log
    assert_all_tiers_pass(tmp_path / "out", **GENERATE)


def test_config_alone_synthesizes_what_transformers_writes(deepseek):
    """plan's tensor list from config.json equals the checkpoint's names and shapes."""
    from reshard.models.shapes import synthesize_tensors

    with safe_open(str(deepseek / "model.safetensors"), "pt") as f:
        written = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    synthesized = synthesize_tensors(load_hparams(deepseek), "F32")
    assert {n: shape for n, (_, shape) in synthesized.items()} == written


def test_plain_q_config_synthesizes_q_proj(tmp_path):
    from reshard.models.shapes import synthesize_tensors

    src = write_checkpoint(tmp_path / "src", ARCH, q_lora_rank=None)
    names = set(synthesize_tensors(load_hparams(src)))
    assert ATTN + "q_proj.weight" in names and ATTN + "q_b_proj.weight" not in names
    assert not any("q_a_" in n for n in names)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == names


def test_plan_kv_cache_is_vllm_latent():
    """DeepSeek-V3 (examples/configs): vLLM caches kv_lora_rank 512 + qk_rope_head_dim 64 per
    token and layer on every TP rank, not 128 heads x 2 x 192."""
    from reshard.layout.memory.model import kv_bytes_per_token, kv_token_elements

    hp = load_hparams(Path(__file__).parent.parent / "examples/configs/deepseek-v3")
    assert (hp.num_layers, hp.num_experts, hp.n_group, hp.topk_group) == (61, 256, 8, 4)
    assert kv_token_elements(hp, 1) == kv_token_elements(hp, 8) == 576
    assert kv_bytes_per_token(hp, range(61), 8, 2) == 61 * 576 * 2


def test_plan_command_reports_latent_kv_at_tp8_pp2_ep8():
    from click.testing import CliRunner

    from reshard.cli import main

    config = Path(__file__).parent.parent / "examples/configs/deepseek-v3"
    args = ["plan", str(config), "--tp", "8", "--pp", "2", "--ep", "8", "--gpu", "H200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{8 * 61 * 576 * 2:,} B a token over all ranks" in result.output
    assert "tp 8 x pp 2 x dp 1 = 16 GPUs (ep 8)" in result.output


@pytest.mark.world
def test_keep_mtp_writes_it_on_the_last_stage_and_verifies(tmp_path):
    """--keep-mtp: the MTP tensors whole (bitwise) on the last stage's tp_rank 0 only,
    recorded in the manifest; every tier still passes (the runtime skips the layer)."""
    from click.testing import CliRunner

    from reshard.cli import main

    src = write_checkpoint(tmp_path / "src", ARCH, initializer_range=0.5)
    mtp = add_mtp_layer(src)
    out = tmp_path / "out"
    args = ["convert", str(src), "-o", str(out), "--tp", "2", "--pp", "2", "--keep-mtp"]
    result = CliRunner().invoke(main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "multi-token-prediction layer 3 written whole on the last stage's tp_rank 0" in (
        result.output
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"]["keep_mtp"] is True and manifest["dropped"] == []
    holders = {r["rank"] for r in manifest["ranks"] for n in r["tensors"] if n in mtp}
    assert holders == {2}  # stage 1, tp_rank 0
    source = load_file(src / "model.safetensors")
    for name in mtp:
        got = rank_tensor(out, manifest, 2, name)
        assert got.view(-1).view(torch.uint8).equal(source[name].view(-1).view(torch.uint8))
    assert_all_tiers_pass(out, **GENERATE)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cost_model_counts_mla_parameters_as_written(tmp_path, q_lora_rank):
    """The analytic stage cost sizes MLA from its own shapes: matrices + norms of a layer's
    self_attn as transformers writes them (+ input_layernorm)."""
    from reshard.layout.stages.costs import _mla_params

    src = write_checkpoint(tmp_path / "src", ARCH, q_lora_rank=q_lora_rank)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sizes = [f.get_slice(n).get_shape() for n in f.keys() if n.startswith(ATTN)]
    matrix, small = _mla_params(load_hparams(src))
    assert matrix == sum(a * b for a, b in (s for s in sizes if len(s) == 2))
    assert small == 64 + sum(s[0] for s in sizes if len(s) == 1)
