"""Qwen3.5 MoE text model: Qwen3-Next's hybrid with the DeltaNet inputs stored apart
(`in_proj_qkv` [q; k; v], `in_proj_z`, `in_proj_b`, `in_proj_a`). Against transformers'
Qwen3_5MoeForCausalLM and safetensors' reader; one gloo world, tp 2 x pp 2 x ep 2 with
redundant experts. The shared runtime pieces' quirks are tested in test_qwen3_next.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from helpers import (  # noqa: E402
    GENERATE,
    assert_all_tiers_pass,
    check_moe_output,
    convert,
    hf_generate,
    hf_logits,
    skewed_load,
)
from test_qwen3_next import (  # noqa: E402
    CONFIG,
    HIDDEN,
    HK,
    HV,
    NEW_TOKENS,
    NK,
    NV,
    PROMPTS,
    calm_decay,
    rank_tensors,
    read_all,
)
from tolerances import assert_close_scaled  # noqa: E402

from reshard.models.hparams import load_hparams  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402

ARCH = "Qwen3_5MoeForCausalLM"
LIN = "model.layers.{}.linear_attn."
# Every layer MoE; a smaller init than test_qwen3_next's keeps the sharded run's rounding
# inside verify's fp32 bound (0.5 gives 2.8e-4 on logits of 14, against 2.4e-4).
QWEN35 = {**{k: v for k, v in CONFIG.items() if k != "mlp_only_layers"}, "initializer_range": 0.35}


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    src = write_checkpoint(tmp_path_factory.mktemp("qwen3.5-moe"), ARCH, **QWEN35)
    calm_decay(src)
    hf = transformers.Qwen3_5MoeForCausalLM.from_pretrained(src).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return src, hf


def test_config_and_shapes_follow_transformers(qwen35):
    src, hf = qwen35
    hp = load_hparams(src)
    assert (
        hp.layer_types == tuple(hf.config.layer_types) == ("linear_attention", "full_attention") * 2
    )
    assert hp.moe_layers == (0, 1, 2, 3) and hp.norm_topk_prob
    written = read_all(src)
    synthesized = synthesize_tensors(hp, "F32")
    assert {n: s for n, (_, s) in synthesized.items()} == {
        n: tuple(t.shape) for n, t in written.items()
    }


@pytest.mark.float_sensitive
def test_runtime_matches_transformers(qwen35):
    src, hf = qwen35
    model = load_source_model(src)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"prompt len {len(prompt)}")
    results = generate_greedy(model, PROMPTS, NEW_TOKENS)
    for result in results:
        assert result.tokens == hf_generate(hf, result.prompt, NEW_TOKENS), result.prompt
    assert len({t for r in results for t in r.tokens}) > 6


def expected_apart(source: dict, layer: int, tp: int, r: int) -> dict[str, torch.Tensor]:
    """Rank r's key heads: in_proj_qkv cut per [q; k; v] part (like conv1d), z with the
    value heads' rows, b and a one row per value head."""
    p = LIN.format(layer)
    keys = range(r * NK // tp, (r + 1) * NK // tp)
    values = [v for v in range(NV) if v // (NV // NK) in keys]
    q, k, v = source[p + "in_proj_qkv.weight"].split([NK * HK, NK * HK, NV * HV])
    rows = lambda t, heads, w: torch.cat([t[h * w : (h + 1) * w] for h in heads])  # noqa: E731
    return {
        p + "in_proj_qkv.weight": torch.cat(
            [rows(q, keys, HK), rows(k, keys, HK), rows(v, values, HV)]
        ),
        p + "in_proj_z.weight": rows(source[p + "in_proj_z.weight"], values, HV),
        p + "in_proj_b.weight": source[p + "in_proj_b.weight"][values],
        p + "in_proj_a.weight": source[p + "in_proj_a.weight"][values],
        p + "out_proj.weight": source[p + "out_proj.weight"]
        .view(HIDDEN, NV, HV)[:, values]
        .reshape(HIDDEN, -1),
    }


@pytest.mark.world
def test_tp2_pp2_ep2_redundant_bitwise_every_tier_and_transformers(qwen35, tmp_path):
    src, hf = qwen35
    load = skewed_load(tmp_path / "load.json", 8, [0, 1, 2, 3])
    out = tmp_path / "out"
    manifest = convert(src, out, tp=2, pp=2, ep=2, redundant=2, load=load)
    maps = check_moe_output(src, out, manifest)
    assert all(sum(p.logcnt) == 10 and max(p.logcnt) > 1 for p in maps.values())
    source, seen = read_all(src), set()
    for entry in manifest["ranks"]:
        ranked = rank_tensors(out, entry)
        for layer in (0, 2):
            if LIN.format(layer) + "in_proj_qkv.weight" in ranked:
                seen.add((layer, entry["tp_rank"]))
                for name, want in expected_apart(source, layer, 2, entry["tp_rank"]).items():
                    assert ranked[name].view(torch.uint8).equal(want.view(torch.uint8)), name
    assert seen == {(layer, r) for layer in (0, 2) for r in range(2)}
    for row in assert_all_tiers_pass(out, **GENERATE):
        want = hf_generate(hf, row["prompt_ids"], NEW_TOKENS)
        assert row["sharded_ids"] == want, row["prompt_ids"]
