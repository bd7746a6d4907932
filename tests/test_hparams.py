"""HParams from config.json: sliding-window layers and router normalisation must follow
transformers' own config classes, including old configs without `layer_types`."""

from __future__ import annotations

import pytest
import transformers

from reshard.errors import CheckpointError, UnsupportedModelError
from reshard.models.hparams import parse_hparams

CASES = [
    ("Qwen2", dict(use_sliding_window=True, max_window_layers=2)),
    ("Qwen2Moe", dict(use_sliding_window=True, max_window_layers=3)),
    ("Mistral", dict(sliding_window=8)),
    ("Qwen3Moe", dict(use_sliding_window=True, sliding_window=8)),
    ("Qwen2", dict(use_sliding_window=False)),
]


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("drop_layer_types", [False, True])
def test_layer_types_follow_transformers(name, kwargs, drop_layer_types):
    config = getattr(transformers, f"{name}Config")(num_hidden_layers=5, **kwargs)
    expected = getattr(config, "layer_types", None)
    if expected is None:  # models without layer_types slide everywhere when a window is set
        window = config.sliding_window
        expected = ["sliding_attention" if window else "full_attention"] * 5
    if not config.sliding_window:
        expected = ["full_attention"] * 5
    d = config.to_dict()
    d["architectures"] = [f"{name}ForCausalLM"]
    if drop_layer_types:  # an old config.json, written before transformers 5
        d.pop("layer_types", None)
    assert list(parse_hparams(d).layer_types) == expected


def test_mixtral_always_renormalises_top_k():
    config = transformers.MixtralConfig(num_hidden_layers=2).to_dict()
    config["architectures"] = ["MixtralForCausalLM"]
    config["norm_topk_prob"] = False
    assert parse_hparams(config).norm_topk_prob is True


def test_rope_parameters_v4_and_v5_read_the_same():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 10}  # fmt: skip
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    v4 = parse_hparams({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = parse_hparams({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling == scaling


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        parse_hparams({"architectures": ["GPT2LMHeadModel"]}, where="x/config.json")


def test_absurd_layer_count_is_refused_before_per_layer_tables():
    """num_hidden_layers sizes per-layer tuples (layer types, MoE layers): 10**30 would
    allocate until the machine runs out of memory, so it is refused by its key first."""
    config = {
        "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "vocab_size": 101, "num_hidden_layers": 10**30, "num_experts": 4,
        "use_sliding_window": True, "sliding_window": 8,
    }  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        parse_hparams(config, where="m/config.json")
    assert str(e.value).startswith("m/config.json: 'num_hidden_layers'"), str(e.value)
    assert "an integer in 1..100000" in str(e.value)
