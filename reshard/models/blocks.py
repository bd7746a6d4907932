"""Tensor-rule tables several families share: Llama's decoder (the base every family
extends), per-head q/k norms, routed experts stored per expert or fused. Each family module
composes its rules from these and its own entries.
"""

from .family import Rule

ATTENTION = (
    Rule("model.layers.{layer}.input_layernorm.weight", "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight",
         "replicate", "layer", dims=("hidden",)),
    Rule("model.layers.{layer}.self_attn.q_proj.weight",
         "column", "layer", heads="q", dims=("q", "hidden")),
    Rule("model.layers.{layer}.self_attn.k_proj.weight",
         "column", "layer", heads="kv", dims=("kv", "hidden")),
    Rule("model.layers.{layer}.self_attn.v_proj.weight",
         "column", "layer", heads="kv", dims=("kv", "hidden")),
    Rule("model.layers.{layer}.self_attn.o_proj.weight",
         "row", "layer", heads="q", dims=("hidden", "q")),
    # attention_bias=true (some Llama fine-tunes); Qwen2 has q/k/v biases only.
    Rule("model.layers.{layer}.self_attn.q_proj.bias",
         "column", "layer", heads="q", optional=True, dims=("q",)),
    Rule("model.layers.{layer}.self_attn.k_proj.bias",
         "column", "layer", heads="kv", optional=True, dims=("kv",)),
    Rule("model.layers.{layer}.self_attn.v_proj.bias",
         "column", "layer", heads="kv", optional=True, dims=("kv",)),
    # Kept whole and added once, after the all-reduce.
    Rule("model.layers.{layer}.self_attn.o_proj.bias",
         "replicate", "layer", optional=True, dims=("hidden",)),
    # Old Llama exports saved the RoPE table; it is derived from config.json.
    Rule("model.layers.{layer}.self_attn.rotary_emb.inv_freq", "drop", "layer", optional=True),
)  # fmt: skip

DENSE_MLP = (
    Rule("model.layers.{layer}.mlp.gate_proj.weight", "column", "dense", dims=("inter", "hidden")),
    Rule("model.layers.{layer}.mlp.up_proj.weight", "column", "dense", dims=("inter", "hidden")),
    Rule("model.layers.{layer}.mlp.down_proj.weight", "row", "dense", dims=("hidden", "inter")),
    # mlp_bias=true (rare Llama variants); the down bias is added once after the all-reduce.
    Rule("model.layers.{layer}.mlp.gate_proj.bias",
         "column", "dense", optional=True, dims=("inter",)),
    Rule("model.layers.{layer}.mlp.up_proj.bias",
         "column", "dense", optional=True, dims=("inter",)),
    Rule("model.layers.{layer}.mlp.down_proj.bias",
         "replicate", "dense", optional=True, dims=("hidden",)),
)  # fmt: skip

GLOBAL = (
    Rule("model.embed_tokens.weight", "vocab", "global", dims=("vocab", "hidden")),
    Rule("model.norm.weight", "replicate", "global", dims=("hidden",)),
    Rule("lm_head.weight",
         "head", "global", dims=("vocab", "hidden")),  # absent when tie_word_embeddings
)  # fmt: skip


QK_NORM = (
    Rule("model.layers.{layer}.self_attn.q_norm.weight", "replicate", "layer", dims=("head_dim",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight", "replicate", "layer", dims=("head_dim",)),
)  # fmt: skip


def fused_experts(prefix: str) -> tuple[Rule, ...]:
    return (
        Rule(prefix + ".experts.gate_up_proj", "fused_expert_column", "moe", group="fused",
             dims=("experts", "2*moe_inter", "hidden")),
        Rule(prefix + ".experts.down_proj",
             "fused_expert_row", "moe", group="fused", dims=("experts", "hidden", "moe_inter")),
    )  # fmt: skip


QWEN_MOE_EXPERTS = (
    Rule("model.layers.{layer}.mlp.gate.weight", "replicate", "moe", dims=("experts", "hidden")),
    Rule("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
         "expert_column", "expert", group="split", dims=("moe_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
         "expert_column", "expert", group="split", dims=("moe_inter", "hidden")),
    Rule("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
         "expert_row", "expert", group="split", dims=("hidden", "moe_inter")),
    *fused_experts("model.layers.{layer}.mlp"),
)  # fmt: skip
