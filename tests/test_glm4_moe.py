"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM) against transformers, on tiny checkpoints
transformers writes: q/k/v biases, partial rotary (half of head_dim), one dense layer, then
DeepSeek-V3's grouped sigmoid routing (16 experts in 4 groups, 2 kept) with a nonzero
selection bias and a scale, and a shared expert; with and without use_qk_norm. Each quirk
switched off in reshard's runtime moves the logits and the greedy ids. Sharded: tp 2 x pp 2
and tp 4 x ep 4 with redundant experts, bitwise and token-exact with transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from helpers import (  # noqa: E402
    assert_all_tiers_pass,
    check_moe_output,
    convert,
    hf_generate,
    hf_logits,
    skewed_load,
)
from test_deepseek import add_mtp_layer  # noqa: E402
from tolerances import assert_close_scaled, scaled_bound  # noqa: E402

from reshard.models.hparams import HParams, load_hparams  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402

ARCH = "Glm4MoeForCausalLM"
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 6
GLM = dict(
    head_dim=16,
    attention_bias=True,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.0,
    initializer_range=0.5,
)
FIXTURES = {"glm-4.5": {}, "qk-norm": {"use_qk_norm": True}}


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """name -> (checkpoint folder, transformers' model loaded from it), made on first use."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str) -> tuple[Path, object]:
        if name not in made:
            path = write_checkpoint(tmp_path_factory.mktemp(name), ARCH, **GLM, **FIXTURES[name])
            hf = transformers.Glm4MoeForCausalLM.from_pretrained(path).eval()
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
            made[name] = (path, hf)
        return made[name]

    return get


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_logits_and_greedy_ids_match_transformers(glm, name):
    path, hf = glm(name)
    model = load_source_model(path)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"{name} prompt len {len(prompt)}")
    expected = [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [r.tokens for r in generate_greedy(model, PROMPTS, NEW_TOKENS)] == expected
    assert len({t for ids in expected for t in ids}) > 6
    assert len({tuple(ids) for ids in expected}) == len(PROMPTS)


def _zero_bias(tensors: dict) -> None:
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros_like(tensors[name])


# Each quirk switched off in reshard's runtime alone: (HParams changes, tensor edit).
SWITCHED_OFF = {
    "correction bias ignored": ({}, _zero_bias),
    "partial rotary off": ({"rope_scaling": None}, None),
    "routed scaling off": ({"routed_scaling_factor": 1.0}, None),
    "group limit off": ({"topk_group": 4}, None),
}


@pytest.mark.parametrize("quirk", sorted(SWITCHED_OFF))
def test_each_quirk_decides_the_output(glm, quirk):
    changes, edit = SWITCHED_OFF[quirk]
    path, hf = glm("glm-4.5")
    hp = load_hparams(path)
    tensors = load_file(path / "model.safetensors")
    if edit is not None:
        edit(tensors)
    off = build_model(dataclasses.replace(hp, **changes), tensors)
    expected = [hf_logits(hf, prompt) for prompt in PROMPTS]
    got = forward_logits(off, PROMPTS)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    bound = max(scaled_bound(e, 256) for e in expected)
    assert worst > 1000 * bound, (quirk, worst, bound)
    ids = [r.tokens for r in generate_greedy(off, PROMPTS, NEW_TOKENS)]
    assert ids != [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS], quirk


def test_hparams_follow_transformers_config(glm):
    for name in FIXTURES:
        path, hf = glm(name)
        hp, config = load_hparams(path), hf.config
        assert (hp.family, hp.num_experts, hp.n_group, hp.topk_group) == ("glm4_moe", 16, 4, 2)
        assert hp.moe_layers == (1, 2) and hp.router_scoring == "sigmoid"
        assert hp.routed_scaling_factor == config.routed_scaling_factor == 2.0
        assert hp.rope_scaling["partial_rotary_factor"] == 0.5
        assert config.rope_parameters["partial_rotary_factor"] == 0.5
        assert hp.attention_bias and not hp.o_bias and hp.qk_norm == config.use_qk_norm
        assert hp.shared_expert_intermediate_size == config.moe_intermediate_size
        assert HParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_config_alone_synthesizes_what_transformers_writes(glm, name):
    path, _ = glm(name)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        written = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    synthesized = synthesize_tensors(load_hparams(path), "F32")
    assert {n: shape for n, (_, shape) in synthesized.items()} == written


def test_mtp_layer_is_skipped(tmp_path):
    """GLM-4.5 stores one MTP layer at index num_hidden_layers, as DeepSeek-V3 does."""
    src = write_checkpoint(tmp_path / "src", ARCH, **GLM)
    mtp = add_mtp_layer(src)
    manifest = convert(src, tmp_path / "out", tp=2)
    assert sorted(manifest["dropped"]) == mtp
    assert not any(n.startswith("model.layers.3.") for r in manifest["ranks"] for n in r["tensors"])


LAYOUTS = {
    "tp2-pp2": ("qk-norm", {"tp": 2, "pp": 2}),  # experts split in two, shared expert by tp
    "tp4-ep4-redundant": ("glm-4.5", {"tp": 4, "ep": 4, "redundant": 4}),
}


@pytest.mark.world
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_sharded_generation_is_token_exact_with_transformers(glm, tmp_path, case):
    name, recipe = LAYOUTS[case]
    path, hf = glm(name)
    recipe = dict(recipe)
    if recipe.get("redundant"):
        recipe["load"] = skewed_load(tmp_path / "expert_load.json", 16, [1, 2])
    manifest = convert(path, tmp_path / "out", **recipe)
    maps = check_moe_output(path, tmp_path / "out", manifest)  # bitwise, experts, export
    if recipe.get("redundant"):
        assert all(sum(p.logcnt) == 20 and max(p.logcnt) > 1 for p in maps.values())
    rows = assert_all_tiers_pass(tmp_path / "out", prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r["sharded_ids"] for r in rows] == [hf_generate(hf, p, NEW_TOKENS) for p in PROMPTS]
