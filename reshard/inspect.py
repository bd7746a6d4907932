"""`reshard inspect`: what is in a checkpoint, from its config and headers alone."""

from __future__ import annotations

from typing import Any

from .dtypes import dtype_name
from .io.source import Source
from .quant import describe
from .units import format_bytes


def inspect_source(source: Source) -> dict[str, Any]:
    hp = source.hparams
    by_dtype: dict[str, int] = {}
    params = 0
    for _, info in source.tensors.values():
        name = dtype_name(info.dtype)
        by_dtype[name] = by_dtype.get(name, 0) + info.nbytes
        params += info.numel
    return {
        "model": source.model,
        "path": str(source.path),
        "revision": source.revision,
        "architecture": hp.architecture,
        "family": hp.family,
        "parameters": params,
        "bytes": sum(by_dtype.values()),
        "bytes_by_dtype": by_dtype,
        "files": len(source.headers),
        "tensors": len(source.tensors),
        "layers": hp.num_layers,
        "hidden_size": hp.hidden_size,
        "heads": hp.num_heads,
        "kv_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "intermediate_size": hp.intermediate_size,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "experts": hp.num_experts,
        "experts_per_token": hp.num_experts_per_tok,
        "moe_layers": len(hp.moe_layers),
        "quantization": describe(scheme) if (scheme := hp.quantization) else None,
    }


def format_inspect(info: dict[str, Any]) -> str:
    dtypes = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(info["bytes_by_dtype"].items()))
    lines = [
        f"model         {info['model']}" + (f" @ {info['revision']}" if info["revision"] else ""),
        f"architecture  {info['architecture']} ({info['family']})",
        f"parameters    {info['parameters']:,} ({format_bytes(info['bytes'])}: {dtypes})",
        f"files         {info['files']} safetensors, {info['tensors']} tensors",
        f"layers        {info['layers']}   hidden {info['hidden_size']}   "
        f"intermediate {info['intermediate_size']}",
        f"heads         {info['heads']} query, {info['kv_heads']} kv, head_dim {info['head_dim']}",
        f"vocab         {info['vocab_size']}"
        + ("   (tied embeddings)" if info["tie_word_embeddings"] else ""),
    ]
    if info["experts"]:
        lines.append(
            f"experts       {info['experts']} routed, top-{info['experts_per_token']}, "
            f"on {info['moe_layers']} MoE layers"
        )
    if info["quantization"]:  # `parameters` above counts stored elements (packed int4: 8 a value)
        lines.append(f"quantized     {info['quantization']}")
    return "\n".join(lines)
