"""Attention and MLP over projections stored fused (Phi-3): `qkv_proj` holds this rank's
[q_r; k_r; v_r] rows and `gate_up_proj` its [gate_r; up_r] rows, as reshard's plan writes
them (and vLLM / TensorRT-LLM load them). One matmul each; the local output is split by the
local sizes, read from the tensors, so the same module runs a TP shard or the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models.hparams import HParams
from .dist import Comm
from .layers import MLP, Attention, Tensors, get_activation, linear_like


class FusedAttention(Attention):
    """Local q heads = o_proj columns // head_dim; the rest of qkv_proj's rows are k then v,
    equally many (kv heads replicated on this rank count once)."""

    def __init__(self, hp: HParams, layer: int, tensors: Tensors, prefix: str, comm: Comm):
        nn.Module.__init__(self)
        self.qkv_proj = linear_like(tensors, f"{prefix}qkv_proj")
        self.o_proj = linear_like(tensors, f"{prefix}o_proj")
        q_rows = self.o_proj.in_features
        kv_rows, odd = divmod(self.qkv_proj.out_features - q_rows, 2)
        if odd or kv_rows <= 0 or q_rows % hp.head_dim or kv_rows % hp.head_dim:
            raise CheckpointError(
                f"tensor {prefix}qkv_proj.weight has {self.qkv_proj.out_features} rows, which "
                f"is not o_proj's {q_rows} q rows plus two equal k and v parts of whole "
                f"{hp.head_dim}-wide heads. Re-convert the checkpoint."
            )
        self.layer, self.head_dim, self.comm = layer, hp.head_dim, comm
        self.set_scores(hp)
        self.parts = (q_rows, kv_rows, kv_rows)
        self.heads, self.kv_heads = q_rows // hp.head_dim, kv_rows // hp.head_dim
        self.sliding = hp.layer_types[layer] == "sliding_attention" and bool(hp.sliding_window)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(x).split(self.parts, dim=-1)  # [B, S, h*hd], 2 x [B, S, kvh*hd]
        return q, k, v


class FusedMLP(MLP):
    """down(act(gate) * up) with [gate_r; up_r] = gate_up_proj(x), halves of equal width."""

    def __init__(self, hp: HParams, tensors: Tensors, prefix: str, comm: Comm):
        nn.Module.__init__(self)
        self.gate_up_proj = linear_like(tensors, f"{prefix}gate_up_proj")
        self.down_proj = linear_like(tensors, f"{prefix}down_proj")
        if self.gate_up_proj.out_features != 2 * self.down_proj.in_features:
            raise CheckpointError(
                f"tensor {prefix}gate_up_proj.weight has {self.gate_up_proj.out_features} rows, "
                f"not twice down_proj's {self.down_proj.in_features} columns ([gate; up]). "
                "Re-convert the checkpoint."
            )
        self.act, self.comm = get_activation(hp), comm

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [N, I_l] each
        return F.linear(self.act(gate) * up, self.down_proj.weight)  # [N, H] partial sums
