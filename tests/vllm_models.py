"""The engine tier's tiny models: each a transformers-written bf16 checkpoint whose shapes vLLM's
CPU build runs (attention head sizes 32/64/128; MLA's latent 512 + rope 64), each with the quirk
it stands for, and every bias drawn at random (transformers starts them at zero). Shared by
tests/test_vllm_format.py (no vLLM needed), tests/test_vllm_engine.py (vLLM's CPU build) and
scripts/vllm_golden.py, which records vLLM's expected keys per layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from checkpoints import write_checkpoint

DENSE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    head_dim=32,
    num_key_value_heads=2,
    num_hidden_layers=4,
    vocab_size=101,  # pads to 128 (vLLM: a multiple of 64) and splits 64 + 64 at tp 2
    initializer_range=0.2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
# Qwen3-Next / Qwen3.5: layers 1 and 3 full attention, 0 and 2 gated DeltaNet (2 key heads, 2
# value heads per key head: tp 2 gives each rank one group), all four MoE with a shared expert.
LINEAR = dict(
    num_experts=4,
    shared_expert_intermediate_size=96,
    full_attention_interval=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=128,  # the released models; vLLM's CPU DeltaNet kernel takes no 32
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
)

# name -> (architecture, config overrides, what it stands for)
MODELS = {
    "llama": ("LlamaForCausalLM", dict(num_key_value_heads=1), "GQA with kv 1 < tp 2"),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), "q/k/v bias, tied head"),
    "qwen3": ("Qwen3ForCausalLM", {}, "q/k norm"),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), "MoE"),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(MOE, num_experts=4, shared_expert_intermediate_size=96),
        "MoE with a gated shared expert",
    ),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(MOE, num_experts=4), "MoE with q/k norm"),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            moe_intermediate_size=64,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=96,
            kv_lora_rank=512,
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,
            v_head_dim=32,
            head_dim=None,
            topk_method="noaux_tc",  # as DeepSeek-V3's config says: vLLM then keeps the bias
        ),
        "MLA with shared experts and grouped routing",
    ),
    "phi3": ("Phi3ForCausalLM", dict(pad_token_id=0, eos_token_id=2), "fused qkv / gate_up"),
    # tied, as Gemma-2 is (vLLM's Gemma-2 always ties its head)
    "gemma2": ("Gemma2ForCausalLM", dict(tie_word_embeddings=True), "soft caps, sandwich norms"),
    "gemma3": ("Gemma3ForCausalLM", {}, "q/k norm, two ropes, untied head"),
    "glm4_moe": (
        "Glm4MoeForCausalLM",
        dict(
            MOE,
            attention_bias=True,
            use_qk_norm=True,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.0,
        ),
        "partial rotary, q/k/v bias, q/k norm, sigmoid grouped routing, dense first layer",
    ),
    "minimax_m2": (
        "MiniMaxM2ForCausalLM",
        dict(
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            rotary_dim=16,
            # fields of the released config.json that vLLM reads and transformers drops
            scoring_func="sigmoid",
            use_routing_bias=True,
            use_qk_norm=True,
            qk_norm_type="per_layer",
        ),
        "q/k norm over all heads (split with them), partial rotary, w1/w2/w3 experts",
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        dict(
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            head_dim=64,
        ),
        "attention sinks, biased router and experts stored [E, in, out] (vLLM: transposed)",
    ),
    "qwen3_next": (
        "Qwen3NextForCausalLM",
        dict(MOE, **LINEAR),
        "gated DeltaNet beside gated attention",
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeForCausalLM",
        dict(MOE, **LINEAR),
        "gated DeltaNet with separate qkv / z / b / a projections",
    ),
}


def write_model(path: Path, name: str) -> Path:
    arch, overrides, _ = MODELS[name]
    kwargs = {**DENSE, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return write_checkpoint(path, arch, dtype=torch.bfloat16, random_biases=True, **kwargs)
