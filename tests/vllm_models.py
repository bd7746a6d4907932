"""The engine tier's tiny models: each a transformers-written bf16 checkpoint whose shapes vLLM's
CPU build runs (attention head sizes 32/64/128; MLA's latent 512 + rope 64), each with the quirk
it stands for. Shared by tests/test_vllm_format.py (no vLLM needed), tests/test_vllm_engine.py
(vLLM's CPU build) and scripts/vllm_golden.py, which records vLLM's expected keys per layout.
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
}


def write_model(path: Path, name: str) -> Path:
    arch, overrides, _ = MODELS[name]
    kwargs = {**DENSE, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return write_checkpoint(path, arch, dtype=torch.bfloat16, **kwargs)
