"""One record per weight: every family rule names its dims (models/dims.py), and the shape
and the labels of a consistency error derive from them."""

from __future__ import annotations

import pytest

from reshard.errors import CheckpointError
from reshard.models import FAMILIES
from reshard.models.consistency import check_tensors_against_config
from reshard.models.dims import SYMBOLS, dim_value, labelled_shape, tensor_shape
from reshard.models.hparams import parse_hparams
from reshard.models.rules import match_tensors, rules_for
from reshard.models.shapes import synthesize_tensors

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 100, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_written_tensor_rule_names_known_dims(family):
    for rule in family.rules:
        if rule.role == "drop":
            continue
        assert rule.dims, f"{family.name}: {rule.template} has no dims"
        for dim in rule.dims:
            for term in dim.split("+"):
                times, _, symbol = term.rpartition("*")
                assert symbol in SYMBOLS and (not times or times.isdigit()), (rule.template, dim)


def test_dim_expressions_add_and_multiply_with_their_keys():
    hp = parse_hparams(LLAMA)
    q = "num_attention_heads=4 x head_dim=16"
    kv = "num_key_value_heads=2 x head_dim=16"
    assert dim_value(hp, "q+2*kv") == (f"{q} + 2 x {kv}", 64 + 2 * 32)
    assert dim_value(hp, "2*inter") == ("2 x intermediate_size=160", 320)
    rules = {
        r.template.rsplit(".", 2)[-2]: r for r in rules_for(hp) if r.template.endswith("weight")
    }
    assert tensor_shape(hp, rules["o_proj"]) == (64, 64)
    assert tensor_shape(hp, rules["down_proj"]) == (64, 160)
    assert labelled_shape(hp, rules["k_proj"]) == ((kv, 32), ("hidden_size=64", 64))


def test_a_wrong_dim_is_named_by_the_rule_s_keys():
    hp = parse_hparams(LLAMA)
    tensors = synthesize_tensors(hp)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = ("BF16", (48, 64))
    roles = match_tensors(hp, tensors)
    with pytest.raises(CheckpointError) as e:
        check_tensors_against_config(
            hp, tensors, roles, cast="keep", files=dict.fromkeys(tensors, "m.safetensors"),
            config="c/config.json",
        )  # fmt: skip
    assert str(e.value) == (
        f"m.safetensors: tensor '{name}' has 48 in dim 0 (shape [48, 64]), but c/config.json "
        "says num_key_value_heads=2 x head_dim=16, which implies 32. config.json and the "
        "weights do not belong together; re-download them as one."
    )
