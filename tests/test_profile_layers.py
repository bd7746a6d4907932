"""`reshard profile layers` times the runtime's own modules: DeepSeek-V3 (MLA + grouped
routing) from a config transformers writes, the modules that run are the runtime's classes,
one layer per item kind is built however deep the model, quantized configs are timed
dequantized, and the CLI writes a costs.json that plan reads back. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from reshard.cli import main
from reshard.layout.stages.costs import item_costs_from_profile, item_kinds, read_costs
from reshard.models import BY_ARCHITECTURE
from reshard.models.hparams import parse_hparams
from reshard.profile import layers as profile_module
from reshard.profile.layers import profile_layers
from reshard.runtime.layers import MLP, LMHead, VocabEmbedding
from reshard.runtime.mla import MLAttention
from reshard.runtime.model import DecoderLayer, stage_layers
from reshard.runtime.moe import MoEBlock

pytest.importorskip("transformers")

from checkpoints import config_for  # noqa: E402
from quant_fixtures import SCHEMES  # noqa: E402
from test_costs import TINY_CONFIG  # noqa: E402

DEEPSEEK_KINDS = ["embed", "layer:full_attention+dense", "layer:full_attention+moe", "head"]
TINY_LLAMA = {**TINY_CONFIG, "torch_dtype": "bfloat16"}


def deepseek_config(**overrides) -> dict:
    return config_for("DeepseekV3ForCausalLM", **overrides).to_dict()


def record_builds(monkeypatch) -> list[tuple[int, list[int], dict[str, torch.Tensor]]]:
    """(pipeline stage, layers, tensors) of every piece profile_layers builds."""
    builds = []
    real = profile_module.build_model

    def spy(hp, tensors, **kwargs):
        builds.append((kwargs["comm"].pp_stage, stage_layers(tensors), dict(tensors)))
        return real(hp, tensors, **kwargs)

    monkeypatch.setattr(profile_module, "build_model", spy)
    return builds


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_deepseek_v3_profiles_every_item_kind(mode):
    """The old second decoder knew no MLA and failed on this config (a q/k/v split of 96
    into [32, 16, 16]); the runtime's MLAttention and grouped router now run."""
    hp = parse_hparams(deepseek_config())
    assert (hp.is_mla, hp.router_scoring, hp.moe_layers) == (True, "sigmoid", (1, 2))
    profile = profile_layers(hp, seq=8, mode=mode, warmup=1, iters=3)
    assert list(profile["kinds"]) == DEEPSEEK_KINDS
    assert [k["layers"] for k in profile["kinds"].values()] == [[], [0], [1, 2], []]
    assert all(k["median_us"] > 0 and k["iqr_us"] >= 0 for k in profile["kinds"].values())
    assert (profile["mode"], profile["dtype"], profile["iters"]) == (mode, "float32", 3)
    items = item_costs_from_profile(hp, profile)
    assert [item.kind for item in items] == item_kinds(hp)
    assert all(item.cost > 0 for item in items)


@pytest.mark.parametrize("arch", sorted(BY_ARCHITECTURE))
def test_every_family_profiles_from_its_transformers_config(arch):
    """Each architecture reshard knows, from the config transformers writes: one positive
    timing per item kind, which plan accepts."""
    hp = parse_hparams(config_for(arch).to_dict())
    profile = profile_layers(hp, seq=4, mode="decode", warmup=0, iters=1)
    assert list(profile["kinds"]) == list(dict.fromkeys(item_kinds(hp)))
    assert all(k["median_us"] > 0 for k in profile["kinds"].values())
    assert len(item_costs_from_profile(hp, profile)) == hp.num_layers + 2


def test_the_timed_modules_are_the_runtimes(monkeypatch):
    """Count the calls into the runtime's own forward methods while profiling DeepSeek-V3:
    each kind runs warmup + iters times, through MLAttention, MoEBlock's grouped router and
    the runtime's embedding and head."""
    calls: Counter = Counter()

    def counting(cls, method, key):
        real = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            calls[key(self)] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    def layer_key(layer):
        ffn = getattr(layer, layer.ffn_name)
        return (type(layer.self_attn).__name__, layer.self_attn.layer, type(ffn).__name__)

    counting(DecoderLayer, "forward", layer_key)
    counting(MoEBlock, "route_grouped", lambda _: "route_grouped")
    counting(VocabEmbedding, "forward", lambda _: "VocabEmbedding")
    counting(LMHead, "forward", lambda _: "LMHead")
    profile_layers(parse_hparams(deepseek_config()), seq=8, warmup=2, iters=3)
    runs = 2 + 3
    assert calls == {
        (MLAttention.__name__, 0, MLP.__name__): runs,
        (MLAttention.__name__, 1, MoEBlock.__name__): runs,
        "route_grouped": runs,
        "VocabEmbedding": runs,
        "LMHead": runs,
    }


def test_one_layer_per_kind_is_built_whatever_the_depth(monkeypatch):
    """A 3-layer and a 48-layer model of one shape build the same pieces, each with at most
    one layer's tensors: memory does not grow with the model."""
    config = {
        **TINY_LLAMA,
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [0],
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 3,  # layers 0 and 2 slide
    }
    built = {}
    for depth in (3, 48):
        builds = record_builds(monkeypatch)
        profile = profile_layers(
            parse_hparams({**config, "num_hidden_layers": depth}), seq=8, warmup=0, iters=1
        )
        assert list(profile["kinds"]) == [
            "embed",
            "layer:sliding_attention+dense",
            "layer:full_attention+moe",
            "layer:sliding_attention+moe",
            "head",
        ]
        built[depth] = [
            (stage, layers, {n.split(".", 3)[-1]: tuple(t.shape) for n, t in tensors.items()})
            for stage, layers, tensors in builds
        ]
    assert [(stage, layers) for stage, layers, _ in built[48]] == [
        (0, []),
        (1, [0]),
        (1, [1]),
        (1, [2]),
        (2, []),
    ]
    assert built[3] == built[48]
    moe = built[48][3][2]
    assert sum(".experts." in n for n in moe) == 4 * 3  # every expert of the layer, once
    assert moe["mlp.experts.3.down_proj.weight"] == (64, 32)


@pytest.mark.parametrize("scheme", ["fp8_block", "awq"])
def test_quantized_configs_are_timed_dequantized(monkeypatch, scheme):
    """The pieces hold dense float tensors of the logical shapes, in the profile's dtype:
    no packed ints or scales, as the runtime computes after dequantizing."""
    config = {**TINY_LLAMA, "quantization_config": SCHEMES[scheme]}
    hp = parse_hparams(config)
    assert hp.quantization is not None
    builds = record_builds(monkeypatch)
    profile = profile_layers(hp, seq=8, warmup=0, iters=2, dtype="bfloat16")
    assert profile["dtype"] == "bfloat16" and profile["model"]["architecture"] == "LlamaForCausalLM"
    layer = builds[1][2]
    assert {t.dtype for _, _, tensors in builds for t in tensors.values()} == {torch.bfloat16}
    assert tuple(layer["model.layers.0.mlp.down_proj.weight"].shape) == (64, 128)
    assert tuple(layer["model.layers.0.self_attn.k_proj.weight"].shape) == (32, 64)
    assert not [n for n in layer if not n.endswith(".weight")]


def test_cli_profiles_deepseek_v3_and_plan_reads_it(tmp_path):
    model = tmp_path / "deepseek"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(deepseek_config()))
    out = tmp_path / "costs.json"
    args = ["profile", "layers", str(model), "--seq", "8", "--warmup", "1", "--iters", "2"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "cpu float32 prefill batch 1 seq 8:"
    assert [line.split()[0] for line in lines[1:5]] == DEEPSEEK_KINDS
    assert [line.split()[-1] for line in lines[1:5]] == ["x1", "x1", "x2", "x1"]
    assert lines[-1] == f"wrote {out}"
    assert list(read_costs(out)["kinds"]) == DEEPSEEK_KINDS
    plan = CliRunner().invoke(main, ["plan", str(model), "--pp", "2", "--costs", str(out)])
    assert plan.exit_code == 0, plan.output


def test_profile_module_imports_alone():
    """No import cycle: the module imports first thing in a fresh interpreter."""
    run = subprocess.run(
        [sys.executable, "-c", "import reshard.profile.layers"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
