"""The decoder of every supported family as one module tree named exactly like HF's
(`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`). A `CausalLM` is one pipeline
stage: it holds whichever of the embedding, layers, final norm and head its tensors contain,
so the same code runs the whole model or one rank's shard. It knows nothing about files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import family_of
from ..models.hparams import HParams
from ..models.rules import is_mtp_name
from .cache import KVCache, Step
from .deltanet import GatedDeltaNet
from .dist import Comm
from .fused import FusedAttention, FusedMLP
from .gated_attention import GatedAttention
from .layers import MLP, Attention, LMHead, Tensors, VocabEmbedding, make_norm
from .mla import MLAttention
from .moe import ExpertMap, MoEBlock, build_expert_map
from .qk_norm import SpanNormAttention
from .rope import compute_inv_freq, compute_sliding_inv_freq, rope_cos_sin

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [B, S, head_dim]


class DecoderLayer(nn.Module):
    def __init__(self, hp: HParams, layer: int, tensors: Tensors, comm: Comm, emap: ExpertMap):
        super().__init__()
        prefix = f"model.layers.{layer}."
        self.input_layernorm = make_norm(hp, hp.hidden_size)
        self.post_attention_layernorm = make_norm(hp, hp.hidden_size)
        features = family_of(hp).features
        self.sandwich = features.sandwich_norms
        if self.sandwich:  # Gemma: the MLP between its own pre and post norms
            self.pre_feedforward_layernorm = make_norm(hp, hp.hidden_size)
            self.post_feedforward_layernorm = make_norm(hp, hp.hidden_size)
        self.sliding = hp.layer_types[layer] == "sliding_attention"
        if hp.is_linear(layer):  # gated DeltaNet: a recurrent state, no KV cache
            self.linear_attn = GatedDeltaNet(hp, layer, tensors, f"{prefix}linear_attn.", comm)
        else:
            self.self_attn = _attention(hp, features)(
                hp, layer, tensors, f"{prefix}self_attn.", comm
            )
        moe = layer in hp.moe_layers
        self.ffn_name = _ffn_name(tensors, prefix, features.moe_blocks) if moe else "mlp"
        ffn_prefix = f"{prefix}{self.ffn_name}."
        if moe:
            self.add_module(self.ffn_name, MoEBlock(hp, tensors, ffn_prefix, emap, comm))
        else:
            mlp = FusedMLP if features.fused_gate_up else MLP
            self.add_module(self.ffn_name, mlp(hp, tensors, ffn_prefix, comm))

    @property
    def mixer(self) -> nn.Module:
        """The token mixer: self_attn, or linear_attn in a hybrid model's linear layers."""
        return self.linear_attn if hasattr(self, "linear_attn") else self.self_attn

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache
    ) -> torch.Tensor:
        if self.sandwich:
            return self._forward_sandwich(x, rope, step, cache)
        x = x + self.mixer(self.input_layernorm(x), rope, step, cache)  # [B, S, H]
        ffn = getattr(self, self.ffn_name)
        return x + ffn(self.post_attention_layernorm(x), step.token_valid)

    def _forward_sandwich(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache
    ) -> torch.Tensor:
        """Gemma: post_attention_layernorm acts on the attention output, before the add."""
        attn = self.mixer(self.input_layernorm(x), rope, step, cache)  # [B, S, H]
        x = x + self.post_attention_layernorm(attn)
        ffn = getattr(self, self.ffn_name)
        out = ffn(self.pre_feedforward_layernorm(x), step.token_valid)  # [B, S, H]
        return x + self.post_feedforward_layernorm(out)


def _attention(hp: HParams, features) -> type[nn.Module]:
    if features.attention_output_gate:
        return GatedAttention
    if features.qk_norm_over_heads:
        return SpanNormAttention
    if features.fused_qkv:
        return FusedAttention
    return MLAttention if hp.is_mla else Attention


def _ffn_name(tensors: Tensors, prefix: str, blocks: tuple[str, ...]) -> str:
    for name in blocks:
        if f"{prefix}{name}.gate.weight" in tensors:
            return name
    raise KeyError(f"{prefix}{blocks[0]}.gate.weight")


class Body(nn.Module):
    """`model.*`: embedding (first stage), this stage's layers, final norm (last stage)."""

    def __init__(self, hp: HParams, tensors: Tensors, comm: Comm, emaps: dict[int, ExpertMap]):
        super().__init__()
        if "model.embed_tokens.weight" in tensors:
            scale = hp.hidden_size**0.5 if family_of(hp).features.scale_embedding else None
            shape = tensors["model.embed_tokens.weight"].shape
            self.embed_tokens = VocabEmbedding(shape, comm, scale)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(hp, i, tensors, comm, emaps[i]) for i in stage_layers(tensors)}
        )
        if "model.norm.weight" in tensors:
            self.norm = make_norm(hp, hp.hidden_size)


class CausalLM(nn.Module):
    """One pipeline stage. forward: ids [B, S] (first stage) or hidden [B, S, H] -> hidden
    [B, S, H] (not last stage) or logits [B, S', V] (last stage; S' = 1 if last_only)."""

    def __init__(self, hp: HParams, tensors: Tensors, comm: Comm, emaps: dict[int, ExpertMap]):
        super().__init__()
        self.hp, self.comm = hp, comm
        self.model = Body(hp, tensors, comm, emaps)
        if "lm_head.weight" in tensors:
            shape, cap = tensors["lm_head.weight"].shape, hp.final_logit_softcapping
            self.lm_head = LMHead(shape, hp.vocab_size, comm, cap)
        self.inv_freq, self.rope_scale = compute_inv_freq(hp)
        self.sliding_rope = compute_sliding_inv_freq(hp)  # None: one rope for every layer

    @property
    def has_embed(self) -> bool:
        return hasattr(self.model, "embed_tokens")

    @property
    def has_head(self) -> bool:
        return hasattr(self, "lm_head")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self, x: torch.Tensor, step: Step, cache: KVCache, *, last_only: bool = True
    ) -> torch.Tensor:
        if self.has_embed:
            x = self.embed(x)  # [B, S, H]
        rope, sliding_rope = self.rotary(x, step)
        for layer in self.model.layers.values():
            x = layer(x, sliding_rope if layer.sliding else rope, step, cache)
        if not self.has_head:
            return x
        return self.logits(x, last_only=last_only)

    # The pieces of forward, each callable alone (`reshard profile layers` times them).
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> hidden [B, S, H] (first stage)."""
        return self.model.embed_tokens(ids)

    def rotary(self, x: torch.Tensor, step: Step) -> tuple[Rope, Rope]:
        """cos/sin [B, S, head_dim] of this step's positions for full and for sliding layers
        (the same pair unless the family gives sliding layers their own base), shared by the
        stage's layers."""
        rope = rope_cos_sin(self.inv_freq.to(x.device), step.positions, self.rope_scale, x.dtype)
        if self.sliding_rope is None:
            return rope, rope
        inv_freq, scale = self.sliding_rope
        return rope, rope_cos_sin(inv_freq.to(x.device), step.positions, scale, x.dtype)

    def logits(self, x: torch.Tensor, *, last_only: bool = True) -> torch.Tensor:
        """Final norm + head (last stage): hidden [B, S, H] -> logits [B, S', V]."""
        x = self.model.norm(x)
        return self.lm_head(x[:, -1:] if last_only else x)

    def enable_expert_load(self) -> None:
        """Start counting tokens routed per expert in every MoE layer (see read_expert_load)."""
        for block in self.modules():
            if isinstance(block, MoEBlock):
                block.expert_load = torch.zeros(
                    self.hp.num_experts, dtype=torch.long, device=self.device
                )

    def read_expert_load(self) -> dict[int, list[int]]:
        """{layer: tokens routed to each logical expert} since enable_expert_load."""
        blocks = {int(i): getattr(layer, layer.ffn_name) for i, layer in self.model.layers.items()}
        return {
            i: block.expert_load.tolist()
            for i, block in blocks.items()
            if isinstance(block, MoEBlock) and block.expert_load is not None
        }


def stage_layers(tensors: Tensors) -> list[int]:
    """Global indices of the decoder layers present in `tensors`, ascending."""
    return sorted({int(m.group(1)) for name in tensors if (m := _LAYER.match(name))})


def build_model(
    hp: HParams,
    tensors: Mapping[str, torch.Tensor],
    *,
    comm: Comm | None = None,
    expert_layout: dict | None = None,
    ep_rank: int = 0,
    where: str = "checkpoint",
) -> CausalLM:
    """Build a stage on the meta device, then adopt `tensors` as its parameters (no copy).

    `expert_layout` is the manifest's `layout.experts` (None: every expert on this rank).
    `where` names the source of the tensors in error messages."""
    comm = comm or Comm()
    tensors = {n: t for n, t in tensors.items() if not is_mtp_name(hp, n)}  # --keep-mtp
    _check_stage_roles(tensors, comm, where)
    layers = (expert_layout or {}).get("layers", {})
    emaps = {
        i: build_expert_map(hp.num_experts, layers.get(str(i)), ep_rank)
        for i in stage_layers(tensors)
    }
    try:
        model = CausalLM(hp, tensors, comm, emaps)
    except KeyError as e:
        raise CheckpointError(
            f"{where}: tensor {e.args[0]} is missing; {hp.architecture} needs it. "
            "Re-download or re-convert the checkpoint."
        ) from None
    _assign(model, tensors, where)
    return model.eval()


def _check_stage_roles(tensors: Tensors, comm: Comm, where: str) -> None:
    """Embedding on the first stage, final norm + lm_head on the last (docs/conventions.md)."""
    first, last = comm.pp_stage == 0, comm.pp_stage == comm.pp - 1
    roles = {
        "model.embed_tokens.weight": first,
        "model.norm.weight": last,
        "lm_head.weight": last,
    }
    for name, needed in roles.items():
        if (name in tensors) != needed:
            state = "missing" if needed else "unexpected"
            raise CheckpointError(
                f"{where}: {name} is {state} on pipeline stage {comm.pp_stage} of {comm.pp} "
                "(the embedding belongs to stage 0, the final norm and lm_head to the last; "
                "tied embeddings still need lm_head.weight written there). Re-convert."
            )


def _assign(model: CausalLM, tensors: Tensors, where: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match {model.hp.architecture}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Check that the "
            "checkpoint and its config.json belong together."
        )
    for name, param in model.state_dict().items():
        if tuple(param.shape) != tuple(tensors[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the module "
                f"built from its neighbours expects {tuple(param.shape)}."
            )
    model.load_state_dict(dict(tensors), strict=True, assign=True)
