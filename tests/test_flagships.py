"""The 2025-26 flagships' public configs (examples/configs: gpt-oss-120b in MXFP4, GLM-4.6 in
BF16, Kimi-K2 in 128 x 128 block FP8) read, plan and size as published, and a tiny Kimi-K2
(DeepSeek-V3's architecture with one expert group, many experts and its yarn rope) converts
and verifies with the existing DeepSeek support, token-exact with transformers.

Published sizes: gpt-oss-120b's checkpoint is 60.8 GiB; Hugging Face's parameter counts
(tensor elements, an fp8 or uint8 byte counting one) are 1026.5B for Kimi-K2-Instruct and
357B for GLM-4.6, whose count includes its multi-token-prediction layer (convert skips it).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from reshard.cli import main
from reshard.layout.memory.model import kv_bytes_per_token, kv_token_elements
from reshard.layout.recipe import build_recipe
from reshard.models.hparams import load_hparams
from reshard.plan import load_shapes, plan_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
GIB = 2**30


def plan_total(name: str, **recipe):
    shapes = load_shapes(str(EXAMPLES / name))
    return shapes, plan_model(shapes, build_recipe(**recipe))


def elements(tensors) -> int:
    return sum(math.prod(shape) for _, shape in tensors)


def test_gpt_oss_120b_plans_its_mxfp4_bytes():
    """One rank holds the whole checkpoint: 60.8 GiB as published, experts as U8 blocks and
    scales, the rest BF16 (the config names no dtype)."""
    shapes, plan = plan_total("gpt-oss-120b", tp=1)
    hp = shapes.hparams
    assert (hp.num_experts, hp.num_experts_per_tok, hp.moe_intermediate_size) == (128, 4, 2880)
    assert hp.quantization.kind == "mxfp4" and hp.torch_dtype == "bfloat16"
    assert hp.layer_types.count("sliding_attention") == 18 and hp.sliding_window == 128
    assert plan.total_bytes == pytest.approx(60.8 * GIB, rel=0.01)
    dtypes = {t.dtype for f in plan.files for t in f.tensors}
    assert dtypes == {"U8", "BF16"}
    blocks = shapes.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks == ("U8", (128, 5760, 90, 16))


def test_gpt_oss_120b_at_ep_8_holds_an_eighth_of_the_experts():
    _, plan = plan_total("gpt-oss-120b", tp=8, ep=8)
    rank0 = [t for f in plan.files if f.rank == 0 for t in f.tensors]
    blocks = next(t for t in rank0 if t.name == "model.layers.0.mlp.experts.down_proj_blocks")
    assert blocks.shape == (16, 2880, 90, 16)  # 16 whole experts, every input block
    sinks = next(t for t in rank0 if t.name == "model.layers.0.self_attn.sinks")
    assert sinks.shape == (8,)  # 64 heads over 8 ranks


def test_kimi_k2_reads_as_deepseek_v3_with_one_group():
    shapes, plan = plan_total("kimi-k2", tp=1)
    hp = shapes.hparams
    assert (hp.family, hp.num_experts, hp.n_group, hp.topk_group) == ("deepseek_v3", 384, 1, 1)
    assert (hp.routed_scaling_factor, hp.num_mtp_layers, hp.moe_layers[0]) == (2.827, 0, 1)
    assert hp.quantization.block == (128, 128)
    assert elements(shapes.tensors.values()) == pytest.approx(1026.5e9, rel=0.01)
    dtypes = {t.dtype for f in plan.files for t in f.tensors}
    assert dtypes == {"F8_E4M3", "F32", "BF16"}


def test_glm_4_6_counts_its_layers_as_published():
    """Hugging Face's 357B counts the MTP layer too (one more MoE decoder layer plus its
    [hidden, 2 x hidden] eh_proj); the 92 layers convert writes plus that layer agree."""
    shapes, _ = plan_total("glm-4.6", tp=1)
    hp = shapes.hparams
    assert (hp.num_experts, hp.n_group, hp.routed_scaling_factor) == (160, 1, 2.5)
    assert hp.moe_layers == tuple(range(3, 92)) and hp.qk_norm and not hp.o_bias
    assert hp.rope_scaling == {"rope_type": "default", "partial_rotary_factor": 0.5}
    main_model = elements(shapes.tensors.values())
    last = [s for n, s in shapes.tensors.items() if n.startswith("model.layers.91.")]
    mtp = elements(last) + 2 * hp.hidden_size * hp.hidden_size  # + eh_proj
    assert main_model + mtp == pytest.approx(357e9, rel=0.005)


def test_kv_cache_per_token_as_vllm_accounts_it():
    """Bytes a token, one rank: k and v of the local kv heads (GQA) or MLA's latent, BF16."""
    gpt, glm, kimi = (load_hparams(EXAMPLES / n) for n in ("gpt-oss-120b", "glm-4.6", "kimi-k2"))
    assert kv_bytes_per_token(gpt, range(36), 1, 2) == 36 * 8 * 64 * 2 * 2 == 73_728
    assert kv_token_elements(glm, 8) == 1 * 128 * 2  # 8 kv heads over 8 ranks
    assert kv_bytes_per_token(glm, range(92), 8, 2) == 92 * 256 * 2
    assert kv_token_elements(kimi, 8) == kv_token_elements(kimi, 1) == 512 + 64


@pytest.mark.parametrize(
    "name, gpu, choice",
    [("gpt-oss-120b", "H100", "tp 2 x pp 1"), ("glm-4.6", "H200", "tp 8 x pp 1"),
     ("kimi-k2", "B200", "tp 8 x pp 1")],
)  # fmt: skip
def test_suggest_picks_the_readme_layouts(name, gpu, choice):
    result = CliRunner().invoke(main, ["plan", str(EXAMPLES / name), "--suggest", "--gpu", gpu])
    assert result.exit_code == 0, result.output
    assert f"choice    {choice} = " in result.output


# A tiny Kimi-K2: one expert group, 24 experts (4 a token), one dense layer, its routed
# scale and yarn rope with mscale, block FP8 as released (4 x 4 blocks here: a head of kv_b
# is 20 rows).
KIMI = dict(
    num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=16, n_routed_experts=24,
    n_group=1, topk_group=1, num_experts_per_tok=4, routed_scaling_factor=2.827,
    first_k_dense_replace=1, max_position_embeddings=256,
    rope_scaling={"type": "yarn", "factor": 8.0, "beta_fast": 1.0, "beta_slow": 1.0,
                  "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
)  # fmt: skip


@pytest.mark.world
def test_tiny_kimi_k2_converts_and_verifies_with_redundant_experts(tmp_path):
    """tp 4 x ep 4 with 4 redundant slots placed from a load file: bitwise, every verify
    tier, and the reference tokens are transformers' on the dequantized twin."""
    pytest.importorskip("transformers")
    from helpers import (
        GENERATE,
        assert_all_tiers_pass,
        check_moe_output,
        convert,
        skewed_load,
        twin_generate,
    )
    from quant_fixtures import write_quantized

    src, twin = write_quantized(
        tmp_path / "kimi", "fp8_block", "DeepseekV3ForCausalLM", block=(4, 4), **KIMI
    )
    hp = load_hparams(src)
    assert (hp.num_experts, hp.n_group, hp.topk_group) == (24, 1, 1)
    load = skewed_load(tmp_path / "expert_load.json", 24, [1, 2])
    manifest = convert(src, tmp_path / "out", tp=4, ep=4, redundant=4, load=load)
    maps = check_moe_output(src, tmp_path / "out", manifest)
    assert all(sum(p.logcnt) == 28 and max(p.logcnt) > 1 for p in maps.values())
    for row in assert_all_tiers_pass(tmp_path / "out", **GENERATE):
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row
