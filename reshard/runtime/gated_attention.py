"""Softmax attention with an output gate (Qwen3-Next's full-attention layers): q_proj holds
[q_h; gate_h] (2 x head_dim rows) per head, and the attention output of each head is
multiplied by sigmoid(gate_h) before o_proj. The rest is `Attention`'s: q/k norms, rope, the
KV cache, GQA. Local heads = q_proj rows // (2 x head_dim).
"""

from __future__ import annotations

import torch

from ..models.hparams import HParams
from .cache import KVCache, Step
from .dist import Comm
from .layers import Attention, Tensors, row_parallel
from .rope import apply_rope


class GatedAttention(Attention):
    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__(hp, layer, tensors, prefix, comm)
        self.heads = self.q_proj.out_features // (2 * hp.head_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: [B, S, H]
        q, gate = self.q_proj(x).view(batch, seq, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, S, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(self.layer, k, v, step.start)  # [B, kvh, T, hd]
        out = self._attend(q, k, v, step.sliding_mask if self.sliding else step.mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        out = apply_output_gate(out, gate.reshape(batch, seq, -1))
        return row_parallel(self.o_proj, out, self.comm)  # [B, S, H]


def apply_output_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out, gate: [B, S, h*hd] -> out * sigmoid(gate), head by head."""
    return out * torch.sigmoid(gate)
