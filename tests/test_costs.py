"""Item costs: the analytic roofline against known model sizes, item kinds, the costs.json
round trip and its refusals, and CPU profiling of tiny configs."""

import json

import pytest
import torch

from reshard.errors import InputError
from reshard.layout.gpus import GPUS
from reshard.layout.stages.costs import (
    analytic_costs,
    item_costs_from_profile,
    item_kinds,
    model_shape,
    read_costs,
    write_costs,
)
from reshard.layout.stages.report import report_stages
from reshard.layout.stages.solve import balance_layers
from reshard.models.hparams import parse_hparams
from reshard.profile.layers import profile_layers

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}

QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


def tiny(**overrides):
    return parse_hparams({**TINY_CONFIG, **overrides})


def total_bytes(items):
    return sum(item.weight_bytes for item in items)


def test_llama3_8b_weighs_16_gb_in_bf16():
    items = analytic_costs(parse_hparams(LLAMA3_8B))
    assert total_bytes(items) == pytest.approx(16e9, rel=0.05)
    assert items[0].weight_bytes == 128256 * 4096 * 2
    assert items[-1].weight_bytes == (128256 * 4096 + 4096) * 2  # lm_head + final norm
    assert len(items) == 34 and len({item.cost for item in items[1:-1]}) == 1


def test_llama3_8b_decode_pp4_exact_beats_even():
    items = analytic_costs(parse_hparams(LLAMA3_8B), batch=1, seq=1, mode="decode")
    costs, weights = [i.cost for i in items], [i.weight_bytes for i in items]
    # Decode at batch 1 reads weights: lm_head (1.05 GB) costs ~2.4 layers (0.44 GB).
    assert (costs[1], costs[-1]) == (130217, 313636)
    report = report_stages(costs, weights, balance_layers(costs, 4))
    assert report.knob == "VLLM_PP_LAYER_PARTITION=8,9,9,6"
    assert (report.bottleneck, report.even_bottleneck) == (1171953, 1355372)
    assert 1 - report.bottleneck / report.even_bottleneck == pytest.approx(0.135, abs=0.001)


def test_tied_head_still_counts_its_copy():
    untied, tied = tiny(), tiny(tie_word_embeddings=True)
    assert total_bytes(analytic_costs(tied)) == total_bytes(analytic_costs(untied))


def test_moe_weighs_all_experts_but_reads_top_k():
    hp = parse_hparams(QWEN3_30B_A3B)
    items = analytic_costs(hp)
    assert total_bytes(items) == pytest.approx(61.0e9, rel=0.02)  # 30.5B parameters
    assert item_kinds(hp)[1] == "layer:full_attention+moe"
    decode = items[1].cost
    prefill = analytic_costs(hp, batch=4, seq=512, mode="prefill")[1].cost
    # batch-1 decode reads ~8 of 128 experts: far below the time to read the whole layer.
    assert decode * 3.35e12 / 1e9 < items[1].weight_bytes / 4
    assert prefill > 5 * decode


def test_qwen2_moe_shared_expert_and_dense_layers():
    hp = parse_hparams({**QWEN15_MOE_A27B, "mlp_only_layers": [0]})
    kinds = item_kinds(hp)
    assert kinds[:3] == ["embed", "layer:full_attention+dense", "layer:full_attention+moe"]
    moe = parse_hparams(QWEN15_MOE_A27B)
    assert total_bytes(analytic_costs(moe)) == pytest.approx(28.6e9, rel=0.02)  # 14.3B params


def test_sliding_layers_are_their_own_kind_and_cheaper_at_long_context():
    hp = tiny(
        architectures=["Qwen2ForCausalLM"],
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=2,
    )
    kinds = item_kinds(hp)
    assert kinds[1:5] == ["layer:full_attention+dense"] * 2 + ["layer:sliding_attention+dense"] * 2
    items = analytic_costs(hp, batch=8, seq=32768, mode="decode")
    assert items[3].cost < items[1].cost
    assert items[3].weight_bytes == items[1].weight_bytes


def test_bad_arguments_are_input_errors():
    hp = tiny()
    with pytest.raises(InputError, match="device='H900' is unknown"):
        analytic_costs(hp, device="H900")
    with pytest.raises(InputError, match="mode='train'"):
        analytic_costs(hp, mode="train")
    with pytest.raises(InputError, match="batch=0"):
        analytic_costs(hp, batch=0)


def test_roofline_device_comes_from_the_gpu_table():
    hp = parse_hparams(LLAMA3_8B)
    h100 = analytic_costs(hp)  # decode at batch 1: every item is bandwidth-bound
    l40s = analytic_costs(hp, device="l40s")  # the --gpu spelling, any case
    for a, b in zip(h100, l40s, strict=True):
        assert a.weight_bytes == b.weight_bytes
        # cost = bytes / bandwidth: 3.35 TB/s (H100) against 0.864 TB/s (L40S), to a ns
        assert b.cost == pytest.approx(a.cost * 3.35 / 0.864, abs=4)
    with pytest.raises(InputError, match=f"device='T4' is unknown. Known: {', '.join(GPUS)}."):
        analytic_costs(hp, device="T4")


def fake_profile(hp, median_us=None):
    return {
        "format": "reshard-costs",
        "version": 1,
        "model": model_shape(hp),
        "device": "cpu",
        "batch": 1,
        "seq": 16,
        "mode": "prefill",
        "kinds": {
            kind: {"median_us": us, "iqr_us": 0.5, "weight_bytes": 1}
            for kind, us in (median_us or {}).items()
        },
    }


def test_costs_file_round_trip(tmp_path):
    hp = tiny(num_hidden_layers=3)
    profile = fake_profile(hp, {"embed": 2.0, "layer:full_attention+dense": 10.5, "head": 31.25})
    path = tmp_path / "costs.json"
    write_costs(path, profile)
    assert read_costs(path) == profile
    items = item_costs_from_profile(hp, read_costs(path), where=str(path))
    assert [i.cost for i in items] == [2000, 10500, 10500, 10500, 31250]
    # Weight bytes in the checkpoint's dtype (no torch_dtype in the config: float32).
    assert [i.weight_bytes for i in items] == [
        i.weight_bytes for i in analytic_costs(hp, dtype_bytes=4)
    ]


def test_costs_file_refusals(tmp_path):
    hp = tiny()
    path = tmp_path / "costs.json"
    with pytest.raises(InputError, match=f"{path}: no such cost file.*reshard profile layers"):
        read_costs(path)
    for text, says in [
        ("{not json", "cost file"),
        ('{"format": ' + "1" * 5000 + "}", "5000 digits"),  # int() would raise ValueError
        ("[" * 2000, "deeper than 127 levels"),  # json.loads would raise RecursionError
    ]:
        path.write_text(text)
        with pytest.raises(InputError, match=f"{path}: .*{says}.*reshard profile layers"):
            read_costs(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a reshard cost file"):
        read_costs(path)
    bad = fake_profile(hp, {"embed": -1.0})
    with pytest.raises(InputError, match="kind 'embed' needs numbers median_us >= 0"):
        write_costs(path, bad)


def test_profile_of_another_model_or_missing_kind_is_refused():
    hp = tiny()
    other = fake_profile(tiny(vocab_size=2000), {"embed": 1, "head": 1})
    with pytest.raises(
        InputError,
        match=r"costs.json was measured on a model with vocab_size=2000, but this model has "
        r"vocab_size=1000\. Profile this model: `reshard profile layers MODEL -o costs.json`",
    ):
        item_costs_from_profile(hp, other)
    partial = fake_profile(hp, {"embed": 1, "head": 1})
    with pytest.raises(
        InputError, match=r"no timing for item kind 'layer:full_attention\+dense' \(layers 0, 1\)"
    ):
        item_costs_from_profile(hp, partial, where="run/costs.json")


@pytest.fixture
def one_thread():
    # Timings on a shared 2-core box: intra-op threads waiting on a descheduled sibling turn a
    # 0.2 ms layer into 16 ms now and then. One thread keeps the medians steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_profile_orders_a_huge_vocab_head_above_a_layer(one_thread):
    # A 500k x 64 lm_head reads 128 MB per call, a layer ~0.2 MB: a gap no CPU noise closes.
    hp = tiny(vocab_size=500_000)
    profile = profile_layers(hp, seq=16, warmup=2, iters=7)
    kinds = profile["kinds"]
    assert list(kinds) == ["embed", "layer:full_attention+dense", "head"]
    assert all(k["median_us"] > 0 and k["iqr_us"] >= 0 for k in kinds.values())
    assert kinds["head"]["median_us"] > kinds["layer:full_attention+dense"]["median_us"]
    assert (profile["device"], profile["dtype"], profile["mode"]) == ("cpu", "float32", "prefill")
    items = item_costs_from_profile(hp, profile)
    assert items[-1].cost > items[1].cost > 0


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_cpu_profile_runs_moe_sliding_and_qk_norm_kinds(mode):
    qwen2_moe = tiny(
        architectures=["Qwen2MoeForCausalLM"],
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[0],
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    qwen3_moe = tiny(
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=32,
    )
    for hp in (qwen2_moe, qwen3_moe):
        profile = profile_layers(hp, seq=16, mode=mode, warmup=1, iters=2)
        assert set(profile["kinds"]) == set(item_kinds(hp))
        assert all(k["median_us"] > 0 for k in profile["kinds"].values())
        assert len(item_costs_from_profile(hp, profile)) == hp.num_layers + 2
