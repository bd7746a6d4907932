"""q/k RMSNorm over all heads of a projection at once (MiniMax-M2's q_norm / k_norm,
[heads x head_dim] wide), not per head. A TP rank holds its heads' slice of the weight; the
mean of squares is averaged over the TP group (every rank holds equally many heads, a
replicated kv head counted as often as it is replicated), as vLLM's
MiniMaxText01RMSNormTP does, so each rank normalises by the whole projection's statistic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.hparams import HParams
from .dist import Comm
from .layers import Attention, Tensors


class SpanRMSNorm(nn.Module):
    """x [..., h, hd] normalised over h*hd (and over the TP group), in fp32, then scaled by
    the weight in the input dtype, as transformers' MiniMaxM2RMSNorm."""

    def __init__(self, dim: int, eps: float, comm: Comm) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.eps, self.comm = eps, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(*shape[:-2], -1).float()  # [B, S, h*hd]
        mean_square = x.pow(2).mean(-1, keepdim=True)
        mean_square = self.comm.all_reduce(mean_square) / self.comm.tp  # over the TP group
        x = x * torch.rsqrt(mean_square + self.eps)
        return (self.weight * x.to(dtype)).reshape(shape)


class SpanNormAttention(Attention):
    """`Attention` whose q_norm / k_norm span this rank's heads (see SpanRMSNorm)."""

    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__(hp, layer, tensors, prefix, comm)
        self.q_norm = SpanRMSNorm(self.heads * hp.head_dim, hp.rms_norm_eps, comm)
        self.k_norm = SpanRMSNorm(self.kv_heads * hp.head_dim, hp.rms_norm_eps, comm)
