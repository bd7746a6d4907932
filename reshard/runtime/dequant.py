"""Dequantize a rank's (or the source's) quantized weights as they load, for verification
only: FP8 x its scale (per tensor, per channel, or block by block), int4 AWQ / GPTQ unpacked
with its zeros and scales, into fp32 `<module>.weight` tensors the dense runtime uses.
Convert never calls this; the shards keep the quantized bytes.
"""

from __future__ import annotations

import torch

from ..quant import QuantScheme, split_name
from .dequant_formats import DEQUANTIZE

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 at bits 4i..4i+3
# AWQ packs out columns 8j + [0, 2, 4, 6, 1, 3, 5, 7] into nibbles 0..7 of int32 j; this is
# the inverse: nibble index of column 8j + k.
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def dequantize_tensors(
    tensors: dict[str, torch.Tensor], scheme: QuantScheme | None, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Replace every quantized weight's parts with its fp32 weight, then cast to `dtype`
    (None: leave the float tensors as they are)."""
    if scheme is None:
        return tensors
    names = set(tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        logical, part = split_name(name, names)
        if part:
            parts.setdefault(logical, {})[part] = tensor
        else:
            out[name] = tensor
    for logical, stored in parts.items():
        out[logical] = dequantize_weight(scheme, stored)
    return out if dtype is None else {n: t.to(dtype) for n, t in out.items()}


def dequantize_weight(scheme: QuantScheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One weight's stored parts -> fp32 [out, in] (mxfp4 experts: [E, in, out])."""
    if scheme.kind in DEQUANTIZE:  # compressed-tensors int, NVFP4: runtime/dequant_formats.py
        return DEQUANTIZE[scheme.kind](scheme, parts)
    if scheme.kind == "fp8_block":
        return _fp8_block(parts["weight"], parts["scale_inv"], scheme.block)
    if scheme.kind in ("fp8_tensor", "fp8_channel"):
        scale = parts["weight_scale"].float()  # [] / [1] per tensor, [out, 1] per channel
        return (
            parts["weight"].float() * scale.reshape(-1, 1)
            if scale.numel() > 1
            else (parts["weight"].float() * scale.reshape(()))
        )
    if scheme.kind == "awq":
        return _awq(parts, scheme.group_size)
    if scheme.kind == "mxfp4":
        return _mxfp4(parts["mx_blocks"], parts["mx_scales"])
    return _gptq(parts, scheme.group_size, scheme.desc_act)


def _fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    out, inn = weight.shape
    bn, bk = block
    scale = scale_inv.float().repeat_interleave(bn, 0)[:out].repeat_interleave(bk, 1)[:, :inn]
    return weight.float() * scale  # [out, in]


# fp4 e2m1 code -> value (bit 3 the sign), as transformers' integrations/mxfp4.FP4_VALUES.
_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [E, out, G, 16], scales uint8 [E, out, G] -> fp32 [E, in = 32 G, out]:
    low nibble first, each block times 2**(scale - 127), as the float checkpoint stores it."""
    lut = torch.tensor(_FP4, device=blocks.device)
    values = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), dim=-1)
    values = values.flatten(-2)  # [E, out, G, 32]
    exponents = scales.to(torch.int32) - 127
    weight = torch.ldexp(values, exponents[..., None].float())  # [E, out, G, 32]
    return weight.flatten(-2).transpose(1, 2).contiguous()  # [E, in, out]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> [..., n, 8] values 0..15, nibble i at index i."""
    return (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 15


def _awq(parts: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    order = torch.tensor(_AWQ_NIBBLE)
    q = unpack_int4(parts["qweight"])[..., order].flatten(-2)  # [in, out]
    zeros = unpack_int4(parts["qzeros"])[..., order].flatten(-2)  # [in/g, out]
    rows = torch.arange(q.shape[0], device=q.device) // group
    weight = (q - zeros[rows]).float() * parts["scales"].float()[rows]  # [in, out]
    return weight.T.contiguous()


def _gptq(parts: dict[str, torch.Tensor], group: int, desc_act: bool) -> torch.Tensor:
    packed = parts["qweight"]  # [in/8, out], input rows 8j + i in nibble i
    q = unpack_int4(packed.T).flatten(-2).T  # [in, out]
    zeros = unpack_int4(parts["qzeros"]).flatten(-2) + 1  # [groups, out]; v1 stores z - 1
    if desc_act:  # scales/qzeros are whole on every rank: g_idx names global groups
        rows = parts["g_idx"].long()
    else:  # scales/qzeros were cut with the rows: local groups
        rows = torch.arange(q.shape[0], device=q.device) // group
    weight = (q - zeros[rows]).float() * parts["scales"].float()[rows]  # [in, out]
    return weight.T.contiguous()
