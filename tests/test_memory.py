"""Memory numbers of `reshard plan` from config.json alone (no weights, no files): weight totals
of real models against their published sizes, KV bytes per token, the activation peak and the
KV cache capacity by hand, the GPU table and its budget, and the --suggest search.
"""

from __future__ import annotations

import pytest

from reshard.errors import InputError, LayoutError
from reshard.layout.gpus import GB, GIB
from reshard.layout.memory.activation import (
    EngineLimits,
    activation_peak_bytes,
    engine_defaults,
    forward_peak_bytes,
    layer_transient,
    sampler_peak_bytes,
)
from reshard.layout.memory.model import (
    KvBudget,
    cached_tokens,
    kv_bytes_per_token,
    layer_kv_bytes,
    local_kv_heads,
    memory_report,
    resolve_gpu,
)
from reshard.layout.memory.shapes import build_layout, config_shapes, kv_budget, weight_lower_bound
from reshard.layout.memory.suggest import Fit, layout_ranks, suggest_layout, tp_bytes
from reshard.layout.recipe import build_recipe


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
MIXTRAL = {
    **llama(4096, 14336, 32, 32, 8, 32000),
    "architectures": ["MixtralForCausalLM"],
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
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
        # 1000 tokens take 63 whole blocks of 16 = 1008 token slots a sequence
        assert rank.kv_bytes == (last - first + 1) * 4 * 128 * 2 * 2 * 3 * 1008
        assert rank.headroom_bytes is None and rank.kv_tokens is None
    assert sum(r.kv_bytes for r in report.ranks) == 131072 * 3 * 1008
    assert report.fits is None and report.kv_tokens is None


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


def test_gpu_table_and_budget():
    h100 = resolve_gpu("h100")
    assert (h100.name, h100.memory_bytes) == ("H100", 80 * GB)
    # vLLM's log: total_gpu_memory 79.22GiB x gpu_memory_utilization 0.90 = 71.29GiB
    assert h100.total_bytes == round(79.22 * GIB)
    assert round(h100.budget_bytes / GIB, 2) == 71.30  # 71.298: the log truncates
    b200 = resolve_gpu("B200")  # no published CUDA total: the datasheet's 192 GB
    assert b200.memory_bytes == b200.total_bytes == 192 * GB
    assert resolve_gpu(None, 40).budget_bytes == 36 * GB
    assert resolve_gpu(None, 40, utilization=0.5).budget_bytes == 20 * GB
    assert resolve_gpu() is None


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_utilization_must_be_a_share(bad):
    with pytest.raises(InputError, match=f"--gpu-memory-utilization {bad:g}: .* <= 1"):
        resolve_gpu("H100", utilization=bad)


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
    # 70.56 GB of weights + 1 GiB non-torch + the activation peak leave no KV cache at all
    assert report.worst.kv_cache_bytes < 0 and report.kv_tokens == 0


def suggest(name, gpu, context=8192, gpus_per_node=8, memory_gb=None):
    shapes = shapes_of(name)
    recipe = build_recipe()
    budget = kv_budget(shapes, recipe, context=context, batch=1)
    gpu = resolve_gpu(gpu, memory_gb)
    return suggest_layout(shapes, recipe, gpu, budget, gpus_per_node=gpus_per_node)


def test_suggest_70b_on_h100():
    sug = suggest("Llama-3-70B", "H100")
    choice = sug.choice
    assert choice.worst.headroom_bytes >= 0
    # tp 2 fits 70.56 GB of weights in the 76.56 GB budget only on paper: with non-torch
    # memory and the activation peak nothing is left for the KV cache, as vLLM finds.
    assert (choice.tp, choice.pp) == (4, 1)
    assert [(c.tp, c.pp) for c in sug.candidates if c.pp_across_nodes] == [(4, 1), (8, 1)]
    tp2 = next(r for r in sug.rejected if r.tp == (2,) and r.pp == (1, 1))
    assert tp2.reason == (
        "rank 0 (stage 0): weights 70.56 GB + non-torch 1.07 GB + activation peak 5.38 GB = "
        "77.01 GB of the 76.56 GB budget, no memory left for the KV cache"
    )
    tp1 = [r for r in sug.rejected if r.tp == (1,)]
    assert tp1[0].pp == (1, 1) and "141.11 GB of weights" in tp1[0].reason
    tp3 = next(r for r in sug.rejected if r.tp == (3,))
    assert tp3.reason == "heads 64 not divisible"


def test_suggest_keeps_pp_across_nodes():
    # 70B on 26 GB GPUs (23.4 GB budget): tp 1 x pp 7 needs fewer GPUs, but PP inside a node
    # loses to a full node of TP; it is still listed as an alternative.
    sug = suggest("Llama-3-70B", None, memory_gb=26)
    assert (sug.choice.tp, sug.choice.pp) == (8, 1)
    assert [(c.tp, c.pp) for c in sug.candidates if not c.pp_across_nodes][0] == (1, 7)
    # With 4 GPUs a node, pp spans nodes with tp 4.
    sug = suggest("Llama-3-70B", "L4", gpus_per_node=4)
    assert (sug.choice.tp, sug.choice.nodes) == (4, sug.choice.pp)


def test_suggest_reports_nothing_fits():
    sug = suggest("Llama-3-70B", "L4", context=5_000_000, gpus_per_node=1)
    assert sug.choice is None
    assert all("budget" in r.reason for r in sug.rejected if r.tp == (1,))


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
    limits = EngineLimits(512, 8)
    full = memory_report(build_layout(shapes, recipe), gpu, budget, limits).ranks
    fit = Fit(gpu, budget, limits)
    fast = layout_ranks(shapes, build_recipe(), fit, tp_bytes(shapes, build_recipe(), tp), pp)
    assert fast == list(full)


def test_activation_peak_by_hand():
    hp = shapes_of("Llama-3-8B").hparams
    limits = EngineLimits(8192, 256)
    # forward: residual + hidden [8192, 4096] plus the MLP's gate/up + act [8192, 3 x 14336/tp]
    forward_tp1 = 8192 * 2 * (2 * 4096 + 3 * 14336)
    forward_tp2 = 8192 * 2 * (2 * 4096 + 3 * 7168)
    assert forward_peak_bytes(hp, range(32), 1, 8192, 2) == forward_tp1
    assert forward_peak_bytes(hp, range(16), 2, 8192, 2) == forward_tp2
    # sampler: local bf16 logits [256, 128256/tp] + 40 B per gathered fp32-era logit
    sampler_tp2 = 256 * 64128 * 2 + 256 * 128256 * 40
    assert sampler_peak_bytes(hp, 256, 2, 2) == sampler_tp2
    head = activation_peak_bytes(hp, range(16, 32), 2, head=True, limits=limits, dtype_bytes=2)
    body = activation_peak_bytes(hp, range(16), 2, head=False, limits=limits, dtype_bytes=2)
    assert (head, body) == (max(forward_tp2, sampler_tp2), forward_tp2)
    # no layers on the rank: the residual stream only
    assert forward_peak_bytes(hp, range(0), 2, 10, 2) == 10 * 2 * 2 * 4096


def test_moe_transient_uses_top_k_experts():
    hp = config_shapes("m", MIXTRAL, where="mixtral/config.json").hparams
    # fused MoE caches per token: top-2 x (gate/up 2 x 14336/tp + act 14336/tp + out 4096)
    assert layer_transient(hp, 0, 2) == 2 * (3 * 7168 + 4096)
    assert layer_transient(hp, 0, 8) == 2 * (3 * 1792 + 4096)
    # ep 8 of tp 8 places whole experts: each is split tp/ep = 1 way
    assert layer_transient(hp, 0, 8, ep=8) == 2 * (3 * 14336 + 4096)


def test_kv_capacity_in_tokens_and_blocks():
    shapes = shapes_of("Llama-3-8B")
    plan = build_layout(shapes, build_recipe())
    budget = KvBudget(context=8192, batch=1, dtype_bytes=2)
    limits = EngineLimits(8192, 256)
    report = memory_report(plan, resolve_gpu("H100"), budget, limits)
    (rank,) = report.ranks
    fixed = rank.weight_bytes + GIB + rank.activation_bytes
    assert rank.kv_cache_bytes == round(round(79.22 * GIB) * 0.9) - fixed
    assert rank.kv_blocks == rank.kv_cache_bytes // (16 * 131072)
    assert report.kv_tokens == rank.kv_tokens == 16 * rank.kv_blocks
    assert rank.headroom_bytes == rank.kv_cache_bytes - 8192 * 131072


@pytest.mark.parametrize(
    "name,total,expected",
    [
        ("H100", 85 * GB, (8192, 1024)),
        ("A100", 85 * GB, (2048, 256)),  # vLLM leaves the A100 out of its large defaults
        ("L4", 24 * GB, (2048, 256)),
        (None, None, (8192, 1024)),
    ],
)
def test_vllm_serve_defaults_follow_the_gpu(name, total, expected):
    assert engine_defaults(name, total) == expected
    limits = EngineLimits.for_gpu(name, total)
    assert (limits.max_num_batched_tokens, limits.max_num_seqs) == expected
    assert EngineLimits.for_gpu(name, total, 4096, 8).sampled_rows == 8


def test_engine_limits_name_the_flag():
    with pytest.raises(InputError, match="--max-num-seqs 0: give a positive whole number"):
        EngineLimits(8192, 0)


def load_calibration():
    """scripts/calibrate_memory.py: the published vLLM points and our predictions."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_memory.py"
    spec = importlib.util.spec_from_file_location("calibrate_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_calibration_against_vllm_logs():
    """Within 15% of vLLM's logged activation peak and KV cache (docs/memory.md); weights
    within 1.5% (vLLM's figure also counts its rotary cache and the like)."""
    cal = load_calibration()
    misses = []
    for point in cal.POINTS:
        ours, theirs = cal.predict(point), point.published
        assert ours.kv == pytest.approx(theirs["kv"], rel=0.15), point.name
        if theirs.get("weights") is None:  # only weights + activation were logged
            peak = ours.weights + ours.activation
            assert peak == pytest.approx(theirs["torch_peak"], rel=0.15)
            continue
        assert ours.weights == pytest.approx(theirs["weights"], rel=0.015), point.name
        if ours.activation != pytest.approx(theirs["activation"], rel=0.15):
            misses.append((point.name, round(ours.activation, 2), theirs["activation"]))
    # The one miss, in docs/memory.md: a worker's 0.19 GiB peak at 2048 tokens, 0.07 GiB over
    assert misses == [("DeepSeek-R1-Distill-Qwen-14B", 0.12, 0.19)]
