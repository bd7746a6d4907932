"""Memory numbers of `reshard plan` from config.json alone (no weights, no files): weight totals
of real models against their published sizes, KV bytes per token by hand, the GPU table and
its reserve, and the --suggest search.
"""

from __future__ import annotations

import pytest

from reshard.errors import InputError, LayoutError
from reshard.memory import (
    GB,
    KvBudget,
    cached_tokens,
    kv_bytes_per_token,
    layer_kv_bytes,
    local_kv_heads,
    memory_report,
    resolve_gpu,
)
from reshard.memory_plan import build_layout, config_shapes, kv_budget, weight_lower_bound
from reshard.memory_suggest import layout_ranks, suggest_layout, tp_bytes
from reshard.recipe import build_recipe


def llama(hidden, inter, layers, heads, kv, vocab, *, tie=False, dtype="bfloat16", **extra):
    """A config.json with the fields that fix every tensor shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
        "max_position_embeddings": 8192,
        **extra,
    }


# Values from each model's config.json on the hub.
MODELS = {
    "Llama-3-8B": llama(4096, 14336, 32, 32, 8, 128256),
    "Llama-3-70B": llama(8192, 28672, 80, 64, 8, 128256),
    "Llama-2-13B": llama(5120, 13824, 40, 40, 40, 32000, dtype="float16"),
    "Llama-2-70B": llama(8192, 28672, 80, 64, 8, 32000, dtype="float16"),
    "Mistral-7B": {
        **llama(4096, 14336, 32, 32, 8, 32000),
        "architectures": ["MistralForCausalLM"],
        "sliding_window": 4096,
        "max_position_embeddings": 32768,
    },
}
PUBLISHED_GB = {  # REFERENCES.md, "GPU memory": FP16 weight memory
    "Llama-3-8B": 16,
    "Llama-3-70B": 140,
    "Llama-2-13B": 26,
    "Llama-2-70B": 140,
    "Mistral-7B": 14,
}


def shapes_of(name: str):
    return config_shapes(name, MODELS[name], where=f"{name}/config.json")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_totals_match_published_sizes(name):
    plan = build_layout(shapes_of(name), build_recipe())
    assert plan.total_bytes == pytest.approx(PUBLISHED_GB[name] * GB, rel=0.05)


def test_weight_total_grows_only_by_replicas_and_padding():
    shapes = shapes_of("Llama-3-70B")
    low = weight_lower_bound(shapes, build_recipe())
    assert build_layout(shapes, build_recipe()).total_bytes == low
    tp8 = build_layout(shapes, build_recipe(tp=8)).total_bytes
    # norms replicated on 8 ranks: 2 per layer + the final one, 8192 bf16 values each
    assert tp8 - low == 7 * (2 * 80 + 1) * 8192 * 2


def test_kv_bytes_per_token_by_hand():
    hp = shapes_of("Llama-3-8B").hparams
    layers = range(32)
    assert kv_bytes_per_token(hp, layers, 1, 2) == 32 * 8 * 128 * 2 * 2 == 131072
    assert kv_bytes_per_token(hp, layers, 8, 2) == 16384  # 1 kv head per rank
    assert local_kv_heads(hp, 16) == 1  # kv 8 < tp 16: each rank caches its head's copy
    assert kv_bytes_per_token(hp, layers, 16, 2) == 16384


def test_rank_kv_from_the_plan():
    shapes = shapes_of("Llama-3-8B")
    recipe = build_recipe(tp=2, pp=2)
    plan = build_layout(shapes, recipe)
    report = memory_report(plan, None, KvBudget(context=1000, batch=3, dtype_bytes=2))
    for rank in report.ranks:
        first, last = rank.layers
        assert rank.kv_bytes == (last - first + 1) * 4 * 128 * 2 * 2 * 3 * 1000
        assert rank.headroom_bytes is None
    assert sum(r.kv_bytes for r in report.ranks) == 131072 * 3000
    assert report.fits is None


def test_sliding_window_caps_cached_tokens():
    hp = shapes_of("Mistral-7B").hparams
    budget = KvBudget(context=8192, batch=1, dtype_bytes=2)
    assert cached_tokens(hp, 0, 8192) == 4096
    assert cached_tokens(hp, 0, 1000) == 1000
    assert layer_kv_bytes(hp, 0, 1, budget) == 8 * 128 * 2 * 2 * 4096


def test_kv_dtype_follows_the_written_weights():
    shapes = config_shapes("m", llama(64, 128, 2, 4, 2, 100, dtype="float32"), where="c")
    assert kv_budget(shapes, build_recipe(), context=8, batch=1).dtype_bytes == 4
    assert kv_budget(shapes, build_recipe(dtype="bf16"), context=8, batch=1).dtype_bytes == 2


def test_gpu_table_and_reserve():
    h100 = resolve_gpu("h100")
    assert (h100.name, h100.memory_bytes, h100.usable_bytes) == ("H100", 80 * GB, 72 * GB)
    assert resolve_gpu("B200").memory_bytes == 192 * GB
    assert resolve_gpu(None, 40).usable_bytes == 36 * GB
    assert resolve_gpu() is None


def test_gpu_errors_list_the_known_ones():
    with pytest.raises(InputError, match="unknown GPU. Known: B200 .*L40S .*--gpu-memory"):
        resolve_gpu("X100")
    with pytest.raises(InputError, match="give one"):
        resolve_gpu("H100", 80)
    with pytest.raises(InputError, match="> 0"):
        resolve_gpu(None, 0)


def test_verdict_names_the_worst_rank():
    shapes = shapes_of("Llama-3-70B")
    plan = build_layout(shapes, build_recipe(tp=2))
    budget = kv_budget(shapes, build_recipe(), context=32768, batch=1)
    report = memory_report(plan, resolve_gpu("H100"), budget)
    assert report.fits is False
    assert report.worst.headroom_bytes < 0 and len(report.over) == 2


def suggest(name, gpu, context=8192, gpus_per_node=8):
    shapes = shapes_of(name)
    recipe = build_recipe()
    budget = kv_budget(shapes, recipe, context=context, batch=1)
    return suggest_layout(shapes, recipe, resolve_gpu(gpu), budget, gpus_per_node=gpus_per_node)


def test_suggest_70b_on_h100():
    sug = suggest("Llama-3-70B", "H100")
    choice = sug.choice
    assert choice.worst.headroom_bytes >= 0
    assert (choice.tp, choice.pp) == (2, 1)  # 70.55 GB weights + 1.34 GB KV per rank
    assert [(c.tp, c.pp) for c in sug.candidates if c.pp_across_nodes] == [(2, 1), (4, 1), (8, 1)]
    tp1 = [r for r in sug.rejected if r.tp == (1,)]
    assert tp1[0].pp == (1, 1) and "141.11 GB of weights" in tp1[0].reason
    tp3 = next(r for r in sug.rejected if r.tp == (3,))
    assert tp3.reason == "heads 64 not divisible"


def test_suggest_keeps_pp_across_nodes():
    # 70B on L4 (21.6 GB usable): tp 1 x pp 7 needs fewer GPUs, but PP inside a node loses
    # to a full node of TP; it is still listed as an alternative.
    sug = suggest("Llama-3-70B", "L4")
    assert (sug.choice.tp, sug.choice.pp) == (8, 1)
    assert any(not c.pp_across_nodes and c.world < 8 for c in sug.candidates)
    # With 4 GPUs a node, pp spans nodes with tp 4.
    sug = suggest("Llama-3-70B", "L4", gpus_per_node=4)
    assert (sug.choice.tp, sug.choice.nodes) == (4, sug.choice.pp)


def test_suggest_reports_nothing_fits():
    sug = suggest("Llama-3-70B", "L4", context=5_000_000, gpus_per_node=1)
    assert sug.choice is None
    assert all("usable" in r.reason for r in sug.rejected if r.tp == (1,))


def test_suggest_needs_a_node():
    with pytest.raises(LayoutError, match="gpus-per-node"):
        suggest("Llama-3-8B", "H100", gpus_per_node=0)


SMALL = {
    "dense": llama(256, 512, 6, 8, 2, 1001),
    "tied": llama(256, 512, 5, 8, 8, 999, tie=True),
    "moe": {  # dense layer 0 (mlp_only_layers), MoE layers with a shared expert
        **llama(256, 512, 5, 8, 4, 1000),
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "mlp_only_layers": [0],
    },
}


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (2, 3), (1, 5)])
def test_suggest_bytes_equal_the_full_plan(kind, tp, pp):
    """The search's per-rank sums (TpBytes) against memory_report over a complete Plan."""
    shapes = config_shapes(kind, SMALL[kind], where=kind)
    recipe = build_recipe(tp=tp, pp=pp)
    budget = KvBudget(context=100, batch=2, dtype_bytes=2)
    gpu = resolve_gpu("L4")
    full = memory_report(build_layout(shapes, recipe), gpu, budget).ranks
    fast = layout_ranks(
        shapes, build_recipe(), budget, gpu, tp_bytes(shapes, build_recipe(), tp), pp
    )
    assert fast == list(full)
