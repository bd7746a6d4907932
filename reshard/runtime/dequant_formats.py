"""Dequantize the storage forms of quant/compressed.py and quant/nvfp4.py, for verification
only: compressed-tensors int4/int8 (packed or not, with optional zero points) and NVFP4
(ModelOpt and compressed-tensors), each weight's parts -> fp32 [out, in] on this rank.

A rank's `weight_shape` names the whole weight; the local [out, in] comes from the packed
tensor itself (every split keeps whole words, so its width is exact).
"""

from __future__ import annotations

import torch

from ..quant import compressed, nvfp4

# e2m1 code (low 3 bits) -> magnitude; bit 3 is the sign.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def unpack_ints(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, words] -> [rows, words * 32/bits] signed values: value i of a word at bits
    i*bits, stored with an offset of 2^(bits-1) (compressed-tensors' pack_to_int32)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, 32/bits]
    return values.flatten(-2) - (1 << (bits - 1))


def _expand(scale: torch.Tensor, out: int, inn: int, group: int, g_idx=None) -> torch.Tensor:
    """A per-group [out, in/g], per-channel [out, 1] or per-tensor [1] scale -> [out, in].
    `g_idx` [in] (act-order): each local column's global group; the scale is whole."""
    scale = scale.float().reshape(out, -1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    if g_idx is not None:
        return scale[:, g_idx.long()]
    if scale.shape[1] > 1:
        scale = scale.repeat_interleave(group, 1)[:, :inn]
    return scale.expand(out, inn)


def _ints(scheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if scheme.kind == compressed.PACKED:
        q = unpack_ints(parts["weight_packed"], scheme.bits)  # [out, in]
    else:
        q = parts["weight"].to(torch.int32)
    out, inn = q.shape
    g, g_idx = scheme.group_size, parts.get("weight_g_idx")
    weight = q.float()
    if scheme.zero_point:
        zp = parts["weight_zero_point"]
        if scheme.kind == compressed.PACKED:  # packed along out: [ceil(out/p), groups]
            zp = unpack_ints(zp.T.contiguous(), scheme.bits).T[:out]
        weight = weight - _expand(zp, out, inn, g, g_idx)
    return weight * _expand(parts["weight_scale"], out, inn, g, g_idx)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> fp32 [out, in]: value 2i in the low nibble, 2i+1 in the high."""
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()  # [out, in]
    magnitude = E2M1.to(packed.device)[codes & 7]
    return torch.where(codes & 8 != 0, -magnitude, magnitude)


def _nvfp4(scheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    packed, global_leaf, _ = nvfp4.LEAVES[scheme.kind]
    values = unpack_fp4(parts[packed])
    out, inn = values.shape
    scale = _expand(parts["weight_scale"], out, inn, nvfp4.BLOCK)
    global_scale = parts[global_leaf].float().reshape(())
    if scheme.kind == nvfp4.MODELOPT:  # weight_scale_2 multiplies
        return values * (scale * global_scale)
    return values * (scale / global_scale)  # compressed-tensors' global scale divides


DEQUANTIZE = {
    compressed.PACKED: _ints,
    compressed.INT8: _ints,
    nvfp4.MODELOPT: _nvfp4,
    nvfp4.COMPRESSED: _nvfp4,
}
