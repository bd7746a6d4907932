"""compressed-tensors int and NVFP4 tiny checkpoints for the tests, from random transformers
models, each with its dequantized fp32 twin (the reference the runtime must match).

The packing is written here from the formats' definitions, independently of reshard:
compressed-tensors `pack_to_int32` (value i of an int32 at bits i*bits, offset 2^(bits-1);
zero points packed along dim 0), `int-quantized` int8, NVFP4 e2m1 codes two a byte (even
index in the low nibble) with an fp8-e4m3 scale per 16 values and an fp32 global scale
(compressed-tensors divides by `weight_global_scale`, ModelOpt multiplies by
`weight_scale_2`). Each scheme leaves some linears unquantized through its ignore list.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from checkpoints import config_for
from quant_fixtures import TINY, _randomize_selection_bias, _save_files

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX, FP4_MAX = 448.0, 6.0
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Layer 1's MLP (and lm_head) stay unquantized in every fixture: a mixed checkpoint.
CT_IGNORE = ["lm_head", r"re:.*layers\.1\.mlp\.(gate|up|down)_proj$"]


def _ct(weights: dict, fmt: str, acts: dict | None = None) -> dict:
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": weights, "input_activations": acts,
            "output_activations": None,
        }},
        "ignore": CT_IGNORE, "kv_cache_scheme": None,
    }  # fmt: skip


def _int(bits: int, strategy: str, group: int | None = None, symmetric: bool = True) -> dict:
    return {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
        "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax",
    }  # fmt: skip


NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
              "group_size": 16, "dynamic": False}  # fmt: skip
SCHEMES = {
    "w4a16": _ct(_int(4, "group", 16), "pack-quantized"),
    "w4a16_zp": _ct(_int(4, "group", 16, symmetric=False), "pack-quantized"),
    "w8a16_channel": _ct(_int(8, "channel"), "pack-quantized"),
    "w4a16_tensor": _ct(_int(4, "tensor"), "pack-quantized"),
    "w4a16_actorder": _ct({**_int(4, "group", 16), "actorder": "group"}, "pack-quantized"),
    "w8a8": _ct(
        _int(8, "channel"), "int-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    ),
    "w8a8_zp": _ct(
        _int(8, "channel", symmetric=False), "int-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    ),
    "nvfp4_ct": _ct(NVFP4_ARGS, "nvfp4-pack-quantized", {**NVFP4_ARGS, "dynamic": "local"}),
    "nvfp4_modelopt": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
        "exclude_modules": ["lm_head", "model.layers.1.mlp*"],
        "producer": {"name": "modelopt", "version": "0.29.0"},
    },
}  # fmt: skip


def ignored(scheme: str, module: str) -> bool:
    if scheme == "nvfp4_modelopt":
        return module == "lm_head" or module.startswith("model.layers.1.mlp")
    return module == "lm_head" or re.match(CT_IGNORE[1][3:], module) is not None


# --- compressed-tensors int ---------------------------------------------------------------


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values [rows, n] -> int32 [rows, ceil(n*bits/32)]: value i of a word at bits
    i*bits, stored as value + 2^(bits-1) (compressed-tensors' pack_to_int32, dim 1)."""
    per = 32 // bits
    rows, n = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))).reshape(rows, -1)
    u = torch.nn.functional.pad(u, (0, -n % per)).reshape(rows, -1, per)
    words = torch.zeros(u.shape[:2], dtype=torch.int64)
    for i in range(per):
        words |= u[..., i] << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _group_view(w: torch.Tensor, strategy: str, group: int) -> torch.Tensor:
    """[out, in] -> [out, units, per unit] for per-group / per-channel / per-tensor stats."""
    if strategy == "group":
        return w.reshape(w.shape[0], -1, group)
    return w.reshape(w.shape[0], 1, -1) if strategy == "channel" else w.reshape(1, 1, -1)


def quantize_actorder(w: torch.Tensor, args: dict, seed: int):
    """GPTQ act-order groups: input column c belongs to group g_idx[c], a permutation of
    contiguous groups; the scale of column c is weight_scale[:, g_idx[c]]."""
    bits, g = args["num_bits"], args["group_size"]
    out, inn = w.shape
    perm = torch.randperm(inn, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(inn, dtype=torch.long)
    g_idx[perm] = torch.arange(inn) // g
    amax = torch.stack([w[:, g_idx == i].abs().amax(1) for i in range(inn // g)], 1)
    scale = (amax / ((1 << bits) / 2)).clamp(min=1e-4).to(torch.bfloat16)  # [out, in/g]
    s = scale.float()[:, g_idx]  # [out, in]
    q = torch.round(w / s).clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    parts = {"weight_packed": pack_int32(q.to(torch.int8), bits), "weight_scale": scale,
             "weight_shape": torch.tensor([out, inn]), "weight_g_idx": g_idx.int()}  # fmt: skip
    return parts, q * s


def quantize_int(w: torch.Tensor, args: dict, packed: bool):
    bits, strategy, group = args["num_bits"], args["strategy"], args["group_size"]
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    view = _group_view(w, strategy, group)
    if args["symmetric"]:
        scale = (view.abs().amax(-1) / ((qmax - qmin) / 2)).clamp(min=1e-4)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = view.amin(-1).clamp(max=0), view.amax(-1).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-4)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    scale = scale.to(torch.bfloat16)  # scales in the model's 16-bit dtype, as llm-compressor
    s = scale.float().unsqueeze(-1)
    q = (torch.round(view / s) + zp.unsqueeze(-1)).clamp(qmin, qmax)
    twin = ((q - zp.unsqueeze(-1)) * s).reshape(w.shape)
    q = q.reshape(w.shape).to(torch.int8)
    scale = scale.reshape(-1) if strategy == "tensor" else scale
    if packed:
        parts = {"weight_packed": pack_int32(q, bits), "weight_scale": scale,
                 "weight_shape": torch.tensor(list(w.shape))}  # fmt: skip
    else:
        parts = {"weight": q, "weight_scale": scale}
    if not args["symmetric"]:
        zp = zp.to(torch.int8)
        parts["weight_zero_point"] = pack_int32(zp.T, bits).T.contiguous() if packed else zp
    return parts, twin


# --- NVFP4 --------------------------------------------------------------------------------


def to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value (ties to the lower code), as a 4-bit code: sign << 3 | index."""
    index = (x.abs().clamp(max=FP4_MAX).unsqueeze(-1) - FP4_GRID).abs().argmin(-1)
    return (x < 0).to(torch.int64) << 3 | index


def quantize_nvfp4(w: torch.Tensor, modelopt: bool):
    out, inn = w.shape
    blocks = w.reshape(out, inn // 16, 16)
    amax = w.abs().max()
    global_scale = torch.tensor(FP8_MAX * FP4_MAX / float(amax), dtype=torch.float32)
    local = blocks.abs().amax(-1) / FP4_MAX  # [out, in/16]
    if modelopt:  # weight_scale_2 = amax / (448 * 6): the per-block scale is local / it
        second = (1 / global_scale).reshape(())
        scale = (local / second).to(torch.float8_e4m3fn)
        effective = scale.float() * second
    else:
        second = global_scale.reshape(1)
        scale = (local * global_scale).to(torch.float8_e4m3fn)
        effective = scale.float() / global_scale
    safe = torch.where(effective > 0, effective, torch.ones_like(effective)).unsqueeze(-1)
    codes = to_fp4_codes(blocks / safe).reshape(out, inn)
    values = FP4_GRID[codes & 7] * torch.where(codes & 8 != 0, -1.0, 1.0)
    twin = (values.reshape(out, -1, 16) * effective.unsqueeze(-1)).reshape(out, inn)
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)
    if modelopt:
        parts = {"weight": packed, "weight_scale": scale, "weight_scale_2": second,
                 "input_scale": torch.tensor(0.02)}  # fmt: skip
    else:
        parts = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": second,
                 "input_global_scale": torch.tensor([50.0])}  # fmt: skip
    return parts, twin


def quantize(scheme: str, w: torch.Tensor, seed: int = 0):
    """{stored leaf: tensor}, fp32 twin of one [out, in] weight."""
    w = w.float()
    if scheme.startswith("nvfp4"):
        return quantize_nvfp4(w, scheme == "nvfp4_modelopt")
    group = SCHEMES[scheme]["config_groups"]["group_0"]["weights"]
    if group["actorder"] == "group":
        return quantize_actorder(w, group, seed)
    return quantize_int(w, group, SCHEMES[scheme]["format"] == "pack-quantized")


def write_quantized_ct(path: Path, scheme: str, arch: str = "LlamaForCausalLM", *, seed=0, **kw):
    """A quantized checkpoint in 3 files + its twin (transformers model holding the
    dequantized fp32 weights; ignored linears keep their fp32 weights)."""
    import transformers

    torch.manual_seed(seed)
    config = config_for(arch, **{**TINY, **kw})
    twin = getattr(transformers, arch)(config).eval()
    _randomize_selection_bias(twin)
    state = twin.state_dict()
    stored: dict[str, torch.Tensor] = {}
    for i, (name, tensor) in enumerate(state.items()):
        module, _, leaf = name.rpartition(".")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = _quantize_experts(scheme, name, tensor, stored)
        elif (
            leaf == "weight"
            and module.rsplit(".", 1)[-1] in LINEARS
            and not ignored(scheme, module)
        ):
            parts, state[name] = quantize(scheme, tensor, seed + i)
            stored.update({f"{module}.{k}": t.contiguous() for k, t in parts.items()})
        else:
            stored[name] = tensor.contiguous()
    twin.load_state_dict(state)
    _save_files(Path(path), stored, config, SCHEMES[scheme])
    return Path(path), twin


def _quantize_experts(scheme: str, name: str, fused: torch.Tensor, stored: dict):
    """transformers 5 fuses experts ([E, 2I, H] gate then up; [E, H, I]); the checkpoint holds
    them per expert, as save_pretrained writes them. Returns the dequantized fused twin."""
    prefix = name.rpartition(".")[0]  # model.layers.L.mlp.experts
    twin = torch.empty_like(fused)
    half = fused.shape[1] // 2
    for e in range(fused.shape[0]):
        if name.endswith("gate_up_proj"):
            pieces = (("gate_proj", slice(0, half)), ("up_proj", slice(half, 2 * half)))
        else:
            pieces = (("down_proj", slice(None)),)
        for leaf, rows in pieces:
            if ignored(scheme, f"{prefix}.{e}.{leaf}"):
                stored[f"{prefix}.{e}.{leaf}.weight"] = fused[e, rows].contiguous()
                twin[e, rows] = fused[e, rows]
                continue
            parts, twin[e, rows] = quantize(scheme, fused[e, rows])
            stored.update({f"{prefix}.{e}.{leaf}.{k}": t.contiguous() for k, t in parts.items()})
    return twin
