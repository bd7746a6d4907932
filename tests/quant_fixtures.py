"""Quantized tiny checkpoints for the tests, from random transformers models, each with its
dequantized fp32 twin (the same transformers model holding the dequantized weights), which is
the reference the runtime's generation must match token for token.

The quantizer is written here from the formats' definitions (DeepSeek-V3 block FP8,
compressed-tensors FP8, AutoAWQ GEMM packing, AutoGPTQ v1 packing), independently of
reshard/runtime/dequant.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from checkpoints import config_for
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: column 8j + AWQ_ORDER[i] -> nibble i
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# DeepSeek-V3's MLA projections, FP8 in its checkpoint too (the router gate is not).
MLA_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")

SCHEMES = {
    "fp8_block": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    },
    "fp8_tensor": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                  "dynamic": False},
        }},
        "ignore": ["lm_head"],
    },
    "fp8_channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                  "dynamic": True},
        }},
        "ignore": ["lm_head"],
    },
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
            "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False,
             "sym": False, "checkpoint_format": "gptq"},
    "gptq_act": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                 "sym": False, "checkpoint_format": "gptq"},
}  # fmt: skip

# Small enough for quick worlds; kv heads 1 < tp 2 so k/v (and their scales) are replicated.
TINY = dict(num_hidden_layers=4, num_key_value_heads=1, initializer_range=0.5)


def is_quantized(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and leaf[-2] in LINEARS + MLA_LINEARS


def quantize_fp8_block(w: torch.Tensor, bn: int, bk: int):
    out, inn = w.shape
    rows, cols = -(-out // bn), -(-inn // bk)
    scale = torch.empty(rows, cols)
    q = torch.empty(out, inn, dtype=torch.float8_e4m3fn)
    twin = torch.empty(out, inn)
    for i in range(rows):
        for j in range(cols):
            block = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            s = block.abs().max() / FP8_MAX
            qb = (block / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = qb
            twin[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = qb.float() * s
    return {"weight": q, "weight_scale_inv": scale}, twin


def quantize_fp8_scaled(w: torch.Tensor, per_channel: bool):
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max().reshape(1)
    scale = (amax / FP8_MAX).float()
    q = (w / (scale if per_channel else scale[0])).to(torch.float8_e4m3fn)
    twin = q.float() * (scale if per_channel else scale[0])
    return {"weight": q, "weight_scale": scale}, twin


def _int4_groups(w_in_out: torch.Tensor, groups: torch.Tensor, n_groups: int, zmin: int):
    """Asymmetric 4-bit per (group, out column): w [in, out], groups [in] -> q, z, s (fp16)."""
    inn, out = w_in_out.shape
    scales = torch.empty(n_groups, out, dtype=torch.float16)
    zeros = torch.empty(n_groups, out, dtype=torch.int32)
    q = torch.empty(inn, out, dtype=torch.int32)
    for g in range(n_groups):
        rows = groups == g
        part = w_in_out[rows]
        lo, hi = part.min(0).values, part.max(0).values
        s = ((hi - lo) / 15).clamp(min=1e-4).half()
        z = torch.round(-lo / s.float()).clamp(zmin, 15).int()
        q[rows] = (torch.round(part / s.float()) + z).clamp(0, 15).int()
        scales[g], zeros[g] = s, z
    twin = (q - zeros[groups]).float() * scales.float()[groups]  # [in, out]
    return q, zeros, scales, twin


def pack_along_last(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[..., 8n] of 0..15 -> int32 [..., n]: value at 8j + order[i] into nibble i."""
    v = values.reshape(*values.shape[:-1], -1, 8).to(torch.int64)
    packed = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, col in enumerate(order):
        packed |= v[..., col] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def quantize_awq(w: torch.Tensor, group: int):
    inn = w.shape[1]
    groups = torch.arange(inn) // group
    q, z, s, twin = _int4_groups(w.T.contiguous(), groups, inn // group, 0)
    parts = {
        "qweight": pack_along_last(q, AWQ_ORDER),
        "qzeros": pack_along_last(z, AWQ_ORDER),
        "scales": s,
    }
    return parts, twin.T.contiguous()


def quantize_gptq(w: torch.Tensor, group: int, desc_act: bool, seed: int):
    inn = w.shape[1]
    if desc_act:  # act-order: groups follow a permutation of the input rows
        perm = torch.randperm(inn, generator=torch.Generator().manual_seed(seed))
        groups = torch.empty(inn, dtype=torch.long)
        groups[perm] = torch.arange(inn) // group
    else:
        groups = torch.arange(inn) // group
    # v1 stores zero - 1, so zeros start at 1 (0 would wrap to 15 + 1 = 16 when read back).
    q, z, s, twin = _int4_groups(w.T.contiguous(), groups, inn // group, 1)
    parts = {
        "qweight": pack_along_last(q.T.contiguous()).T.contiguous(),  # [in/8, out]
        "qzeros": pack_along_last(z - 1),
        "scales": s,
        "g_idx": groups.int(),
    }
    return parts, twin.T.contiguous()


def quantize(name: str, w: torch.Tensor, scheme: str, seed: int, block=None):
    """{stored leaf: tensor}, fp32 twin of one [out, in] weight."""
    w = w.float()
    if scheme == "fp8_block":
        bn, bk = block or SCHEMES[scheme]["weight_block_size"]
        return quantize_fp8_block(w, bn, bk)
    if scheme in ("fp8_tensor", "fp8_channel"):
        parts, twin = quantize_fp8_scaled(w, scheme == "fp8_channel")
        if scheme == "fp8_tensor":  # static activation scale: stored, unused by fp32 compute
            parts["input_scale"] = torch.tensor([0.05])
        return parts, twin
    if scheme == "awq":
        return quantize_awq(w, SCHEMES[scheme]["group_size"])
    return quantize_gptq(w, SCHEMES[scheme]["group_size"], scheme == "gptq_act", seed)


def write_quantized(
    path: Path,
    scheme: str,
    arch: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    block: tuple[int, int] | None = None,
    **overrides,
):
    """A quantized checkpoint in 3 files (one weight's scale alone in the last) + its twin:
    returns (path, transformers model holding the dequantized fp32 weights). `block`
    overrides fp8_block's weight_block_size [bn, bk]."""
    import transformers

    torch.manual_seed(seed)
    config = config_for(arch, **{**TINY, **overrides})
    twin = getattr(transformers, arch)(config).eval()
    _randomize_selection_bias(twin)
    state = twin.state_dict()
    quantization = dict(SCHEMES[scheme])
    if block:
        quantization["weight_block_size"] = list(block)
    stored: dict[str, torch.Tensor] = {}
    for i, (name, tensor) in enumerate(state.items()):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = _quantize_experts(name, tensor, scheme, seed + i, stored, block)
            continue
        if not is_quantized(name):
            stored[name] = tensor.contiguous()
            continue
        parts, dequantized = quantize(name, tensor, scheme, seed + i, block)
        module = name.rpartition(".")[0]
        stored.update({f"{module}.{leaf}": t.contiguous() for leaf, t in parts.items()})
        state[name] = dequantized
    twin.load_state_dict(state)
    _save_files(Path(path), stored, config, quantization)
    return Path(path), twin


@torch.no_grad()
def _randomize_selection_bias(model) -> None:
    """transformers zeroes DeepSeek's selection bias: make it matter (as write_checkpoint)."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.5)


def _quantize_experts(
    name: str, fused: torch.Tensor, scheme: str, seed: int, stored: dict, block=None
):
    """transformers 5 holds experts fused ([E, 2I, H] gate then up rows; [E, H, I]); on disk
    they are per expert, as save_pretrained writes them. Returns the dequantized fused twin."""
    prefix = name.rpartition(".")[0]  # model.layers.L.mlp.experts
    twin = torch.empty_like(fused)
    half = fused.shape[1] // 2
    for e in range(fused.shape[0]):
        if name.endswith("gate_up_proj"):
            pieces = (("gate_proj", slice(0, half)), ("up_proj", slice(half, 2 * half)))
        else:
            pieces = (("down_proj", slice(None)),)
        for leaf, rows in pieces:
            parts, dequantized = quantize(leaf, fused[e, rows], scheme, seed + e, block)
            stored.update({f"{prefix}.{e}.{leaf}.{k}": t.contiguous() for k, t in parts.items()})
            twin[e, rows] = dequantized
    return twin


def _save_files(path: Path, stored: dict, config, quantization: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    names = list(stored)
    # A weight's scale (or zeros) in a file of its own, away from its weight.
    loner = next(n for n in names if n.startswith("model.layers.1.") and _is_scale(n))
    rest = [n for n in names if n != loner]
    half = len(rest) // 2
    files = {
        "model-00001-of-00003.safetensors": rest[:half],
        "model-00002-of-00003.safetensors": rest[half:],
        "model-00003-of-00003.safetensors": [loner],
    }
    weight_map = {}
    for fname, members in files.items():
        save_file({n: stored[n] for n in members}, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in members})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    doc = config.to_dict()
    doc["quantization_config"] = quantization
    doc["torch_dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(doc, indent=1))


def _is_scale(name: str) -> bool:
    return name.endswith(("weight_scale_inv", "weight_scale", ".scales"))
