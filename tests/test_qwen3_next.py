"""Qwen3-Next (gated DeltaNet linear layers beside gated full attention, MoE with a gated
shared expert) against things reshard did not write: transformers' own forward and generate,
safetensors' reader on the source and on the rank files. Two gloo worlds: tp 2 x pp 2 (each
stage one linear and one full layer) and tp 4 x ep 4 with redundant experts from a load file.
Each quirk switched off on purpose (conv or recurrent state not carried, q gate or shared
expert gate dropped) moves the logits far past the fp32 bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    GENERATE,
    assert_all_tiers_pass,
    check_moe_output,
    convert,
    hf_generate,
    hf_logits,
    skewed_load,
)
from tolerances import MODEL_ULPS, assert_close_scaled, scaled_bound  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.errors import CheckpointError, UnsupportedModelError  # noqa: E402
from reshard.layout.plan import build_plan  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.layout.stages.pipeline import solve_stages  # noqa: E402
from reshard.models.hparams import load_hparams, parse_hparams  # noqa: E402
from reshard.models.rules import match_tensors  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime import deltanet, gated_attention  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.moe import MoEBlock  # noqa: E402

ARCH = "Qwen3NextForCausalLM"
HEADS, KV, HD, HIDDEN = 4, 2, 16, 64
NK, NV, HK, HV, KERNEL = 4, 8, 8, 12, 4  # linear key/value heads and widths: 2 values per key
# Layers 1 and 3 full attention, 0 and 2 linear; layer 0 dense, 1-3 MoE (8 experts, top 2).
CONFIG = dict(
    num_hidden_layers=4, initializer_range=0.5, full_attention_interval=2, mlp_only_layers=[0],
    head_dim=HD, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=48, linear_num_key_heads=NK, linear_num_value_heads=NV,
    linear_key_head_dim=HK, linear_value_head_dim=HV, linear_conv_kernel_dim=KERNEL,
)  # fmt: skip
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 8
LIN = "model.layers.{}.linear_attn."
LAYOUTS = {"tp2pp2": dict(tp=2, pp=2), "tp4ep4r4": dict(tp=4, ep=4, redundant=4)}


def calm_decay(src: Path) -> None:
    """A_log drawn from log U(0.01, 1) instead of transformers' log U(0.01, 16): with this
    init scale the largest rates decay the state by ~e^-80 a token, leaving outputs at
    rounding noise that the gated norm scales back up (sharded vs unsharded then differs by
    ~1e-3 on logits of 14). Trained decay rates are far smaller. Norm weights random
    (transformers starts them at 0 or 1), so a wrongly placed one changes the numbers."""
    tensors = load_file(src / "model.safetensors")
    rng = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(".A_log")]:
        tensors[name] = torch.empty(NV).uniform_(0.01, 1.0, generator=rng).log()
    for name in [n for n in tensors if n.endswith("norm.weight")]:  # not all 0 / 1
        tensors[name] = 0.5 * torch.randn(tensors[name].shape, generator=rng)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    """(source folder, transformers model) of a tiny random Qwen3-Next."""
    src = write_checkpoint(tmp_path_factory.mktemp("qwen3-next"), ARCH, **CONFIG)
    calm_decay(src)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(src).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens
    hf.generation_config.pad_token_id = 0
    return src, hf


@pytest.fixture(scope="module")
def outputs(qwen3_next, tmp_path_factory):
    src, _ = qwen3_next
    made = {}
    for name, recipe in LAYOUTS.items():
        out = tmp_path_factory.mktemp(name)
        if "redundant" in recipe:
            recipe = {**recipe, "load": skewed_load(out.parent / f"{name}.json", 8, [1, 2, 3])}
        made[name] = (out, convert(src, out, **recipe))
    return made


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def rank_tensors(out: Path, entry: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted({info["file"] for info in entry["tensors"].values()}):
        with safe_open(str(out / file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def expected_linear(source: dict, layer: int, tp: int, r: int) -> dict[str, torch.Tensor]:
    """Rank r's share of a linear layer, computed from the heads: key heads r*NK/tp.. with
    their value heads. in_proj_qkvz / in_proj_ba rows are grouped per key head in the
    checkpoint; conv1d channels are [q; k; v] over all heads (vLLM's three-part loader)."""
    p = LIN.format(layer)
    keys = range(r * NK // tp, (r + 1) * NK // tp)
    values = [v for v in range(NV) if v // (NV // NK) in keys]
    qkvz = source[p + "in_proj_qkvz.weight"].view(NK, -1, HIDDEN)
    ba = source[p + "in_proj_ba.weight"].view(NK, -1, HIDDEN)
    q, k, v = source[p + "conv1d.weight"].split([NK * HK, NK * HK, NV * HV])
    channels = lambda t, heads, w: torch.cat([t[h * w : (h + 1) * w] for h in heads])  # noqa: E731
    out = source[p + "out_proj.weight"].view(HIDDEN, NV, HV)
    return {
        p + "in_proj_qkvz.weight": qkvz[list(keys)].reshape(-1, HIDDEN),
        p + "in_proj_ba.weight": ba[list(keys)].reshape(-1, HIDDEN),
        p + "conv1d.weight": torch.cat(
            [channels(q, keys, HK), channels(k, keys, HK), channels(v, values, HV)]
        ),
        p + "A_log": source[p + "A_log"][values],
        p + "dt_bias": source[p + "dt_bias"][values],
        p + "norm.weight": source[p + "norm.weight"],
        p + "out_proj.weight": out[:, values].reshape(HIDDEN, -1),
    }


def expected_gated_q(source: dict, layer: int, tp: int, r: int) -> torch.Tensor:
    """Rank r's q heads, each with its gate rows right after it ([q_h; gate_h] per head)."""
    q = source[f"model.layers.{layer}.self_attn.q_proj.weight"].view(HEADS, 2 * HD, HIDDEN)
    return q[r * HEADS // tp : (r + 1) * HEADS // tp].reshape(-1, HIDDEN)


# --- config, world size 1 -------------------------------------------------------------------


def test_hparams_follow_the_config_class(qwen3_next):
    src, hf = qwen3_next
    hp = load_hparams(src)
    assert hp.layer_types == tuple(hf.config.layer_types)
    assert hp.layer_types == ("linear_attention", "full_attention") * 2
    assert (hp.moe_layers, hp.norm_topk_prob, hp.qk_norm) == ((1, 2, 3), True, True)
    assert hp.rope_scaling == {"rope_type": "default", "partial_rotary_factor": 0.25}
    assert (hp.linear_num_key_heads, hp.linear_values_per_key, hp.linear_value_size) == (4, 2, 96)


def test_interval_without_layer_types_gives_the_config_class_pattern():
    """A hub config.json (transformers 4.57) has full_attention_interval, no layer_types,
    partial_rotary_factor at the top level; absent keys take Qwen3NextConfig's defaults."""
    config = {"architectures": [ARCH], "hidden_size": 64, "num_hidden_layers": 8,
              "num_attention_heads": 4, "vocab_size": 101, "full_attention_interval": 4,
              "partial_rotary_factor": 0.25, "num_experts": 8,
              "num_experts_per_tok": 2}  # fmt: skip
    hp = parse_hparams(config)
    theirs = transformers.Qwen3NextConfig(
        **{k: v for k, v in config.items() if k != "architectures"}
    )
    assert hp.layer_types == tuple(theirs.layer_types)
    assert hp.layer_types.count("full_attention") == 2  # layers 3 and 7
    assert (hp.head_dim, hp.linear_num_value_heads, hp.linear_key_head_dim) == (256, 32, 128)
    assert hp.shared_expert_intermediate_size == theirs.shared_expert_intermediate_size == 512


@pytest.mark.float_sensitive
def test_runtime_matches_transformers_at_every_position(qwen3_next):
    src, hf = qwen3_next
    for prompt, got in zip(PROMPTS, forward_logits(load_source_model(src), PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"prompt len {len(prompt)}")


@pytest.fixture(scope="module")
def hf_reference(qwen3_next) -> dict[tuple, tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and the logits that chose them, per prompt (computed once)."""
    _, hf = qwen3_next
    made = {}
    for prompt in PROMPTS:
        tokens = hf_generate(hf, prompt, NEW_TOKENS)
        made[tuple(prompt)] = tokens, hf_logits(hf, prompt + tokens)[len(prompt) - 1 : -1]
    return made


@pytest.mark.float_sensitive
def test_world_size_1_generation_is_token_exact(qwen3_next, hf_reference):
    """Left-padded batch prefill (chunked rule), then one-token decode (recurrent rule)."""
    src, _ = qwen3_next
    results = generate_greedy(load_source_model(src), PROMPTS, NEW_TOKENS)
    for result in results:
        tokens, logits = hf_reference[tuple(result.prompt)]
        assert result.tokens == tokens, result.prompt
        assert_close_scaled(result.logits, logits, what=f"prompt {result.prompt}")
    assert len({t for r in results for t in r.tokens}) > 6  # greedy ids vary


@pytest.mark.float_sensitive
def test_streamed_reference_matches_the_full_one(qwen3_next):
    """One piece at a time over prompt + tokens in one pass (each linear layer's state
    built from zero by the chunked rule) gives the decode loop's tokens and logits."""
    from reshard.runtime.streamed import reference_streamed

    src, _ = qwen3_next
    full = generate_greedy(load_source_model(src), PROMPTS, NEW_TOKENS)
    streamed = reference_streamed(src, full, device="cpu")
    for a, b in zip(full, streamed, strict=True):
        assert a.tokens == b.tokens
        assert_close_scaled(b.logits, a.logits, what=f"prompt {a.index}")


# --- each quirk switched off fails ----------------------------------------------------------


def _worst_decode_error(src, hf_reference) -> float:
    """Largest logit error over the decode steps against transformers', in fp32 bounds."""
    worst = 0.0
    for result in generate_greedy(load_source_model(src), PROMPTS, NEW_TOKENS):
        _, expected = hf_reference[tuple(result.prompt)]
        diff = float((result.logits - expected).abs().max())
        worst = max(worst, diff / scaled_bound(expected, MODEL_ULPS, torch.float32))
    return worst


def _forget_conv_state(x, state, weight):
    return deltanet_conv_step(x, None, weight)


deltanet_conv_step = deltanet.conv_step


def _forget_recurrent(q, k, v, decay, beta, state):
    return deltanet.chunk_delta_rule(q, k, v, decay, beta, None)


@pytest.mark.parametrize(
    "quirk, target, replacement",
    [
        ("conv state reset between steps", "conv_step", _forget_conv_state),
        ("recurrent state reset between steps", "recurrent_delta_rule", _forget_recurrent),
        ("q's output gate dropped", "apply_output_gate", lambda out, gate: out),
    ],
)
def test_each_linear_quirk_switched_off_fails(
    qwen3_next, hf_reference, monkeypatch, quirk, target, replacement
):
    src, _ = qwen3_next
    assert _worst_decode_error(src, hf_reference) <= 1.0  # as the fixture is
    module = gated_attention if target == "apply_output_gate" else deltanet
    monkeypatch.setattr(module, target, replacement)
    assert _worst_decode_error(src, hf_reference) > 100, quirk


def test_shared_expert_gate_dropped_fails(qwen3_next, hf_reference, monkeypatch):
    """sigmoid(gate) = 1: the shared expert added whole."""
    original = MoEBlock.forward

    class Open(torch.nn.Module):
        def forward(self, x):
            return torch.full((*x.shape[:-1], 1), 1e4, dtype=x.dtype)

    def ungated(self, x, token_valid=None):
        if hasattr(self, "shared_expert_gate"):
            self.shared_expert_gate = Open()
        return original(self, x, token_valid)

    monkeypatch.setattr(MoEBlock, "forward", ungated)
    assert _worst_decode_error(qwen3_next[0], hf_reference) > 100


# --- the split, bitwise ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_rank_holds_whole_key_heads_bitwise(qwen3_next, outputs, layout):
    """Read back by safetensors on both sides: every linear tensor of every rank equals the
    source slice of its key heads (and their value heads); q_proj keeps [q_h; gate_h]."""
    src, _ = qwen3_next
    source = read_all(src)
    out, manifest = outputs[layout]
    tp = manifest["layout"]["tp"]
    seen = set()
    for entry in manifest["ranks"]:
        r, ranked = entry["tp_rank"], rank_tensors(out, entry)
        for layer in (0, 2):
            if LIN.format(layer) + "A_log" in ranked:
                seen.add((layer, r))
                for name, want in expected_linear(source, layer, tp, r).items():
                    assert ranked[name].view(torch.uint8).equal(want.view(torch.uint8)), name
        for layer in (1, 3):
            name = f"model.layers.{layer}.self_attn.q_proj.weight"
            if name in ranked:
                assert ranked[name].equal(expected_gated_q(source, layer, tp, r)), name
    assert seen == {(layer, r) for layer in (0, 2) for r in range(tp)}


def test_plain_rows_would_cut_conv_channels_wrong(qwen3_next):
    """The conv1d of rank 0 at tp 2 is not its first half of rows (that is all of q and half
    of k): the split re-cuts [q; k; v] per part."""
    src, _ = qwen3_next
    source = read_all(src)
    conv = source[LIN.format(0) + "conv1d.weight"]
    ours = expected_linear(source, 0, 2, 0)[LIN.format(0) + "conv1d.weight"]
    assert ours.shape == conv[: conv.shape[0] // 2].shape
    assert not ours.equal(conv[: conv.shape[0] // 2])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bitwise_rebuild_exports_and_maps(qwen3_next, outputs, layout):
    src, _ = qwen3_next
    out, manifest = outputs[layout]
    maps = check_moe_output(src, out, manifest)
    if "redundant" in LAYOUTS[layout]:
        assert all(sum(p.logcnt) == 12 and max(p.logcnt) > 1 for p in maps.values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_from_config_alone_matches_the_converted_shapes(qwen3_next, outputs, layout):
    src, _ = qwen3_next
    out, manifest = outputs[layout]
    hp = load_hparams(src)
    tensors = synthesize_tensors(hp, "F32")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert {n: s for n, (_, s) in tensors.items()} == {
            n: tuple(f.get_slice(n).get_shape()) for n in f.keys()
        }
    if "redundant" in LAYOUTS[layout]:
        return  # placement from a load file: covered by check_moe_output
    recipe = build_recipe(**LAYOUTS[layout])
    plan = build_plan(hp, tensors, match_tensors(hp, tensors), recipe, solve_stages(hp, recipe))
    planned = {f.rank: {t.name: list(t.shape) for t in f.tensors} for f in plan.files}
    for entry in manifest["ranks"]:
        written = {name: info["shape"] for name, info in entry["tensors"].items()}
        assert planned[entry["rank"]] == written, entry["rank"]


# --- gloo worlds: every tier, and token-exact against transformers ---------------------------


@pytest.mark.world
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_verify_tier_passes_and_matches_transformers(qwen3_next, outputs, layout):
    """One gloo world each: the sharded greedy ids equal our unsharded runtime's (logits
    within verify's fp32 bound) and transformers' own generate. tp 2 x pp 2 puts one linear
    and one full layer on each stage."""
    _, hf = qwen3_next
    out, manifest = outputs[layout]
    if manifest["layout"]["pp"] == 2:
        assert [s["layers"] for s in manifest["layout"]["stages"]] == [[0, 1], [2, 3]]
    rows = assert_all_tiers_pass(out, **GENERATE)
    for row in rows:
        want = hf_generate(hf, row["prompt_ids"], NEW_TOKENS)
        assert row["sharded_ids"] == want, row["prompt_ids"]


def test_mtp_module_is_skipped_with_a_notice(qwen3_next, tmp_path):
    """The released checkpoints' `mtp.*` tensors (transformers ignores them): not written,
    listed as dropped, named in convert's summary."""
    from reshard.cli.report import format_convert_summary
    from reshard.convert import convert_model

    src, _ = qwen3_next
    copy = tmp_path / "src"
    copy.mkdir()
    tensors = load_file(src / "model.safetensors")
    mtp = {"mtp.fc.weight": torch.ones(HIDDEN, 2 * HIDDEN), "mtp.norm.weight": torch.ones(HIDDEN)}
    save_file({**tensors, **mtp}, copy / "model.safetensors", metadata={"format": "pt"})
    (copy / "config.json").write_text((src / "config.json").read_text())
    result = convert_model(str(copy), tmp_path / "out", build_recipe(tp=2))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["dropped"]) == sorted(mtp)
    assert "skipped the multi-token-prediction layer (2 tensors of layer 4)" in (
        format_convert_summary(result)
    )


# --- refusals --------------------------------------------------------------------------------


def test_key_heads_not_divisible_by_tp_are_refused(qwen3_next):
    src, _ = qwen3_next
    result = CliRunner().invoke(main, ["plan", str(src), "--tp", "8"])
    assert result.exit_code == 2, result.output
    assert (
        "linear_num_key_heads=4 is not divisible by tp=8 (linear-attention layers split on "
        "whole key heads with their value heads)" in result.output
    )


def test_a_linear_tensor_on_a_full_attention_layer_names_both(qwen3_next):
    src, _ = qwen3_next
    hp = load_hparams(src)
    names = [*synthesize_tensors(hp), "model.layers.1.linear_attn.A_log"]
    with pytest.raises(UnsupportedModelError) as e:
        match_tensors(hp, names, where="ckpt")
    assert str(e.value) == (
        "ckpt: tensor 'model.layers.1.linear_attn.A_log' belongs to a linear-attention layer "
        "but config.json makes layer 1 a full_attention layer (layer_types / "
        "full_attention_interval). The config and the weights disagree."
    )


def test_value_heads_not_a_multiple_of_key_heads_are_refused():
    config = {"architectures": [ARCH], "hidden_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "vocab_size": 101, "num_experts": 8,
              "linear_num_key_heads": 4, "linear_num_value_heads": 6}  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        parse_hparams(config, where="cfg.json")
    assert str(e.value).startswith(
        "cfg.json: linear_num_value_heads=6 is not a multiple of linear_num_key_heads=4; each "
        "key head serves a whole group of value heads."
    )


def test_linear_layer_types_on_another_family_are_refused():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 101,
              "layer_types": ["linear_attention", "full_attention"]}  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="linear_attention layers, which Llama"):
        parse_hparams(config)


# --- plan on the released config (examples/configs) -----------------------------------------

EXAMPLE = Path(__file__).parent.parent / "examples/configs/qwen3-next-80b-a3b"


def test_example_weights_count_every_released_tensor():
    """Qwen3-Next-80B-A3B in bf16, counted by hand from its config (MTP module excluded):
    12 gated-attention and 36 DeltaNet layers, 512 experts + a gated shared expert each."""
    hp = load_hparams(EXAMPLE)
    h, v = 2048, 151936
    attention = 2 * 16 * 256 * h + 2 * 2 * 256 * h + h * 16 * 256 + 2 * 256
    linear = (2 * 2048 + 2 * 4096) * h + 64 * h + 8192 * 4 + 2 * 32 + 128 + h * 4096
    moe = 512 * h + 512 * 3 * 512 * h + 3 * 512 * h + h
    params = 2 * v * h + h + 12 * attention + 36 * linear + 48 * (moe + 2 * h)
    written = sum(2 * math.prod(shape) for _, shape in synthesize_tensors(hp).values())
    assert written == 2 * params == 159_348_782_592  # 79.7B (+ 1.65B MTP = 81.3B)


def test_example_kv_per_token_and_state_per_sequence_as_vllm():
    """vLLM 0.32: 12 attention layers cache K and V of their kv heads (2 < tp 8: one each);
    36 DeltaNet layers hold conv (2 x 2048 + 4096)/tp x 3 and recurrent 32/tp x 128 x 128
    elements per sequence (gated_delta_net_state_shape), bf16."""
    from reshard.layout.memory.model import kv_bytes_per_token, state_bytes_per_sequence

    hp = load_hparams(EXAMPLE)
    layers = range(hp.num_layers)
    assert kv_bytes_per_token(hp, layers, 1, 2) == 12 * 2 * 256 * 2 * 2
    assert kv_bytes_per_token(hp, layers, 8, 2) == 12 * 1 * 256 * 2 * 2
    for tp in (1, 2, 4, 8):
        state = (8192 // tp) * 3 + (32 // tp) * 128 * 128
        assert state_bytes_per_sequence(hp, layers, tp, 2) == 36 * state * 2
    result = CliRunner().invoke(main, ["plan", str(EXAMPLE), "--gpu", "B200"])  # tp 1: quick
    assert result.exit_code == 0, result.output
    assert "159.35 GB written in all" in result.output
    assert f"{12 * 2 * 256 * 2 * 2:,} B a token over all ranks" in result.output
    state = 36 * 2 * (8192 * 3 + 32 * 128 * 128)  # 39.5 MB, the same summed over any tp
    assert f"a fixed state of {state:,} B per sequence over all ranks" in result.output


def _config() -> dict:
    config = transformers.Qwen3NextConfig(
        hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
        num_key_value_heads=KV, vocab_size=101, **{k: v for k, v in CONFIG.items()
                                                   if k.startswith(("linear_", "head_dim"))},
        full_attention_interval=2, num_experts=8, num_experts_per_tok=2,
    ).to_dict()  # fmt: skip
    return {**config, "architectures": [ARCH]}


def test_linear_tensor_that_disagrees_with_the_config_names_the_keys():
    from reshard.models.consistency import check_tensors_against_config

    hp = parse_hparams(_config())
    tensors = synthesize_tensors(hp, "F32")
    name = LIN.format(0) + "in_proj_qkvz.weight"
    tensors[name] = ("F32", (200, HIDDEN))
    with pytest.raises(CheckpointError) as e:
        check_tensors_against_config(
            hp, tensors, match_tensors(hp, tensors), cast="keep",
            files=dict.fromkeys(tensors, "x.safetensors"), config="config.json",
        )  # fmt: skip
    assert str(e.value).startswith(
        f"x.safetensors: tensor '{name}' has 200 in dim 0 (shape [200, 64]), but config.json "
        "says 2 x linear_num_key_heads=4 x linear_key_head_dim=8 + 2 x "
        "linear_num_value_heads=8 x linear_value_head_dim=12, which implies 256."
    )


def test_runtime_refuses_linear_shards_that_do_not_fit_together():
    """A rank file whose out_proj was cut for other heads than its A_log: named, with the
    numbers, before anything runs."""
    from reshard.runtime.model import build_model

    hp = parse_hparams(_config())
    tensors = {n: torch.zeros(s) for n, (_, s) in synthesize_tensors(hp, "F32").items()}
    tensors[LIN.format(0) + "out_proj.weight"] = torch.zeros(HIDDEN, 48)
    with pytest.raises(CheckpointError) as e:
        build_model(hp, tensors)
    assert str(e.value) == (
        f"tensor {LIN.format(0)}out_proj.weight: columns 48, but A_log's 8 value heads (4 key "
        "heads of 2 each) need 96. Re-convert the checkpoint."
    )
