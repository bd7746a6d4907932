"""The planner on numbers alone: shapes synthesized from config values, no files."""

from __future__ import annotations

import pytest

from reshard.errors import LayoutError
from reshard.layout.check import valid_tp
from reshard.layout.recipe import build_recipe
from reshard.layout.resolve import resolve
from reshard.models.hparams import parse_hparams
from reshard.models.rules import match_tensors
from reshard.models.shapes import synthesize_tensors

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
}  # fmt: skip


def plan_for(config: dict, **flags):
    hp = parse_hparams(config)
    tensors = synthesize_tensors(hp)
    recipe = build_recipe(**flags)
    return hp, tensors, resolve(hp, tensors, match_tensors(hp, tensors), recipe).plan


def test_tp8_pp2_bytes_add_up_and_stages_hold_their_layers():
    hp, tensors, plan = plan_for(LLAMA_70B, tp=8, pp=2)
    total = sum(2 * _numel(shape) for _, shape in tensors.values())
    norms = sum(2 * shape[0] for _, shape in tensors.values() if len(shape) == 1)
    # 128256 % 8 == 0: no padding; only the norms are replicated, on all 8 ranks of a stage
    assert plan.total_bytes == total + 7 * norms
    assert len(plan.files) == 16
    for f in plan.files:
        coord = plan.layout.coord(f.rank)
        stage = plan.layout.stages[coord.pp_stage]
        layers = {int(t.name.split(".")[2]) for t in f.tensors if t.name.startswith("model.layers")}
        assert layers == set(stage.layers)
        names = {t.name for t in f.tensors}
        assert ("model.embed_tokens.weight" in names) == stage.embed
        assert ("lm_head.weight" in names) == stage.head
    q = next(t for t in plan.files[3].tensors if t.name.endswith("0.self_attn.q_proj.weight"))
    assert q.shape == (1024, 8192) and q.pieces[0].start == (3 * 1024, 0)


def test_tp16_replicates_kv_heads_in_pairs():
    _, _, plan = plan_for(LLAMA_70B, tp=16)
    starts = []
    for f in plan.files:
        k = next(t for t in f.tensors if t.name == "model.layers.0.self_attn.k_proj.weight")
        assert k.shape == (128, 8192)  # one kv head of 128 rows
        starts.append(k.pieces[0].start[0])
    assert starts == [h * 128 for h in range(8) for _ in range(2)]


def test_vocab_padding_on_numbers():
    _, _, plan = plan_for({**LLAMA_70B, "vocab_size": 32001, "num_hidden_layers": 2}, tp=2)
    emb = [next(t for t in f.tensors if t.name == "model.embed_tokens.weight") for f in plan.files]
    assert [e.shape[0] for e in emb] == [16001, 16001]
    assert [e.padding for e in emb] == [0, 1]
    assert emb[1].pieces[0].start == (16001, 0) and emb[1].pieces[0].stop == (32001, 8192)
    assert plan.layout.vocab_padded == 32002


@pytest.mark.parametrize(
    "tp,needle",
    [
        (3, "num_attention_heads=64 is not divisible by tp=3"),
        (12, "num_key_value_heads=8 neither divides nor is divisible by tp=12"),
    ],
)
def test_infeasible_tp_names_the_numbers_and_valid_choices(tp, needle):
    with pytest.raises(LayoutError) as e:
        plan_for(LLAMA_70B, tp=tp)
    assert needle in str(e.value)
    assert "Valid tp for this model: 1, 2, 4, 8, 16, 32, 64." in str(e.value)


def test_valid_tp_of_a_tp24_friendly_model():
    # 48 heads / 24 kv heads / intermediate 24576 (tp 24 is a real request in the field)
    hp = parse_hparams({**LLAMA_70B, "num_attention_heads": 48, "num_key_value_heads": 24,
                        "hidden_size": 6144, "intermediate_size": 24576})  # fmt: skip
    assert 24 in valid_tp(hp) and 5 not in valid_tp(hp)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
