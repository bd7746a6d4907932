"""Gemma-2 and Gemma-3 text against transformers, on tiny checkpoints transformers writes.

The fixtures are chosen so each Gemma quirk decides tokens: norm weights are random (so
(1 + w) is not 1), the soft-caps are small enough that tanh is far from linear on the
fixture's scores and logits, the window (4) is shorter than the prompts, query_pre_attn_scalar
is not head_dim, and Gemma-3's sliding layers use another rope base than its global ones. A
test switches each quirk off in reshard's runtime and shows the logits move, so a runtime that
ignored it could not pass. Sharded runs are token-exact against transformers' own generate.
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
from helpers import assert_all_tiers_pass, assert_bitwise_rebuild, hf_generate, hf_logits  # noqa: E402
from tolerances import assert_close_scaled, scaled_bound  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.layout.stages.costs import analytic_costs, item_kinds  # noqa: E402
from reshard.models.hparams import HParams, load_hparams, parse_hparams  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.profile.layers import profile_layers  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model, tie_lm_head  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402
from reshard.runtime.streamed import reference_streamed  # noqa: E402

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 6
WINDOW = 4  # shorter than three of the prompts

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=16,
    vocab_size=101,  # padded at tp 2 and 4
    initializer_range=0.5,
    max_position_embeddings=256,
    sliding_window=WINDOW,
)

FIXTURES = {
    # Tied head (Gemma's default); layer_types from the default alternation; kv 2 < tp 4.
    "gemma2": (
        "Gemma2ForCausalLM",
        dict(
            num_key_value_heads=2,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=8.0,
        ),
    ),
    # Untied head; one kv head (as Gemma-3 1B); linear rope scaling on the global layer only;
    # no final cap (Gemma-3's default).
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=False,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}


def write_gemma(path: Path, name: str):
    """save_pretrained a random tiny Gemma; norm weights random (transformers zeroes them)."""
    arch, overrides = FIXTURES[name]
    torch.manual_seed(0)
    config = config_for(arch, **{**_COMMON, **overrides})
    config._attn_implementation = "eager"  # the attention transformers' Gemma-2 is made for
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.5)
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """name -> (checkpoint folder, the transformers model that wrote it), made on first use."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str) -> tuple[Path, object]:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            made[name] = (path, write_gemma(path, name))
        return made[name]

    return get


# --- world size 1 against transformers ---------------------------------------------------------


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_logits_and_greedy_ids_match_transformers(gemma, name):
    path, hf = gemma(name)
    model = load_source_model(path)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"{name} prompt len {len(prompt)}")
    results = generate_greedy(model, PROMPTS, NEW_TOKENS)
    expected = [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [r.tokens for r in results] == expected
    assert len({t for ids in expected for t in ids}) > 6  # not one repeated token
    assert len({tuple(ids) for ids in expected}) == len(PROMPTS)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_streamed_reference_matches_the_full_one(gemma, name):
    """One piece at a time (embedding with its scale, each layer with its own rope, the
    capped head) gives the full reference's tokens and logits."""
    path, _ = gemma(name)
    full = generate_greedy(load_source_model(path), PROMPTS, NEW_TOKENS)
    streamed = reference_streamed(path, full, device="cpu")
    for a, b in zip(full, streamed, strict=True):
        assert a.tokens == b.tokens
        assert_close_scaled(b.logits, a.logits, what=f"{name} prompt {a.index}")


def _source_tensors(hp: HParams, path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(path / "model.safetensors")
    tie_lm_head(hp, tensors)
    return tensors


# Each quirk switched off in reshard's runtime alone: (fixture, HParams changes).
SWITCHED_OFF = {
    "attention soft-cap": ("gemma2", {"attn_logit_softcapping": None}),
    "final soft-cap": ("gemma2", {"final_logit_softcapping": None}),
    "query_pre_attn_scalar": ("gemma2", {"query_pre_attn_scalar": None}),
    "sliding window": ("gemma2", {"sliding_window": None}),
    "sliding-layer rope base": ("gemma3", {"sliding_rope_theta": None}),
    "global rope scaling": ("gemma3", {"rope_scaling": None}),
}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("quirk", sorted(SWITCHED_OFF))
def test_each_quirk_decides_the_output(gemma, quirk):
    """Without the quirk the logits move by far more than the tolerance and some greedy id
    changes: the fixture can tell a runtime that ignores it from one that does not."""
    name, changes = SWITCHED_OFF[quirk]
    path, hf = gemma(name)
    hp = load_hparams(path)
    assert all(getattr(hp, k) is not None for k in changes)  # the fixture sets it
    off = build_model(dataclasses.replace(hp, **changes), _source_tensors(hp, path))
    expected = [hf_logits(hf, prompt) for prompt in PROMPTS]
    got = forward_logits(off, PROMPTS)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    bound = max(scaled_bound(e, 256) for e in expected)
    assert worst > 1000 * bound, (quirk, worst, bound)
    ids = [r.tokens for r in generate_greedy(off, PROMPTS, NEW_TOKENS)]
    expected_ids = [hf_generate(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    if quirk == "final soft-cap":  # monotonic: argmax cannot tell, the logits check does
        assert ids == expected_ids
    else:
        assert ids != expected_ids, quirk


@pytest.mark.float_sensitive
def test_final_soft_cap_bites_on_the_fixture(gemma):
    """The raw final logits reach well past the cap, so tanh is far from linear there."""
    path, hf = gemma("gemma2")
    cap = load_hparams(path).final_logit_softcapping
    with torch.no_grad():
        hidden = hf.model(torch.tensor([PROMPTS[0]])).last_hidden_state
        raw = hidden @ hf.lm_head.weight.T
    assert float(raw.abs().max()) > 1.5 * cap
    assert float(hf_logits(hf, PROMPTS[0]).abs().max()) < cap


# --- config.json -------------------------------------------------------------------------------


def test_hparams_follow_transformers_config_classes(gemma):
    """Every value the runtime reads, against transformers' own parsed config."""
    for name in FIXTURES:
        path, hf = gemma(name)
        hp, config = load_hparams(path), hf.config
        assert hp.family == name and hp.layer_types == tuple(config.layer_types)
        assert (hp.sliding_window, hp.head_dim) == (config.sliding_window, config.head_dim)
        assert hp.query_pre_attn_scalar == config.query_pre_attn_scalar
        assert hp.final_logit_softcapping == config.final_logit_softcapping
        assert hp.tie_word_embeddings == config.tie_word_embeddings
        assert hp.hidden_act == config.hidden_activation == "gelu_pytorch_tanh"
    hp2 = load_hparams(gemma("gemma2")[0])
    assert hp2.layer_types == ("sliding_attention", "full_attention") * 2  # the default pattern
    assert (hp2.attn_logit_softcapping, hp2.sliding_rope_theta) == (3.0, None)
    hp3, config3 = load_hparams(gemma("gemma3")[0]), gemma("gemma3")[1].config
    assert hp3.qk_norm and hp3.attn_logit_softcapping is None
    assert hp3.rope_theta == config3.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert hp3.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert hp3.sliding_rope_theta == config3.rope_parameters["sliding_attention"]["rope_theta"]


GEMMA3_4X = {  # the keys a transformers 4.x Gemma-3 text config.json carries
    "architectures": ["Gemma3ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 101,
    "rope_theta": 500000.0,
    "rope_local_base_freq": 20000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 512,
    "sliding_window_pattern": 3,
    "query_pre_attn_scalar": 16,
}


def test_gemma3_4x_keys_read_as_transformers_reads_them():
    ours = parse_hparams(GEMMA3_4X)
    theirs = transformers.Gemma3TextConfig(
        **{k: v for k, v in GEMMA3_4X.items() if k != "architectures"}
    )
    assert ours.layer_types == tuple(theirs.layer_types)
    assert ours.layer_types.count("full_attention") == 2  # layers 2 and 5
    full, sliding = (theirs.rope_parameters[t] for t in ("full_attention", "sliding_attention"))
    assert ours.rope_theta == full["rope_theta"] == 500000.0
    assert ours.sliding_rope_theta == sliding["rope_theta"] == 20000.0
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    # transformers' Gemma3Attention never applies attn_logit_softcapping: neither do we.
    assert (
        parse_hparams({**GEMMA3_4X, "attn_logit_softcapping": 5.0}).attn_logit_softcapping is None
    )


def test_gemma2_defaults_are_the_config_class_defaults():
    """Keys a hand-written config.json may leave out read as Gemma2Config fills them."""
    minimal = {
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 101,
    }
    ours = parse_hparams(minimal)
    theirs = transformers.Gemma2Config(**{k: v for k, v in minimal.items() if k[0] != "a"})
    for key in ("head_dim", "sliding_window", "query_pre_attn_scalar", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.attn_logit_softcapping == theirs.attn_logit_softcapping == 50.0
    assert ours.final_logit_softcapping == theirs.final_logit_softcapping == 30.0
    assert ours.layer_types == tuple(theirs.layer_types)
    off = parse_hparams({**minimal, "final_logit_softcapping": None, "sliding_window": None})
    assert off.final_logit_softcapping is None and off.sliding_window is None
    assert off.layer_types == ("full_attention",) * 3


def test_new_fields_stay_out_of_other_families_manifests(gemma):
    """HParams fields added for Gemma are omitted from to_dict() at their defaults (so the
    pinned manifests of other families keep their bytes) and round-trip when set."""
    llama = parse_hparams({**GEMMA3_4X, "architectures": ["LlamaForCausalLM"]})
    new = {"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"}
    new.add("sliding_rope_theta")
    assert not new & set(llama.to_dict())
    assert HParams.from_dict(llama.to_dict()) == llama
    for name in FIXTURES:
        hp = load_hparams(gemma(name)[0])
        assert HParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp


BAD_CONFIGS = {
    "bidirectional": (
        {"use_bidirectional_attention": True},
        "use_bidirectional_attention is true (an embedding model, not a causal LM)",
    ),
    "sliding rope type": (
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            }
        },
        "rope_parameters.sliding_attention has rope_type 'linear'",
    ),
    "negative cap": (
        {"final_logit_softcapping": -1.0},
        "'final_logit_softcapping' is -1.0; expected a positive number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unsupported_gemma_configs_exit_2_naming_the_key(tmp_path, case):
    changes, message = BAD_CONFIGS[case]
    config = {**GEMMA3_4X, **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["plan", str(tmp_path), "--tp", "2"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert str(tmp_path / "config.json") in result.output


# --- plan from config.json alone -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_plan_shapes_match_the_files_transformers_wrote(gemma, name):
    """`reshard plan`'s synthesized tensors are the checkpoint's, name for name and shape for
    shape; the roofline's weight bytes add up to the file's (untied head: no double count)."""
    path, _ = gemma(name)
    hp = load_hparams(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        actual = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    synthesized = synthesize_tensors(hp, "F32")
    assert {n: tuple(shape) for n, (_, shape) in synthesized.items()} == actual
    items = analytic_costs(hp, dtype_bytes=4)
    file_bytes = sum(4 * torch.Size(s).numel() for s in actual.values())
    head = 0 if "lm_head.weight" in actual else 4 * hp.vocab_size * hp.hidden_size
    assert sum(item.weight_bytes for item in items) == file_bytes + head


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_profile_layers_times_every_gemma_kind(gemma, name):
    """`reshard profile layers` runs on Gemma configs: one timing per item kind (sliding and
    global layers apart), with the roofline's weight bytes."""
    hp = load_hparams(gemma(name)[0])
    profile = profile_layers(hp, seq=8, warmup=0, iters=2)
    assert sorted(profile["kinds"]) == sorted(set(item_kinds(hp)))
    weights = {item.kind: item.weight_bytes for item in analytic_costs(hp, dtype_bytes=4)}
    for kind, timing in profile["kinds"].items():
        assert timing["median_us"] > 0 and timing["weight_bytes"] == weights[kind], kind


# --- sharded, on gloo worlds of 4 ------------------------------------------------------------

LAYOUTS = {
    "gemma2-tp2-pp2": ("gemma2", {"tp": 2, "pp": 2}),  # tied head written on stage 1
    "gemma2-tp4": ("gemma2", {"tp": 4}),  # kv heads 2 < tp 4: replicated
    "gemma3-tp2-pp2": ("gemma3", {"tp": 2, "pp": 2}),
    "gemma3-tp4": ("gemma3", {"tp": 4}),  # one kv head on every rank
}


@pytest.mark.world
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_sharded_generation_is_token_exact_with_transformers(gemma, tmp_path, case):
    """Shards written by convert rebuild the source bitwise, pass every verify tier, and
    their greedy ids are transformers' own."""
    name, layout = LAYOUTS[case]
    path, hf = gemma(name)
    out = tmp_path / "out"
    convert_model(str(path), out, build_recipe(**layout))
    assert_bitwise_rebuild(path, out)
    rows = assert_all_tiers_pass(out, prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r["prompt_ids"] for r in rows] == PROMPTS
    assert [r["sharded_ids"] for r in rows] == [hf_generate(hf, p, NEW_TOKENS) for p in PROMPTS]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hparams"]["family"] == name
    assert HParams.from_dict(manifest["hparams"]) == load_hparams(path)
