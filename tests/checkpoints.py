"""Tiny real checkpoints for the tests, written by transformers (random weights).

Weights are scaled up so that greedy decoding varies from token to token: a wrong shard then
changes the generated ids, not just the last decimal of a logit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,  # not divisible by 2 or 4: exercises vocab padding
    max_position_embeddings=256,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


# 16 experts in 4 groups (2 kept), low-rank q, one dense layer first; MLA has no kv groups.
DEEPSEEK_V3 = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
)


# Architectures whose config class is not named after them.
CONFIG_CLASSES = {
    "Gemma3ForCausalLM": "Gemma3TextConfig",
    "Qwen3_5MoeForCausalLM": "Qwen3_5MoeTextConfig",
}


def config_for(arch: str, **overrides):
    import transformers

    cls = getattr(transformers, CONFIG_CLASSES.get(arch, arch.replace("ForCausalLM", "Config")))
    kwargs = {**BASE, **overrides}
    if arch.startswith(("Mixtral", "Qwen2Moe", "Qwen3Moe")):
        kwargs.setdefault("num_experts_per_tok", 2)
        if arch.startswith("Mixtral"):
            kwargs.setdefault("num_local_experts", 4)
        else:
            kwargs.setdefault("num_experts", 4)
            kwargs.setdefault("moe_intermediate_size", 32)
        if arch.startswith("Qwen2Moe"):
            kwargs.setdefault("shared_expert_intermediate_size", 48)
    if arch.startswith("Phi3"):  # its defaults (pad/eos 32000) lie outside the tiny vocab
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 2)
    if arch.startswith("DeepseekV3"):
        for key, value in DEEPSEEK_V3.items():
            kwargs.setdefault(key, value)
    config = cls(**kwargs)
    config.architectures = [arch]
    return config


def write_checkpoint(
    path: Path,
    arch: str = "LlamaForCausalLM",
    *,
    shard_size=None,
    seed=0,
    dtype=None,
    random_biases=False,
    **overrides,
) -> Path:
    """save_pretrained a random tiny model; `shard_size` (e.g. "20KB") makes several files.
    `random_biases`: every bias and sink drawn at random, where transformers starts them at
    zero (a bias put in the wrong place then changes bytes and tokens)."""
    import transformers

    torch.manual_seed(seed)
    config = config_for(arch, **overrides)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # transformers zeroes DeepSeek's selection bias: make it matter
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.5)
        for name, param in model.named_parameters():
            if random_biases and name.endswith(("_bias", ".bias", "sinks")):
                param.copy_(torch.randn_like(param) * 0.5)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def move_tensor(path: Path, name: str, to_file: str) -> None:
    """Move one tensor to another (new) shard file and fix the index: q/k/v of one layer
    stored in different files, as some exporters do."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    src = index["weight_map"][name]
    tensors = load_file(path / src)
    moved = tensors.pop(name)
    save_file(tensors, path / src, metadata={"format": "pt"})
    extra = load_file(path / to_file) if (path / to_file).exists() else {}
    extra[name] = moved
    save_file(extra, path / to_file, metadata={"format": "pt"})
    index["weight_map"][name] = to_file
    index_path.write_text(json.dumps(index))
