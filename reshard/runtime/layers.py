"""Dense building blocks in HF's layouts and names: RMSNorm, attention, gated MLP, the
vocab-parallel embedding and LM head. Local (per-rank) sizes are read from the tensors each
module is built for, so one module runs a TP shard or the full model; the collectives are
explicit calls on the communicator inside `forward`. Modules are built on the meta device and
receive their weights through `load_state_dict(assign=True)` (see model.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..models import family_of
from ..models.hparams import HParams
from .cache import KVCache, Step
from .dist import Comm
from .rope import apply_rope

Tensors = Mapping[str, torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(hp: HParams) -> Callable[[torch.Tensor], torch.Tensor]:
    if hp.hidden_act not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{hp.architecture}: hidden_act '{hp.hidden_act}' is not supported by the runtime "
            f"(supported: {', '.join(sorted(_ACTIVATIONS))})."
        )
    return _ACTIVATIONS[hp.hidden_act]


def linear_like(tensors: Tensors, name: str) -> nn.Linear:
    """A meta nn.Linear shaped like tensors[name.weight] (bias if name.bias exists)."""
    out_features, in_features = tensors[f"{name}.weight"].shape
    return nn.Linear(in_features, out_features, bias=f"{name}.bias" in tensors, device="meta")


def row_parallel(linear: nn.Linear, x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """x @ W.T summed over the TP group, then the (whole) bias added once."""
    out = comm.all_reduce(F.linear(x, linear.weight))  # [..., H]: partial sums before the reduce
    return out if linear.bias is None else out + linear.bias


class RMSNorm(nn.Module):
    """HF RMSNorm: normalise in fp32, cast back, then scale by the weight. With `adds_one`
    (Gemma) the scale is (1 + weight), applied in fp32 before the cast."""

    def __init__(
        self, dim: int, eps: float, *, adds_one: bool = False, scale_fp32: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.eps, self.adds_one, self.scale_fp32 = eps, adds_one, scale_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.adds_one:
            return (x * (1.0 + self.weight.float())).to(dtype)
        if self.scale_fp32:  # gpt-oss
            return (self.weight.float() * x).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(hp: HParams, dim: int) -> RMSNorm:
    """The family's RMSNorm over `dim` with config.json's rms_norm_eps."""
    features = family_of(hp).features
    return RMSNorm(
        dim, hp.rms_norm_eps, adds_one=features.norm_adds_one, scale_fp32=features.norm_scale_fp32
    )


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), as transformers' Gemma computes it (None: x unchanged)."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    """GQA self-attention over this rank's heads (local heads = q_proj rows // head_dim)."""

    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, proj, linear_like(tensors, f"{prefix}{proj}"))
        if f"{prefix}q_norm.weight" in tensors:  # Qwen3, Gemma-3: per-head RMSNorm on q and k
            self.q_norm = make_norm(hp, hp.head_dim)
            self.k_norm = make_norm(hp, hp.head_dim)
        if family_of(hp).features.attention_sinks:  # gpt-oss: [local heads]
            self.sinks = nn.Parameter(torch.empty_like(tensors[f"{prefix}sinks"], device="meta"))
        self.layer, self.head_dim, self.comm = layer, hp.head_dim, comm
        self.set_scores(hp)
        self.heads = self.q_proj.out_features // hp.head_dim
        self.kv_heads = self.k_proj.out_features // hp.head_dim
        self.sliding = hp.layer_types[layer] == "sliding_attention" and bool(hp.sliding_window)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: [B, S, H]
        q, k, v = self.project_qkv(x)
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, S, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(self.layer, k, v, step.start)  # [B, kvh, T, hd]
        out = self._attend(q, k, v, step.sliding_mask if self.sliding else step.mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return row_parallel(self.o_proj, out, self.comm)  # [B, S, H]

    def set_scores(self, hp: HParams) -> None:
        """Scores scale by query_pre_attn_scalar**-0.5 (Gemma) or head_dim**-0.5, then a tanh
        soft-cap when attn_logit_softcapping is set."""
        self.scale = (hp.query_pre_attn_scalar or hp.head_dim) ** -0.5
        self.softcap = hp.attn_logit_softcapping

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, S, H] -> this rank's q [B, S, h*hd], k and v [B, S, kvh*hd]."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q: [B, h, S, hd], k/v: [B, kvh, T, hd], mask: [B, 1, S, T] -> [B, h, S, hd]."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if self.softcap is not None:
            return self._attend_capped(q, k, v, mask)
        if hasattr(self, "sinks"):
            return self._attend_sinks(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _attend_capped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Gemma-2's eager attention: scores capped by tanh before the mask, softmax in fp32."""
        scores = soft_cap(q @ k.transpose(2, 3) * self.scale, self.softcap)  # [B, h, S, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v

    def _attend_sinks(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """gpt-oss's eager attention: each head's sink logit joins the softmax as one more
        column (max subtracted first), then is dropped, so rows may sum to less than 1."""
        scores = (q @ k.transpose(2, 3) * self.scale).masked_fill(~mask, float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)  # [B, h, S, 1]
        logits = torch.cat([scores, sinks.to(scores.dtype)], dim=-1)  # [B, h, S, T + 1]
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        return probs.to(v.dtype) @ v


class MLP(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)), column/row parallel over TP."""

    def __init__(self, hp: HParams, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, proj, linear_like(tensors, f"{prefix}{proj}"))
        self.act, self.comm = get_activation(hp), comm

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (no reduce, no down bias): [N, H]."""
        return F.linear(self.act(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        out = self.comm.all_reduce(self.forward_partial(x))  # [B, S, H]
        return out if self.down_proj.bias is None else out + self.down_proj.bias


class VocabEmbedding(nn.Module):
    """Rows [tp_rank*Vl, (tp_rank+1)*Vl) of the (padded) vocab; other ids give zeros, summed."""

    def __init__(self, weight_shape: torch.Size, comm: Comm, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape, device="meta"))
        self.comm, self.scale = comm, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids)  # [B, S, H]
        if self.scale is None:
            return out
        # Gemma: the factor is an fp32 tensor cast to the hidden dtype first, as transformers'.
        return out * torch.tensor(self.scale, dtype=torch.float32).to(out.dtype)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.tp == 1:
            return F.embedding(ids, self.weight)  # [B, S, H]
        rows = self.weight.shape[0]
        local = ids - self.comm.tp_rank * rows  # [B, S]
        inside = (local >= 0) & (local < rows)
        out = F.embedding(local.clamp(0, rows - 1), self.weight)  # [B, S, H]
        out = out.masked_fill(~inside[..., None], 0)
        return self.comm.all_reduce(out)


class LMHead(nn.Module):
    """Vocab-column-parallel head: local logits, all-gathered, vocab padding stripped."""

    def __init__(
        self, weight_shape: torch.Size, vocab_size: int, comm: Comm, softcap: float | None = None
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape, device="meta"))
        self.vocab_size, self.comm, self.softcap = vocab_size, comm, softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [B, S, Vp/tp]
        logits = self.comm.all_gather_last(logits)  # [B, S, Vp]
        return soft_cap(logits[..., : self.vocab_size], self.softcap)  # [B, S, V]
