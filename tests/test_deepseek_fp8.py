"""DeepSeek-V3 as it ships: block FP8 on every MLA projection (q_a, q_b, kv_a_proj_with_mqa,
kv_b, o), the dense MLP, routed and shared experts; router gate, norms, embed and lm_head
unquantized. The tiny fixture of test_deepseek.py (q_lora_rank 20 so that q_a's scale has a
ragged last block, as the real kv_a_proj_with_mqa's 576 rows do in 128-row blocks),
quantized in 8x8 blocks by tests/quant_fixtures.py: converted at tp 2 x ep 2 x pp 2 (MLA
head splits, expert splits, two stages), rebuilt bitwise with safetensors' reader, and
generated token-exact against transformers running the dequantized fp32 twin. Plus the
plan-time refusal of head splits that would cut a block.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from helpers import (  # noqa: E402
    GENERATE,
    assert_all_tiers_pass,
    check_moe_output,
    convert,
    load_rank,
    load_source,
    twin_generate,
)
from quant_fixtures import write_quantized  # noqa: E402

from reshard.cli import main  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
ATTN = "model.layers.1.self_attn."
FP8 = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    return write_quantized(
        tmp_path_factory.mktemp("deepseek-v3-fp8"), "fp8_block", "DeepseekV3ForCausalLM",
        block=(8, 8), num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=20,
    )  # fmt: skip


def test_quantized_as_the_real_checkpoint(deepseek_fp8):
    """FP8 + scale for every linear named in the module docstring, nothing else."""
    src, _ = deepseek_fp8
    source = load_source(src)
    fp8 = {n for n, t in source.items() if t.dtype == torch.float8_e4m3fn}
    assert {ATTN + f"{leaf}.weight" for leaf in FP8} <= fp8
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.experts.15.up_proj.weight",
            "model.layers.2.mlp.shared_experts.gate_proj.weight"} <= fp8  # fmt: skip
    assert all(n.rpartition(".")[0] + ".weight_scale_inv" in source for n in fp8)
    assert len(fp8) == 3 * 5 + 3 + 2 * (16 + 1) * 3  # attention, dense MLP, routed + shared
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    for name in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                 ATTN + "q_a_layernorm.weight", bias):  # fmt: skip
        assert source[name].dtype == torch.float32, name
    assert source[bias].abs().min() > 0  # a selection bias that changes the routing
    assert source[ATTN + "q_a_proj.weight_scale_inv"].shape == (3, 8)  # 20 rows: ragged block


@pytest.mark.world
def test_tp2_ep2_pp2_bitwise_and_token_exact(deepseek_fp8, tmp_path):
    """World of 8. Pinned slices on rank 1 (stage 0, tp_rank 1): kv_b rows 40:80 are scale
    rows 5:10, q_b rows 32:64 scale rows 4:8, o_proj columns 24:48 scale columns 3:6; the
    a-projections and their ragged scales whole."""
    src, twin = deepseek_fp8
    out = tmp_path / "out"
    manifest = convert(src, out, tp=2, ep=2, pp=2)
    check_moe_output(src, out, manifest)  # bitwise rebuild with safetensors' reader, maps
    assert manifest["quantization"]["description"] == "FP8 E4M3, block-scaled [8, 8]"
    source, rank1 = load_source(src), load_rank(out, 1)
    pinned = {
        "kv_b_proj.weight_scale_inv": (slice(5, 10), slice(None)),
        "q_b_proj.weight_scale_inv": (slice(4, 8), slice(None)),
        "o_proj.weight_scale_inv": (slice(None), slice(3, 6)),
        "kv_b_proj.weight": (slice(40, 80), slice(None)),
        "o_proj.weight": (slice(None), slice(24, 48)),
        "q_a_proj.weight_scale_inv": (slice(None), slice(None)),
        "kv_a_proj_with_mqa.weight": (slice(None), slice(None)),
    }
    for leaf, index in pinned.items():
        want = source[ATTN + leaf][index]
        got = rank1[ATTN + leaf]
        assert got.shape == want.shape and got.view(torch.uint8).equal(want.view(torch.uint8))
    rows = assert_all_tiers_pass(out, **GENERATE)
    for row in rows:  # the runtime's reference is transformers on the dequantized twin
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row


def test_tp4_head_split_cutting_blocks_is_refused_before_writing(deepseek_fp8, tmp_path):
    """One head per rank: kv_b 20 rows and o_proj 12 columns, not multiples of 8."""
    src, _ = deepseek_fp8
    result = CliRunner().invoke(main, ["convert", str(src), "--tp", "4", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.self_attn.kv_b_proj.weight' would hold 20 of its 80 rows per "
        "rank (split 4 ways), not a multiple of the fp8_block block size 8; tensor "
        "'model.layers.0.self_attn.o_proj.weight' would hold 12 of its 48 columns per rank"
    ) in result.output
    assert "q_b_proj" not in result.output  # 16 rows a head: whole blocks
    assert "Valid tp for this model: 1, 2." in result.output
    assert not (tmp_path / "o").exists()


def test_real_deepseek_v3_config_refuses_a_q_b_head_split_cutting_128_blocks():
    """examples/configs/deepseek-v3 (quant_method fp8, 128 x 128 blocks): at tp 128 each rank
    holds one head, 192 q_b rows (128 nope + 64 rope); kv_b (256 rows a head) and o_proj (128
    columns a head) keep whole blocks. vLLM serves it at tp 8 / 16."""
    config = EXAMPLES / "deepseek-v3"
    assert json.loads((config / "config.json").read_text())["quantization_config"][
        "weight_block_size"
    ] == [128, 128]
    result = CliRunner().invoke(main, ["plan", str(config), "--tp", "128"])
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.self_attn.q_b_proj.weight' would hold 192 of its 24576 rows "
        "per rank (split 128 ways), not a multiple of the fp8_block block size 128;"
    ) in result.output
    assert "kv_b_proj" not in result.output and "o_proj" not in result.output
    assert "k_proj" not in result.output  # MLA has no k/v projections
    assert "'model.layers.3.mlp.shared_experts.gate_proj.weight' (and up_proj alike)" in (
        result.output
    )
    assert result.output.rstrip().endswith("Valid tp for this model: 1, 2, 4, 8, 16.")
    fits = CliRunner().invoke(main, ["plan", str(config), "--tp", "16", "--ep", "16", "--json"])
    assert fits.exit_code == 0, fits.output
