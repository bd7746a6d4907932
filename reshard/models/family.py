"""What a model family is, as data: the tensor-name rules that say how each tensor splits, the
config.json keys only this family reads, and the switches the runtime turns on for it. One
module per family in this package holds one `Family`; code elsewhere reads these fields and
never asks for a family by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The closed vocabulary of roles; plan.py has one slicing function per role.
ROLES = (
    "replicate",  # whole on every rank that needs it
    "column",  # split dim 0 (on head boundaries when `heads` is set)
    "row",  # split dim 1 (on head boundaries when `heads` is set)
    "vocab",  # embedding: dim 0, zero-padded to a multiple of tp
    "head",  # lm_head: like vocab, on the last stage
    "expert_column",  # one routed expert's gate/up: dim 0 split tp/ep ways
    "expert_row",  # one routed expert's down: dim 1 split tp/ep ways
    "fused_expert_column",  # [E, 2I, H]: gate rows then up rows, per expert
    "fused_expert_row",  # [E, H, I]
    # Parts stacked on dim 0 in the checkpoint (Phi-3 qkv_proj [q; k; v], gate_up_proj
    # [gate; up]): each part split like its own column tensor, the rank's slices stacked again.
    "fused_column",
    # Experts stacked on dim 0 of one tensor ([E, ...]; gpt-oss `gate_up_proj` [E, H, 2I],
    # `down_proj` [E, I, H], their biases): each rank keeps its experts, each cut along
    # `Rule.expert_split` (dim, unit) into tp/ep parts, or whole when that is None.
    "stacked_expert",
    "drop",  # derivable from config (rotary inv_freq): recorded, not written
)

# Where a rule applies: every checkpoint, every layer, dense-MLP layers, MoE layers, once
# per expert of an MoE layer; in a hybrid model (layer_types with "linear_attention") the
# softmax-attention layers ("attention") or the linear-attention layers ("linear").
SCOPES = ("global", "layer", "dense", "moe", "expert", "mtp", "attention", "linear")


@dataclass(frozen=True)
class Rule:
    template: str  # HF name with {layer} / {expert}
    role: str
    scope: str
    # Divisibility is on heads, not rows: "q"/"kv" (head_dim wide), MLA's "qk" (nope + rope),
    # "kv_b" (k nope + v) and "v" (v_head_dim) per head.
    heads: str | None = None
    optional: bool = False
    group: str | None = None  # MoE layers need one complete group ("split" or "fused")
    # fused_column: the parts on dim 0 in order, each a `heads` kind ("q", "kv") or "mlp"
    # (intermediate_size rows), e.g. ("q", "kv", "kv") for [q; k; v].
    fused: tuple[str, ...] | None = None
    # stacked_expert: (dim, unit) cut tp/ep ways in whole units (gpt-oss's interleaved
    # gate/up columns: unit 2, so each rank keeps its gate/up pairs), None: whole per expert.
    expert_split: tuple[int, int] | None = None
    # The tensor's dims as symbols of models/dims.py (`("q", "hidden")`,
    # `("experts", "2*moe_inter", "hidden")`): its shape from config.json, the labels of the
    # consistency errors and the synthesized checkpoint all derive from them. Every family
    # rule of a tensor that is written has them (tests/test_dims.py).
    dims: tuple[str, ...] = ()

    def __post_init__(self):
        assert self.role in ROLES and self.scope in SCOPES, self
        assert (self.role == "fused_column") == bool(self.fused), self
        assert self.expert_split is None or self.role == "stacked_expert", self

    @property
    def regex(self) -> re.Pattern:
        pattern = re.escape(self.template)
        pattern = pattern.replace(r"\{layer\}", r"(?P<layer>\d+)")
        pattern = pattern.replace(r"\{expert\}", r"(?P<expert>\d+)")
        return re.compile(pattern + "$")


@dataclass(frozen=True)
class Features:
    """Runtime switches a family turns on; the defaults are Llama's."""

    # The module holding the router and experts, as saved on disk first. Mixtral saves
    # block_sparse_moe; transformers 5 holds it as mlp in memory, and state dicts say so.
    moe_blocks: tuple[str, ...] = ("mlp",)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    # The router's fp32 top-k weights scale the experts without a cast back (transformers'
    # Mixtral and DeepSeek-V3 do this; Qwen casts to the hidden dtype first).
    router_fp32_weights: bool = False
    # q/k/v stored as one `qkv_proj` ([q; k; v] rows) and gate/up as one `gate_up_proj`
    # ([gate; up] rows), per rank too (Phi-3): the runtime splits the local output by size.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Gemma: RMSNorm scales by (1 + weight) in fp32, then casts (Llama: weight after the cast).
    norm_adds_one: bool = False
    # Gemma: post_attention_layernorm normalises the attention output before the residual add,
    # and pre_/post_feedforward_layernorm wrap the MLP the same way (four norms per layer).
    sandwich_norms: bool = False
    # Gemma: the embedding output times sqrt(hidden_size), that factor cast to the hidden dtype.
    scale_embedding: bool = False
    # gpt-oss: RMSNorm scales by the weight in fp32, then casts (transformers keeps its norms
    # in fp32); Llama casts first. The same in an fp32 run, not in a bf16 one.
    norm_scale_fp32: bool = False
    # gpt-oss: a learned per-head logit `self_attn.sinks` joins each softmax (then dropped).
    attention_sinks: bool = False
    # The router's module name inside the MoE block (gpt-oss: `router`, with a bias).
    router: str = "gate"
    # gpt-oss: experts as [E, in, out] tensors with biases, gate/up interleaved in columns
    # (gate = [..., ::2], up = [..., 1::2]) and the clamped SwiGLU (HParams.swiglu_limit).
    stacked_experts: bool = False
    # Qwen3-Next: q_proj holds [q_h; gate_h] per head (2 x head_dim rows each); the attention
    # output is multiplied by sigmoid(gate) before o_proj.
    attention_output_gate: bool = False
    # MiniMax-M2: q_norm / k_norm span all heads of the projection ([heads x head_dim]), so a
    # TP rank normalises its heads by the mean of squares averaged over the TP group.
    qk_norm_over_heads: bool = False
    # Where a sigmoid router's selection bias sits, under the MoE block: DeepSeek-V3 keeps it
    # in the gate, MiniMax-M2 on the block itself ("e_score_correction_bias").
    correction_bias: str = "gate.e_score_correction_bias"

    @property
    def moe_block(self) -> str:
        """The on-disk name of the MoE module."""
        return self.moe_blocks[0]


def no_overrides(config: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """One model family. `read_config(config, where, fields)` returns the HParams fields this
    family sets or reads under its own keys; `fields` are the generic ones already parsed."""

    name: str  # recorded as hparams.family in the manifest
    architectures: tuple[str, ...]  # config.json `architectures` entries it serves
    rules: tuple[Rule, ...]
    read_config: Callable[[dict[str, Any], str, dict[str, Any]], dict[str, Any]] = no_overrides
    features: Features = field(default_factory=Features)
    # The config key the routed experts' width is read from, named in error messages
    # (models/dims.py's "moe_inter"): Mixtral and gpt-oss say intermediate_size.
    expert_width_key: str = "moe_intermediate_size"
    # Output formats that can write it: "vllm" once its vLLM names are checked against vLLM's
    # own loader (tests/golden/vllm/).
    formats: tuple[str, ...] = ("native",)
    # vLLM names that are this family's own (after the vLLM format's generic stacking):
    # (regex on the name, format string over its groups), first match wins.
    vllm_renames: tuple[tuple[str, str], ...] = ()
    # Native names (regexes) whose vLLM parameter is float32 whatever the checkpoint's dtype:
    # the vLLM format writes them as F32 (an exact cast from BF16/F16), so the loader casts
    # nothing.
    vllm_float32: tuple[str, ...] = ()
    # vLLM names (regexes) of parameters vLLM keeps transposed (last two dims swapped) against
    # the checkpoint: gpt-oss's experts, [E, out, in] where the checkpoint stores [E, in, out].
    vllm_transposed: tuple[str, ...] = ()
    # vLLM names of row-parallel biases vLLM holds on expert-TP rank 0 only, zeros on the
    # other ranks of an expert (its all-reduce then adds them once).
    vllm_first_rank_bias: tuple[str, ...] = ()


WITH_VLLM = ("native", "vllm")  # Family.formats of a family vLLM 0.32 loads as reshard writes it
