"""gpt-oss against transformers' GptOssForCausalLM, on a tiny checkpoint transformers writes.

The fixture makes every quirk decide tokens: sinks, router and expert biases random (not
transformers' zeros), an init scale large enough that the SwiGLU clamp (limit 7) bites,
sliding layers (window 4) shorter than the prompts, yarn rope. Each quirk switched off in
reshard's runtime alone moves the logits far past the tolerance. Sharded runs rebuild the
source bitwise, pass every verify tier and are token-exact with transformers' generate: tp 2 x
pp 2 (every expert split in two, gate/up pairs kept together) and tp 4 x ep 2 with redundant
experts placed from a load file.
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

from checkpoints import config_for  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    assert_all_tiers_pass,
    assert_bitwise_rebuild,
    convert,
    hf_generate,
    hf_logits,
    load_rank,
    skewed_load,
)
from tolerances import assert_close_scaled, scaled_bound  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.export import export_output  # noqa: E402
from reshard.models.hparams import HParams, load_hparams  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime import stacked_experts  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.layers import make_norm  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402

ARCH = "GptOssForCausalLM"
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 6
EXPERTS, WIDTH = 8, 32  # num_local_experts, intermediate_size (the expert width)
FIXTURE = dict(
    intermediate_size=WIDTH,
    num_hidden_layers=4,
    head_dim=16,
    num_local_experts=EXPERTS,
    num_experts_per_tok=2,
    sliding_window=4,  # shorter than three of the prompts
    initializer_range=0.3,  # the clamp bites, fp32 rounding stays far inside verify's bound
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 8.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 32,
        "rope_theta": 150000.0,
    },
)
EXPERT = "model.layers.{}.mlp.experts."


def write_gpt_oss(path: Path):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config_for(ARCH, **FIXTURE)).eval()
    with torch.no_grad():  # transformers starts sinks and biases at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                param.copy_(torch.randn_like(param))
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("gpt-oss")
    return path, write_gpt_oss(path)


@pytest.mark.float_sensitive
def test_logits_and_greedy_ids_match_transformers(gpt_oss):
    path, hf = gpt_oss
    model = load_source_model(path)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"prompt len {len(prompt)}")
    expected = [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [r.tokens for r in generate_greedy(model, PROMPTS, NEW_TOKENS)] == expected
    assert len({t for ids in expected for t in ids}) > 6  # not one repeated token
    assert len({tuple(ids) for ids in expected}) == len(PROMPTS)


def test_the_fixture_clamps_and_slides(gpt_oss):
    """Some gate/up pre-activations pass the limit, so the clamp changes values; the sinks
    and biases are not zero."""
    path, hf = gpt_oss
    seen = []
    experts = hf.model.layers[0].mlp.experts
    hook = experts.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    hf_logits(hf, PROMPTS[0])
    hook.remove()
    pre = seen[0] @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert float(pre.detach().abs().max()) > 1.2 * hf.config.swiglu_limit
    assert hf.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert float(hf.model.layers[0].self_attn.sinks.detach().abs().min()) > 0


def _split_halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_up.chunk(2, dim=-1)  # [gate; up] halves: the wrong reading of gpt-oss


def _drop_sinks(model) -> None:
    for layer in model.model.layers.values():
        del layer.self_attn.sinks


# Each quirk switched off in reshard's runtime alone: (HParams changes, model edit, patch).
SWITCHED_OFF = {
    "sinks dropped": ({}, _drop_sinks, None),
    "gate/up de-interleaved": ({}, None, _split_halves),
    "SwiGLU clamp off": ({"swiglu_limit": 1e9}, None, None),
    "sliding window off": ({"sliding_window": None}, None, None),
    "yarn off": ({"rope_scaling": None}, None, None),
}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("quirk", sorted(SWITCHED_OFF))
def test_each_quirk_decides_the_output(gpt_oss, quirk, monkeypatch):
    changes, edit, split = SWITCHED_OFF[quirk]
    path, hf = gpt_oss
    hp = load_hparams(path)
    if split is not None:
        monkeypatch.setattr(stacked_experts, "split_gate_up", split)
    off = build_model(dataclasses.replace(hp, **changes), load_file(path / "model.safetensors"))
    if edit is not None:
        edit(off)
    expected = [hf_logits(hf, prompt) for prompt in PROMPTS]
    got = forward_logits(off, PROMPTS)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    bound = max(scaled_bound(e, 256) for e in expected)
    assert worst > 1000 * bound, (quirk, worst, bound)
    ids = [r.tokens for r in generate_greedy(off, PROMPTS, NEW_TOKENS)]
    assert ids != [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS], quirk


def test_bf16_norm_scales_in_fp32_as_transformers(gpt_oss):
    """transformers keeps gpt-oss's norms in fp32 and casts after the scale: on bf16 input
    the runtime's norm is bitwise theirs, and differs from Llama's cast-then-scale."""
    path, hf = gpt_oss
    theirs = type(hf.model.norm)(64, eps=hf.config.rms_norm_eps)  # fp32 weight, as loaded
    weight = (torch.randn(64) * 2).to(torch.bfloat16)  # a bf16 checkpoint's norm
    theirs.weight.data = weight.float()
    ours = make_norm(load_hparams(path), 64)  # hidden_size
    ours.load_state_dict({"weight": weight}, assign=True)
    x = (torch.randn(5, 64) * 3).to(torch.bfloat16)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(ours(x), expected)
        ours.scale_fp32 = False  # Llama's order
        assert not torch.equal(ours(x), expected)


def test_hparams_follow_transformers_config(gpt_oss):
    path, hf = gpt_oss
    hp, config = load_hparams(path), hf.config
    assert (hp.family, hp.num_experts, hp.moe_intermediate_size) == ("gpt_oss", EXPERTS, WIDTH)
    assert hp.moe_layers == tuple(range(config.num_hidden_layers))
    assert hp.layer_types == tuple(config.layer_types)
    assert (hp.swiglu_limit, hp.swiglu_alpha) == (config.swiglu_limit, config.swiglu_alpha)
    assert hp.attention_bias and hp.o_bias and hp.sliding_window == config.sliding_window
    assert hp.rope_theta == config.rope_parameters["rope_theta"]
    assert hp.rope_scaling["rope_type"] == "yarn" and hp.rope_scaling["truncate"] is False
    assert HParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp


def test_config_alone_synthesizes_what_transformers_writes(gpt_oss):
    path, _ = gpt_oss
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        written = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    synthesized = synthesize_tensors(load_hparams(path), "F32")
    assert {n: shape for n, (_, shape) in synthesized.items()} == written


def check_expert_slices(src: Path, out: Path, manifest: dict) -> None:
    """Each rank's experts are the source's, in the manifest's slot order; its gate_up
    columns are whole gate/up pairs [2 lo, 2 hi) and its down rows [lo, hi)."""
    source = load_file(src / "model.safetensors")
    etp = manifest["layout"]["tp"] // manifest["layout"]["ep"]
    lo_hi = [(r * WIDTH // etp, (r + 1) * WIDTH // etp) for r in range(etp)]
    experts = manifest["layout"].get("experts") or {}
    for entry in manifest["ranks"]:
        shard, stage = load_rank(out, entry["rank"]), entry["pp_stage"]
        first, last = manifest["layout"]["stages"][stage]["layers"]
        lo, hi = lo_hi[entry["tp_rank"] % etp]
        ep_rank = entry["tp_rank"] // etp
        for layer in range(first, last + 1):
            mine = _rank_experts(experts, layer, ep_rank, manifest["layout"]["ep"])
            prefix = EXPERT.format(layer)
            ids = torch.tensor(mine)
            gate_up = source[prefix + "gate_up_proj"][ids][:, :, 2 * lo : 2 * hi]
            assert torch.equal(shard[prefix + "gate_up_proj"], gate_up)
            bias = source[prefix + "gate_up_proj_bias"][ids][:, 2 * lo : 2 * hi]
            assert torch.equal(shard[prefix + "gate_up_proj_bias"], bias)
            assert torch.equal(
                shard[prefix + "down_proj"], source[prefix + "down_proj"][ids][:, lo:hi]
            )
            assert torch.equal(
                shard[prefix + "down_proj_bias"], source[prefix + "down_proj_bias"][ids]
            )


def _rank_experts(experts: dict, layer: int, ep_rank: int, ep: int) -> list[int]:
    entry = experts.get("layers", {}).get(str(layer))
    if entry is None:
        per = EXPERTS // ep
        return list(range(ep_rank * per, (ep_rank + 1) * per))
    per = entry["slots_per_rank"]
    return [e for e in entry["phy2log"][ep_rank * per : (ep_rank + 1) * per] if e >= 0]


LAYOUTS = {
    "tp2-pp2": {"tp": 2, "pp": 2},  # every expert split in two: 16 gate/up pairs per rank
    "tp4-ep2-redundant": {"tp": 4, "ep": 2, "redundant": 2},  # expert tp 2, 10 slots
}


@pytest.mark.world
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_sharded_generation_is_token_exact_with_transformers(gpt_oss, tmp_path, case):
    path, hf = gpt_oss
    recipe = dict(LAYOUTS[case])
    if recipe.get("redundant"):
        recipe["load"] = skewed_load(tmp_path / "expert_load.json", EXPERTS, [0, 1, 2, 3])
    manifest = convert(path, tmp_path / "out", **recipe)
    assert_bitwise_rebuild(path, tmp_path / "out")
    check_expert_slices(path, tmp_path / "out", manifest)
    if recipe.get("redundant"):
        counts = [manifest["layout"]["experts"]["layers"][str(i)]["logcnt"] for i in range(4)]
        assert all(sum(c) == EXPERTS + 2 and max(c) > 1 for c in counts)
    rows = assert_all_tiers_pass(tmp_path / "out", prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r["sharded_ids"] for r in rows] == [hf_generate(hf, p, NEW_TOKENS) for p in PROMPTS]
    export_output(tmp_path / "out", tmp_path / "hf")
    exported = tmp_path / "hf"
    original = load_file(path / "model.safetensors")
    back = {k: v for f in exported.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(back) == set(original)
    assert all(
        torch.equal(back[n].view(torch.uint8), t.view(torch.uint8)) for n, t in original.items()
    )


def test_a_split_that_cuts_a_gate_up_pair_is_refused(tmp_path):
    """intermediate_size 30 at expert tp 4 would leave 7.5 gate/up pairs a rank: refused
    before a write, with the tp that fit; tp 2 (15 whole pairs) plans."""
    config = config_for(ARCH, **{**FIXTURE, "intermediate_size": 30}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["plan", str(tmp_path), "--tp", "4"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: tp=4 does not fit GptOssForCausalLM: moe_intermediate_size=30 is not "
        "divisible by the expert tp=4 (tp/ep). Valid tp for this model: 1, 2.\n"
    )
    assert CliRunner().invoke(main, ["plan", str(tmp_path), "--tp", "2"]).exit_code == 0


def test_a_bad_swiglu_limit_exits_2_naming_the_key_and_file(tmp_path):
    config = config_for(ARCH, **{**FIXTURE, "swiglu_limit": -7.0}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["plan", str(tmp_path), "--tp", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        f"error: {tmp_path / 'config.json'}: 'swiglu_limit' is -7.0; expected a positive number."
    )
