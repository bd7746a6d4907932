"""Multi-head latent attention (DeepSeek-V2/V3) over this rank's heads, in transformers'
DeepseekV3Attention math and names. q (optionally low-rank) and the latent kv are projected,
the rope part (qk_rope_head_dim, one key shared by all heads) is rotated, and kv_b expands
the normalised latent into per-head k_nope and v.

The cache holds the expanded keys and values per local head ([B, h, T, qk_head_dim] and
[B, h, T, v_head_dim]), not the latent that transformers and vLLM cache: simplest, and the
same values, since kv_b acts on each position alone. `reshard plan` reports vLLM's latent form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.hparams import HParams
from .cache import KVCache, Step
from .dist import Comm
from .layers import RMSNorm, Tensors, linear_like, row_parallel
from .rope import apply_rope

LATENT_NORM_EPS = 1e-6  # transformers builds q_a/kv_a_layernorm without rms_norm_eps


def softmax_scale(hp: HParams) -> float:
    """qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)^2 under a scaled rope."""
    scale = hp.qk_head_dim**-0.5
    scaling = hp.rope_scaling or {}
    factor, all_dim = float(scaling.get("factor", 1.0)), scaling.get("mscale_all_dim")
    if all_dim and factor > 1:
        mscale = 0.1 * float(all_dim) * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rope over interleaved pairs (x0, x1), (x2, x3)...; the result is laid out
    as rotated evens then rotated odds, as transformers' apply_rotary_pos_emb_interleave.
    x: [B, h, S, r]; cos/sin: [B, S, r] (cat(freqs, freqs))."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


class MLAttention(nn.Module):
    """Local heads = q_b_proj (or q_proj) rows // qk_head_dim."""

    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__()
        if f"{prefix}q_a_proj.weight" in tensors:
            self.q_a_proj = linear_like(tensors, f"{prefix}q_a_proj")
            self.q_a_layernorm = RMSNorm(hp.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = linear_like(tensors, f"{prefix}q_b_proj")
        else:
            self.q_proj = linear_like(tensors, f"{prefix}q_proj")
        self.kv_a_proj_with_mqa = linear_like(tensors, f"{prefix}kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(hp.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = linear_like(tensors, f"{prefix}kv_b_proj")
        self.o_proj = linear_like(tensors, f"{prefix}o_proj")
        self.layer, self.comm, self.hp = layer, comm, hp
        self.heads = self.kv_b_proj.out_features // (hp.qk_nope_head_dim + hp.v_head_dim)
        self.scale = softmax_scale(hp)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: [B, S, H]
        q_nope, q_rot = self._query(x)  # [B, h, S, nope], [B, h, S, r]
        k_nope, k_rot, v = self._key_value(x)  # [B, h, S, nope], [B, 1, S, r], [B, h, S, v]
        rotate = apply_rope_interleaved if self.hp.rope_interleave else apply_rope
        q_rot, k_rot = rotate(q_rot, *rope), rotate(k_rot, *rope)
        q = torch.cat((q_nope, q_rot), dim=-1)  # [B, h, S, qk]
        k = torch.cat((k_nope, k_rot.expand(-1, self.heads, -1, -1)), dim=-1)
        k, v = cache.update(self.layer, k, v, step.start)  # [B, h, T, qk], [B, h, T, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.hp.v_head_dim)
        return row_parallel(self.o_proj, out, self.comm)  # [B, S, H]

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(*x.shape[:2], self.heads, self.hp.qk_head_dim).transpose(1, 2)
        return q.split([self.hp.qk_nope_head_dim, self.hp.head_dim], dim=-1)

    def _key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, seq, _ = x.shape
        latent, k_rot = self.kv_a_proj_with_mqa(x).split(
            [self.hp.kv_lora_rank, self.hp.head_dim], -1
        )
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [B, S, h * (nope + v)]
        kv = kv.view(batch, seq, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.hp.qk_nope_head_dim, self.hp.v_head_dim], dim=-1)
        return k_nope, k_rot.view(batch, 1, seq, self.hp.head_dim), v
