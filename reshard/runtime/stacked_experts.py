"""Experts stacked in 3-D tensors stored [E, in, out] with per-expert biases (gpt-oss):
`gate_up_proj` [E_local, H, 2*I_l] whose columns interleave gate and up (gate_i at 2i, up_i
at 2i + 1, so this rank's slice holds whole pairs), `gate_up_proj_bias` [E_local, 2*I_l],
`down_proj` [E_local, I_l, H], `down_proj_bias` [E_local, H], and the clamped SwiGLU
transformers' GptOssExperts computes. Under expert TP each rank returns a partial sum; the
down bias is added by expert-tp rank 0 only, so the all-reduce adds it once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.hparams import HParams
from .dist import Comm
from .layers import Tensors

PARTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved columns: gate_i at 2i, up_i at 2i + 1."""
    return gate_up[..., ::2], gate_up[..., 1::2]


class StackedExpertWeights(nn.Module):
    def __init__(self, hp: HParams, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__()
        for part in PARTS:
            meta = torch.empty_like(tensors[f"{prefix}{part}"], device="meta")
            setattr(self, part, nn.Parameter(meta))
        etp = hp.moe_intermediate_size // self.down_proj.shape[1]  # ranks sharing an expert
        self.adds_bias = comm.tp_rank % etp == 0
        self.limit, self.alpha = hp.swiglu_limit, hp.swiglu_alpha

    def forward_slot(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, H] -> this rank's share of expert `slot`'s output [n, H]."""
        gate_up = x @ self.gate_up_proj[slot] + self.gate_up_proj_bias[slot]  # [n, 2*I_l]
        hidden = self.activate(*split_gate_up(gate_up))  # [n, I_l]
        out = hidden @ self.down_proj[slot]  # [n, H]
        return out + self.down_proj_bias[slot] if self.adds_bias else out

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(up + 1) * gate * sigmoid(alpha * gate), gate clamped above and up both sides at
        the limit (transformers' GptOssExperts._apply_gate)."""
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
