"""Phi-3 (fused qkv_proj / gate_up_proj in the checkpoint) against things reshard did not
write: transformers' own forward and generate, safetensors' reader on the source and on the
rank files, and the source bytes after `reshard export`. Two gloo worlds only: tp 2 x pp 2
(kv heads split) and tp 4 (kv heads 2 < tp 4: replicated).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import hf_generate, hf_logits  # noqa: E402
from tolerances import assert_close_scaled  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import CheckpointError, UnsupportedModelError  # noqa: E402
from reshard.export import export_output  # noqa: E402
from reshard.layout.plan import build_plan  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.layout.stages.pipeline import solve_stages  # noqa: E402
from reshard.models.consistency import check_tensors_against_config  # noqa: E402
from reshard.models.hparams import load_hparams, parse_hparams  # noqa: E402
from reshard.models.rules import match_tensors  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.launch import generate_sharded  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.rope import compute_inv_freq  # noqa: E402
from reshard.verify.levels import verify_output  # noqa: E402

ARCH = "Phi3ForCausalLM"
HEADS, KV, HD, INTER, HIDDEN = 4, 2, 16, 96, 64
# Partial rotary (half of each head rotates: 4 frequencies), longrope with its own factor per
# frequency and an attention scale of sqrt(1 + ln 8 / ln 32), a window shorter than most prompts.
LONGROPE = dict(
    rope_type="longrope", short_factor=[1.0, 1.5, 2.5, 4.0], long_factor=[1.0, 3.0, 6.0, 12.0]
)
CONFIG = dict(
    num_hidden_layers=4, initializer_range=0.5, partial_rotary_factor=0.5, sliding_window=5,
    max_position_embeddings=256, original_max_position_embeddings=32, rope_scaling=LONGROPE,
)  # fmt: skip
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 8
QKV = "model.layers.{}.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.{}.mlp.gate_up_proj.weight"


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(source folder, transformers model) of a tiny random Phi-3 written by transformers."""
    src = write_checkpoint(tmp_path_factory.mktemp("phi3"), ARCH, **CONFIG)
    hf = transformers.Phi3ForCausalLM.from_pretrained(src).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens
    hf.generation_config.pad_token_id = 0
    return src, hf


@pytest.fixture(scope="module")
def outputs(phi3, tmp_path_factory):
    """The two layouts, converted once: {"tp4": OUT, "tp2pp2": OUT}."""
    src, _ = phi3
    made = {}
    for name, recipe in {"tp4": dict(tp=4), "tp2pp2": dict(tp=2, pp=2)}.items():
        out = tmp_path_factory.mktemp(name)
        convert_model(str(src), out, build_recipe(**recipe))
        made[name] = out
    return made


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def expected_qkv(source: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """[q_r; k_r; v_r] as vLLM's QKVParallelLinear loads it: rank r's q heads, and the kv
    heads those q heads attend with (one kv head, replicated, when kv heads < tp)."""
    q, k, v = source.split([HEADS * HD, KV * HD, KV * HD])
    q_per = HEADS // tp
    first_q = tp_rank * q_per
    kv_heads = range(first_q // (HEADS // KV), (first_q + q_per - 1) // (HEADS // KV) + 1)
    kv_rows = [h * HD + i for h in kv_heads for i in range(HD)]
    return torch.cat([q[first_q * HD : (first_q + q_per) * HD], k[kv_rows], v[kv_rows]])


# --- the world-size-1 runtime and the config ------------------------------------------------


@pytest.mark.float_sensitive
def test_runtime_matches_transformers_at_every_position(phi3):
    src, hf = phi3
    for prompt, got in zip(PROMPTS, forward_logits(load_source_model(src), PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"phi3 prompt len {len(prompt)}")


def test_longrope_inv_freq_and_scale_match_transformers(phi3):
    src, hf = phi3
    expected, scale = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu")
    ours, our_scale = compute_inv_freq(load_hparams(src))
    assert ours.shape == (int(HD * 0.5) // 2,)  # 8 rotating channels of 16: 4 frequencies
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(scale) == pytest.approx(1.6**0.5)  # ln 8 / ln 32 = 0.6


@pytest.mark.float_sensitive
def test_default_rope_with_partial_rotary_matches_transformers(tmp_path):
    src = write_checkpoint(
        tmp_path, ARCH, num_hidden_layers=2, initializer_range=0.5, partial_rotary_factor=0.25
    )
    hf = transformers.Phi3ForCausalLM.from_pretrained(src).eval()
    expected, _ = hf.model.rotary_emb.compute_default_rope_parameters(hf.config)
    assert compute_inv_freq(load_hparams(src))[0].shape == expected.shape == (2,)
    for prompt, got in zip(PROMPTS, forward_logits(load_source_model(src), PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"prompt len {len(prompt)}")


def test_longrope_past_the_original_context_is_refused(phi3, outputs):
    """Past original_max_position_embeddings transformers re-runs every position with
    long_factor; the runtime refuses, and verify does so before starting a world."""
    src, _ = phi3
    prompt = list(range(1, 31))  # 30 tokens + 3 new: positions up to 31 fit, 8 new do not
    assert len(generate_greedy(load_source_model(src), [prompt], 3)[0].tokens) == 3
    result = CliRunner().invoke(
        main, ["verify", str(outputs["tp4"]), "--level", "generate", "--device", "cpu",
               "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert (
        "Phi3ForCausalLM: rope type 'longrope' runs only up to "
        "original_max_position_embeddings=32 positions here (its short_factor; past it "
        "transformers switches every position to long_factor); prompt 0 of 30 tokens + 8 new "
        "tokens needs 37. Use shorter prompts or fewer --max-new-tokens." in result.output
    )


def phi3_config(**overrides) -> dict:
    config = transformers.Phi3Config(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=101, pad_token_id=0,
        eos_token_id=2,
    ).to_dict()  # fmt: skip
    return {**config, "architectures": [ARCH], **overrides}


@pytest.mark.parametrize("rope_type", ["su", "yarn"])
def test_su_and_yarn_read_as_longrope(rope_type):
    """As transformers' Phi3Config does; the original context comes from the top level."""
    scaling = {"type": rope_type, "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [2] * 8}
    config = phi3_config(rope_parameters=None, rope_scaling=scaling)
    config["original_max_position_embeddings"] = 64
    hp = parse_hparams(config)
    assert hp.rope_scaling["rope_type"] == "longrope"
    assert hp.rope_scaling["original_max_position_embeddings"] == 64


def test_longrope_factors_of_the_wrong_length_name_the_key():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7}
    config = phi3_config(rope_parameters=None, rope_scaling=scaling)
    with pytest.raises(CheckpointError) as e:
        parse_hparams(config, where="cfg.json")
    assert str(e.value).startswith(
        "cfg.json: 'rope_scaling.long_factor' must list 8 numbers (one per rotary frequency: "
        "head_dim x partial_rotary_factor / 2); it is [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]."
    )


def test_longrope_without_its_factors_is_refused_naming_them():
    config = {**phi3_config(), "architectures": ["LlamaForCausalLM"]}
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 2.0}
    with pytest.raises(UnsupportedModelError) as e:
        compute_inv_freq(parse_hparams(config))
    assert str(e.value) == (
        "LlamaForCausalLM: rope type 'longrope' needs rope_scaling.short_factor (8 numbers, one "
        "per rotary frequency) and original_max_position_embeddings; config.json has None and "
        "None. Fix config.json."
    )


def test_a_rope_type_the_runtime_lacks_is_refused_naming_the_key():
    hp = parse_hparams(phi3_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError) as e:
        compute_inv_freq(hp)
    assert str(e.value) == (
        "Phi3ForCausalLM: rope type 'dynamic' is not supported by the runtime (supported: "
        "default, linear, llama3, longrope, yarn); config.json sets it in rope_scaling.rope_type "
        "(rope_parameters in transformers 5). convert, plan and export work; verify runs "
        "--level hashes --level weights."
    )


def test_quantized_phi3_is_refused_before_planning(tmp_path):
    config = phi3_config(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]})
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["plan", str(tmp_path), "--tp", "2"])
    assert result.exit_code == 2, result.output
    assert (
        f"{tmp_path / 'config.json'}: quantization_config (fp8_block) on Phi3ForCausalLM: "
        "reshard does not split quantized fused tensors (qkv_proj, gate_up_proj). Convert the "
        "unquantized checkpoint." in result.output
    )


def test_fused_rows_that_disagree_with_the_config_name_both(tmp_path):
    hp = parse_hparams(phi3_config())
    tensors = synthesize_tensors(hp, "F32")
    tensors[QKV.format(1)] = ("F32", (HEADS * HD + KV * HD, HIDDEN))  # v rows missing
    roles = match_tensors(hp, tensors)
    with pytest.raises(CheckpointError) as e:
        check_tensors_against_config(
            hp, tensors, roles, cast="keep", files=dict.fromkeys(tensors, "x.safetensors"),
            config="config.json",
        )  # fmt: skip
    assert str(e.value).startswith(
        f"x.safetensors: tensor '{QKV.format(1)}' has 96 in dim 0 (shape [96, 64]), but "
        "config.json says num_attention_heads=4 x head_dim=16 + 2 x num_key_value_heads=2 x "
        "head_dim=16, which implies 128."
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_plan_from_config_alone_matches_the_converted_shapes(phi3, outputs, tp):
    """`reshard plan` reads no weights: its per-rank shapes (models/shapes.py) are the ones
    convert wrote from the real tensors."""
    src, _ = phi3
    manifest = json.loads((outputs["tp4" if tp == 4 else "tp2pp2"] / "manifest.json").read_text())
    hp = load_hparams(src)
    tensors = synthesize_tensors(hp, "F32")
    recipe = build_recipe(**({"tp": 4} if tp == 4 else {"tp": 2, "pp": 2}))
    plan = build_plan(hp, tensors, match_tensors(hp, tensors), recipe,
                      solve_stages(hp, recipe))  # fmt: skip
    planned = {f.rank: {t.name: list(t.shape) for t in f.tensors} for f in plan.files}
    for entry in manifest["ranks"]:
        written = {name: info["shape"] for name, info in entry["tensors"].items()}
        assert planned[entry["rank"]] == written, entry["rank"]


# --- convert, verify tiers, export ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tp4", "tp2pp2"])
def test_each_rank_holds_its_q_k_v_and_gate_up_slices(phi3, outputs, layout):
    """Bitwise, read back by safetensors on both sides: qkv_proj = [q_r; k_r; v_r] (tp 4: each
    of the 2 kv heads on 2 ranks), gate_up_proj = [gate_r; up_r], never plain rows."""
    src, _ = phi3
    source = read_all(src)
    manifest = json.loads((outputs[layout] / "manifest.json").read_text())
    tp = manifest["layout"]["tp"]
    seen = set()
    for entry in manifest["ranks"]:
        r = entry["tp_rank"]
        ranked = read_all_files(outputs[layout], entry)
        for layer in range(CONFIG["num_hidden_layers"]):
            if QKV.format(layer) not in ranked:
                continue
            seen.add((layer, r))
            qkv = ranked[QKV.format(layer)]
            assert qkv.shape == ((HEADS // tp + 2 * max(KV // tp, 1)) * HD, HIDDEN)
            assert torch.equal(qkv, expected_qkv(source[QKV.format(layer)], tp, r))
            gate, up = source[GATE_UP.format(layer)].split(INTER)
            rows = slice(r * INTER // tp, (r + 1) * INTER // tp)
            assert torch.equal(ranked[GATE_UP.format(layer)], torch.cat([gate[rows], up[rows]]))
    assert seen == {(layer, r) for layer in range(4) for r in range(tp)}


def read_all_files(out: Path, entry: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted({info["file"] for info in entry["tensors"].values()}):
        with safe_open(str(out / file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("layout", ["tp4", "tp2pp2"])
def test_hashes_and_weights_tiers_pass(outputs, layout):
    _, results = verify_output(outputs[layout], levels=("hashes", "weights"))
    assert [(r.level, r.passed) for r in results] == [("hashes", True), ("weights", True)]


def test_export_gives_back_the_fused_source_bytes(phi3, outputs, tmp_path):
    """tp 4 holds each kv head twice: export reads one copy and re-stacks [q; k; v]."""
    src, _ = phi3
    export_output(outputs["tp4"], tmp_path / "hf")
    source, exported = read_all(src), read_all(tmp_path / "hf")
    assert set(exported) == set(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape
        assert exported[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name


# --- token-exact against transformers on gloo worlds ----------------------------------------


@pytest.mark.world
@pytest.mark.parametrize("layout", ["tp4", "tp2pp2"])
def test_sharded_generation_is_token_exact_against_transformers(phi3, outputs, layout):
    _, hf = phi3
    results = generate_sharded(outputs[layout], PROMPTS, NEW_TOKENS, device="cpu")
    assert [r.prompt for r in results] == PROMPTS
    for result in results:
        expected = hf_generate(hf, result.prompt, NEW_TOKENS)
        assert result.tokens == expected, (layout, result.prompt)
        full = hf_logits(hf, result.prompt + result.tokens)[len(result.prompt) - 1 : -1]
        assert_close_scaled(result.logits, full, what=f"{layout} prompt {result.prompt}")
    assert len({t for r in results for t in r.tokens}) > 6  # greedy ids vary


@pytest.mark.float_sensitive
def test_world_size_1_generation_is_token_exact(phi3):
    src, hf = phi3
    for result in generate_greedy(load_source_model(src), PROMPTS, NEW_TOKENS):
        assert result.tokens == hf_generate(hf, result.prompt, NEW_TOKENS), result.prompt
