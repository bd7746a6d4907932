"""Gated DeltaNet linear attention (Qwen3-Next's `linear_attn`) over this rank's key heads,
computed as transformers' torch path computes it: a causal depthwise conv over [q; k; v]
channels, then the gated delta rule (chunked over a prompt, one step at a time in decode),
a gated RMSNorm per value head and a row-parallel out_proj.

Unlike attention there is no per-token cache: each layer keeps, per sequence, the last
kernel-1 conv inputs and a [value heads, k, v] recurrent state (`KVCache.states`), carried
from step to step. Local sizes come from the tensors, so one module runs a shard or the whole
model. Padding (left, in a batch of prompts) is zeroed first, as transformers does: a zero
input leaves both states at zero, so a padded row computes what the prompt computes alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models.hparams import HParams
from .cache import KVCache, Step
from .dist import Comm
from .layers import Tensors, get_activation, linear_like, row_parallel

CHUNK = 64  # transformers' chunk size for the prompt
# The input projections: grouped per key head (Qwen3-Next) or apart (Qwen3.5).
INPUTS = {
    True: ("in_proj_qkvz", "in_proj_ba"),
    False: ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
}


class GatedRMSNorm(nn.Module):
    """RMSNorm of each value head's output (fp32 statistics), scaled by the weight in the
    input dtype, then times silu(z) in fp32: transformers' Qwen3NextRMSNormGated."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = self.weight * x.to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """in_proj_qkvz / in_proj_ba rows come grouped per key head ([q; k; v; z] and [b; a] of
    each group), or in_proj_qkv [q; k; v], in_proj_z, _b, _a apart; conv1d channels are
    [q; k; v] of this rank's heads."""

    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        super().__init__()
        self.grouped = f"{prefix}in_proj_qkvz.weight" in tensors  # else Qwen3.5's apart
        for name in INPUTS[self.grouped]:
            setattr(self, name, linear_like(tensors, prefix + name))
        conv = tensors[f"{prefix}conv1d.weight"].shape  # [C_l, 1, K]
        self.conv1d = nn.Conv1d(
            conv[0], conv[0], conv[2], groups=conv[0], bias=False, device="meta"
        )
        heads = tensors[f"{prefix}A_log"].shape
        self.A_log = nn.Parameter(torch.empty(heads, device="meta"))
        self.dt_bias = nn.Parameter(torch.empty(heads, device="meta"))
        self.norm = GatedRMSNorm(hp.linear_value_head_dim, hp.rms_norm_eps)
        self.out_proj = linear_like(tensors, f"{prefix}out_proj")
        self.layer, self.comm, self.act = layer, comm, get_activation(hp)
        self.per_key, self.hk, self.hv = (
            hp.linear_values_per_key,
            hp.linear_key_head_dim,
            hp.linear_value_head_dim,
        )
        self.key_heads = heads[0] // self.per_key  # A_log: one per value head
        self.value_heads = self.key_heads * self.per_key
        self._check(prefix, conv[0])

    def _check(self, prefix: str, channels: int) -> None:
        nk, nv, hk, hv = self.key_heads, self.value_heads, self.hk, self.hv
        rows = {name: getattr(self, name).out_features for name in INPUTS[self.grouped]}
        wanted = {"in_proj_qkvz": 2 * nk * hk + 2 * nv * hv, "in_proj_ba": 2 * nv,
                  "in_proj_qkv": 2 * nk * hk + nv * hv, "in_proj_z": nv * hv,
                  "in_proj_b": nv, "in_proj_a": nv}  # fmt: skip
        expected = {f"{name}.weight rows": (got, wanted[name]) for name, got in rows.items()}
        expected |= {
            "conv1d.weight channels": (channels, 2 * nk * hk + nv * hv),
            "out_proj.weight columns": (self.out_proj.in_features, nv * hv),
        }
        for what, (got, want) in expected.items():
            if got != want:
                raise CheckpointError(
                    f"tensor {prefix}{what.split()[0]}: {what.split()[1]} {got}, but "
                    f"A_log's {nv} value heads ({nk} key heads of {self.per_key} each) need "
                    f"{want}. Re-convert the checkpoint."
                )

    def forward(self, x: torch.Tensor, rope: object, step: Step, cache: KVCache) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: [B, S, H]; rope unused (no positions in a recurrence)
        x = x * step.token_valid[..., None].to(x.dtype)  # padding: zero in, zero state
        q, k, v, z, b, a = self.project(x)
        conv_state, recurrent = cache.states.get(self.layer, (None, None))
        mixed, conv_state = conv_step(torch.cat([q, k, v], dim=-1), conv_state, self.conv1d.weight)
        q, k, v = self.act(mixed).split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        beta = b.sigmoid()  # [B, S, nv]
        decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # log space
        # No decay over padding: the state is zero there either way, and the chunked form's
        # exp(cumulative decay) would otherwise underflow for the real tokens after it.
        decay = decay * step.token_valid[..., None]
        q = q.reshape(batch, seq, self.key_heads, self.hk)
        k = k.reshape(batch, seq, self.key_heads, self.hk)
        v = v.reshape(batch, seq, self.value_heads, self.hv)
        rule = recurrent_delta_rule if recurrent is not None and seq == 1 else chunk_delta_rule
        out, recurrent = rule(q, k, v, decay, beta, recurrent)  # [B, S, nv, hv]
        cache.states[self.layer] = (conv_state, recurrent)
        out = self.norm(out, z.reshape(batch, seq, self.value_heads, self.hv))
        return row_parallel(self.out_proj, out.reshape(batch, seq, -1), self.comm)  # [B, S, H]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, S, H] -> q, k [B, S, nk*hk], v, z [B, S, nv*hv], b, a [B, S, nv]: the
        grouped rows of each key head regrouped by kind (or read apart, Qwen3.5)."""
        if not self.grouped:
            keys = self.key_heads * self.hk
            q, k, v = self.in_proj_qkv(x).split([keys, keys, self.value_heads * self.hv], -1)
            return q, k, v, self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        batch, seq, _ = x.shape
        r, hk, hv = self.per_key, self.hk, self.hv
        qkvz = self.in_proj_qkvz(x).view(batch, seq, self.key_heads, -1)  # [B, S, nk, group]
        q, k, v, z = qkvz.split([hk, hk, r * hv, r * hv], dim=-1)
        b, a = self.in_proj_ba(x).view(batch, seq, self.key_heads, 2 * r).split([r, r], dim=-1)
        flat = (t.reshape(batch, seq, -1) for t in (q, k, v, z, b, a))
        return tuple(flat)


def conv_step(
    x: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv of x [B, S, C] continuing from the last kernel-1 inputs `state`
    [B, C, K-1] (None: zeros). Returns the conv output [B, S, C] (no activation) and the new
    state."""
    width = weight.shape[-1] - 1
    x = x.transpose(1, 2)  # [B, C, S]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], width)
    full = torch.cat([state, x.to(state.dtype)], dim=-1)  # [B, C, K-1+S]
    out = F.conv1d(full.to(weight.dtype), weight, groups=x.shape[1])  # [B, C, S]
    return out.to(x.dtype).transpose(1, 2), full[..., -width:]


def _prepare(q, k, v, decay, beta):
    """Heads first, fp32, q/k L2-normalised (eps 1e-6; the caller scales q by k_dim**-0.5);
    each key head's q and k repeated over its value heads. -> q, k [B, nv, S, hk],
    v [B, nv, S, hv], decay, beta [B, nv, S]."""
    repeat = v.shape[2] // k.shape[2]
    q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
    q, k, v, beta, decay = (t.transpose(1, 2).float().contiguous() for t in (q, k, v, beta, decay))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q, k, v, decay, beta


def recurrent_delta_rule(q, k, v, decay, beta, state):
    """One token at a time: S <- S * exp(g); S <- S + k (beta (v - S^T k))^T; out = S^T q.
    state [B, nv, hk, hv] fp32 (None: zeros). Returns out [B, S, nv, hv] in v's dtype, state."""
    dtype = v.dtype
    q, k, v, decay, beta = _prepare(q, k, v, decay, beta)
    q = q / q.shape[-1] ** 0.5
    if state is None:
        state = v.new_zeros(v.shape[0], v.shape[1], k.shape[-1], v.shape[-1])
    out = torch.zeros_like(v)
    for t in range(v.shape[2]):
        state = state * decay[:, :, t].exp()[..., None, None]
        remembered = (state * k[:, :, t, :, None]).sum(dim=-2)  # [B, nv, hv]
        delta = (v[:, :, t] - remembered) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), state


def chunk_delta_rule(q, k, v, decay, beta, state):
    """The same recurrence in chunks of 64 tokens (transformers' torch_chunk_gated_delta_rule,
    the WY/UT form): within a chunk by triangular solves, across chunks by the state."""
    dtype, seq = v.dtype, v.shape[1]
    q, k, v, decay, beta = _prepare(q, k, v, decay, beta)
    q = q * q.shape[-1] ** -0.5
    pad = (CHUNK - seq % CHUNK) % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, decay = F.pad(beta, (0, pad)), F.pad(decay, (0, pad))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (
        t.reshape(*t.shape[:2], -1, CHUNK, t.shape[-1]) for t in (q, k, k_beta, v_beta)
    )
    decay = decay.reshape(*decay.shape[:2], -1, CHUNK).cumsum(dim=-1)  # [B, nv, n, C]
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    local = (q @ k.transpose(-1, -2)) * pairwise
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(
        system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True
    )
    if state is None:
        state = v.new_zeros(v.shape[0], v.shape[1], k.shape[-1], v.shape[-1])
    out = torch.zeros_like(values)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]
    for i in range(values.shape[2]):
        new = values[:, :, i] - k_decayed[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + local[:, :, i] @ new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ new
    out = out.reshape(*out.shape[:2], -1, out.shape[-1])[:, :, :seq]
    return out.transpose(1, 2).contiguous().to(dtype), state
