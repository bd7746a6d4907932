"""Mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) over this rank's
expert slots. The router is softmax top-k, or DeepSeek's grouped sigmoid top-k when
hparams.router_scoring is "sigmoid".

Every TP rank sees all tokens and runs the (replicated) router. For each (token, expert)
choice exactly one replica computes it: `replica = token_index % logcnt[e]`, token_index being
the row in this step's flattened [B*S] batch (the same on every rank); the rank holding
that replica's slot computes its etp slice of the expert. Partial outputs (plus the shared
expert's) are summed by the same TP all-reduce as a dense MLP. Expert weights may be named
per expert (`experts.{e}.w1` / `experts.{e}.gate_proj`) or fused 3-D (`experts.gate_up_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import family_of
from ..models.hparams import HParams
from .dist import Comm
from .layers import MLP, Tensors, get_activation, linear_like


@dataclass(frozen=True)
class ExpertMap:
    """Which logical experts this rank holds, and which replica of each it computes."""

    local_experts: tuple[int, ...]  # logical expert id per local slot, in slot order
    local_slot: torch.Tensor  # [E, max_replicas] local slot index of replica j of e, or -1
    logcnt: torch.Tensor  # [E] replica count per logical expert

    def to(self, device: torch.device) -> ExpertMap:
        return replace(self, local_slot=self.local_slot.to(device), logcnt=self.logcnt.to(device))


def build_expert_map(num_experts: int, entry: dict[str, Any] | None, ep_rank: int) -> ExpertMap:
    """From a manifest `layout.experts.layers[<layer>]` entry (None: every expert, once)."""
    if entry is None:
        slots = torch.arange(num_experts)[:, None]
        return ExpertMap(
            tuple(range(num_experts)), slots, torch.ones(num_experts, dtype=torch.long)
        )
    per_rank = int(entry["slots_per_rank"])
    first = ep_rank * per_rank
    mine = [int(e) for e in entry["phy2log"][first : first + per_rank] if int(e) >= 0]
    logcnt = torch.tensor([int(c) for c in entry["logcnt"]], dtype=torch.long)
    local_slot = torch.full((num_experts, int(logcnt.max())), -1, dtype=torch.long)
    for expert, physical in enumerate(entry["log2phy"]):
        for replica, slot in enumerate(physical[: int(logcnt[expert])]):
            if first <= int(slot) < first + per_rank:
                local_slot[expert, replica] = mine.index(int(entry["phy2log"][int(slot)]))
    return ExpertMap(tuple(mine), local_slot, logcnt)


class PerExpertWeights(nn.ModuleDict):
    """experts.{e}.{gate,up,down} linears, keyed by logical expert id."""

    def __init__(self, tensors: Tensors, prefix: str, experts: tuple[int, ...], names: tuple):
        super().__init__()
        self.names = names
        for e in experts:
            module = nn.Module()
            for name in names:
                setattr(module, name, linear_like(tensors, f"{prefix}{e}.{name}"))
            self[str(e)] = module

    def gate_up(self, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module = self[str(expert)]
        return getattr(module, self.names[0])(x), getattr(module, self.names[1])(x)

    def down(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        return getattr(self[str(expert)], self.names[2])(h)


class FusedExpertWeights(nn.Module):
    """gate_up_proj [E_local, 2*I_l, H] (gate rows, then up rows); down_proj [E_local, H, I_l]."""

    def __init__(self, tensors: Tensors, prefix: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty_like(tensors[f"{prefix}gate_up_proj"], device="meta")
        )
        self.down_proj = nn.Parameter(
            torch.empty_like(tensors[f"{prefix}down_proj"], device="meta")
        )

    def gate_up(self, slot: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = F.linear(x, self.gate_up_proj[slot]).chunk(2, dim=-1)
        return gate, up

    def down(self, slot: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.down_proj[slot])


class MoEBlock(nn.Module):
    """Router + local experts (+ Qwen2-MoE's gated shared expert), one TP all-reduce."""

    def __init__(self, hp: HParams, tensors: Tensors, prefix: str, emap: ExpertMap, comm: Comm):
        super().__init__()
        self.gate = linear_like(tensors, f"{prefix}gate")
        self.fused = f"{prefix}experts.gate_up_proj" in tensors
        if self.fused:
            self.experts = FusedExpertWeights(tensors, f"{prefix}experts.")
        else:
            names = family_of(hp).features.expert_names  # (gate, up, down) per expert
            self.experts = PerExpertWeights(tensors, f"{prefix}experts.", emap.local_experts, names)
        if f"{prefix}shared_expert_gate.weight" in tensors:
            self.shared_expert = MLP(hp, tensors, f"{prefix}shared_expert.", comm)
            self.shared_expert_gate = linear_like(tensors, f"{prefix}shared_expert_gate")
        if f"{prefix}shared_experts.gate_proj.weight" in tensors:  # DeepSeek: ungated
            self.shared_experts = MLP(hp, tensors, f"{prefix}shared_experts.", comm)
        if hp.router_scoring == "sigmoid":  # the selection bias, where the family keeps it
            self.bias_name = family_of(hp).features.correction_bias
            owner, _, leaf = self.bias_name.rpartition(".")
            bias = torch.empty_like(tensors[prefix + self.bias_name], device="meta")
            setattr(self.get_submodule(owner), leaf, nn.Parameter(bias))
        self.top_k, self.comm, self.act = hp.num_experts_per_tok, comm, get_activation(hp)
        self.hp = hp
        self.renormalise = hp.norm_topk_prob  # Mixtral's config parse forces it on
        self.keep_fp32_weights = family_of(hp).features.router_fp32_weights
        self.emap = emap
        self.expert_load: torch.Tensor | None = None  # set to zeros([E]) to record routing

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, hidden = x.shape  # x: [B, S, H]
        flat = x.reshape(-1, hidden)  # [N, H]
        weights, experts = self.route(flat)  # [N, k] each
        out = self.routed_partial(flat, weights, experts)  # [N, H]
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert.forward_partial(flat)
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * shared
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts.forward_partial(flat)
        self.record_load(experts, token_valid)
        return self.comm.all_reduce(out).view(batch, seq, hidden)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax (fp32) -> top-k -> optional renormalisation. Returns weights, expert ids."""
        if self.hp.router_scoring == "sigmoid":
            return self.route_grouped(flat)
        logits = self.gate(flat)  # [N, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.keep_fp32_weights else weights.to(logits.dtype)), experts

    def route_grouped(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3 (transformers' DeepseekV3TopkRouter): fp32 sigmoid scores; selection on
        scores + e_score_correction_bias, only inside the topk_group groups whose two best
        biased scores sum highest; weights are the unbiased scores, optionally renormalised,
        times routed_scaling_factor. Returns fp32 weights [N, k], expert ids [N, k]."""
        hp = self.hp
        scores = F.linear(flat.float(), self.gate.weight.float()).sigmoid()  # [N, E]
        biased = scores + self.get_parameter(self.bias_name).float()
        grouped = biased.view(-1, hp.n_group, hp.num_experts // hp.n_group)  # [N, G, E/G]
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
        keep = torch.topk(group_scores, k=hp.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()  # [N, G]
        expert_mask = group_mask[..., None].expand_as(grouped).reshape(-1, hp.num_experts)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
        experts = torch.topk(biased, k=self.top_k, dim=-1, sorted=False)[1]  # [N, k]
        weights = scores.gather(1, experts)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * hp.routed_scaling_factor, experts

    def routed_partial(
        self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Sum over the (token, expert) choices this rank computes; [N, H]."""
        out = torch.zeros_like(flat)
        token_index = torch.arange(flat.shape[0], device=flat.device)[:, None]  # [N, 1]
        if self.emap.logcnt.device != flat.device:
            self.emap = self.emap.to(flat.device)
        replica = token_index % self.emap.logcnt[experts]  # [N, k]
        slots = self.emap.local_slot[experts, replica]  # [N, k], -1: another rank computes it
        for slot in self._slots_in_expert_order(slots):
            tokens, choice = torch.where(slots == slot)
            y = self._expert(slot, flat[tokens]) * weights[tokens, choice, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _slots_in_expert_order(self, slots: torch.Tensor) -> list[int]:
        hit = set(torch.unique(slots[slots >= 0]).tolist())
        order = sorted(range(len(self.emap.local_experts)), key=self.emap.local_experts.__getitem__)
        return [s for s in order if s in hit]

    def _expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        key = slot if self.fused else self.emap.local_experts[slot]
        gate, up = self.experts.gate_up(key, x)  # [n, I_l] each
        return self.experts.down(key, self.act(gate) * up)  # [n, H], partial over etp

    def record_load(self, experts: torch.Tensor, token_valid: torch.Tensor | None) -> None:
        """Count tokens routed per logical expert (padding excluded) when recording is on."""
        if self.expert_load is None:
            return
        chosen = experts if token_valid is None else experts[token_valid.reshape(-1)]
        self.expert_load += torch.bincount(chosen.reshape(-1), minlength=self.expert_load.numel())
