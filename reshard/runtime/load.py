"""Build runtime models from files: a Hugging Face checkpoint folder (the world-size-1
reference) or one rank's shards of a reshard output folder (via its manifest). Tensors are
read one by one with safetensors' safe_open straight onto the target device and adopted as
parameters; the model is never materialised twice. No planning, no verification of hashes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..dtypes import CAST_DTYPES, torch_dtypes
from ..errors import CheckpointError, OutputError
from ..io.manifest_value import Manifest
from ..models.hparams import HParams, load_hparams
from ..models.rules import is_mtp_name, rules_for
from ..strict_json import read_json
from .dequant import dequantize_tensors
from .dist import Comm
from .model import CausalLM, build_model

_DTYPES = {name: torch_dtypes()[code] for name, code in CAST_DTYPES.items()}  # --dtype names


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / torch.bfloat16 / None ('keep') -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "keep":
        return None if dtype == "keep" else dtype
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype '{dtype}' is not one of {', '.join(_DTYPES)} or 'keep'.")
    return _DTYPES[dtype]


def load_source_model(
    source_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> CausalLM:
    """The whole model at world size 1 from an HF folder (config.json + safetensors)."""
    source_dir = Path(source_dir)
    hp = load_hparams(source_dir)
    scheme = hp.quantization
    tensors: dict[str, torch.Tensor] = {}
    read_dtype = None if scheme else resolve_dtype(dtype)  # quantized: cast after dequantizing
    for file, names in _source_files(source_dir).items():
        tensors.update(read_tensors(source_dir / file, names, read_dtype, device))
    for name in derived_names(hp, tensors):
        del tensors[name]
    tensors = dequantize_tensors(tensors, scheme, resolve_dtype(dtype))
    tie_lm_head(hp, tensors)
    return build_model(hp, tensors, where=str(source_dir))


def derived_names(hp: HParams, names) -> set[str]:
    """Source tensors the family's spec marks derivable from config.json (old exports'
    rotary_emb.inv_freq) or skips (DeepSeek's MTP layer): convert does not write them, and the
    reference does not load them."""
    drops = [rule.regex for rule in rules_for(hp) if rule.role == "drop"]
    return {n for n in names if any(rx.match(n) for rx in drops) or is_mtp_name(hp, n)}


def _source_files(source_dir: Path) -> dict[str, list[str] | None]:
    """{file name: tensor names (None = all)} from the index or the single file."""
    index = source_dir / "model.safetensors.index.json"
    if index.exists():
        doc = read_json(index, what="the index", fix="Re-download the index.")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object. Re-download the index.")
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)  # type: ignore[union-attr]
        return files
    if (source_dir / "model.safetensors").exists():
        return {"model.safetensors": None}
    raise CheckpointError(
        f"{source_dir}: no model.safetensors or model.safetensors.index.json. The runtime "
        "reads safetensors checkpoints only; download the safetensors weights."
    )


def read_tensors(
    path: Path,
    names: list[str] | None,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    """Read `names` (None: all) from one safetensors file, cast, onto `device`."""
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing; re-download or re-convert it.")
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in names if names is not None else list(f.keys()):
            if name not in f.keys():
                raise CheckpointError(f"{path}: tensor {name} is listed but not in the file.")
            tensor = f.get_tensor(name)
            out[name] = tensor if dtype is None else tensor.to(dtype)
    return out


def tie_lm_head(hp: HParams, tensors: dict[str, torch.Tensor]) -> None:
    """Tied embeddings with no lm_head tensor: the head shares embed_tokens' weight."""
    if hp.tie_word_embeddings and "lm_head.weight" not in tensors:
        if "model.embed_tokens.weight" in tensors and "model.norm.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]


def load_rank(
    out_dir: str | Path,
    manifest: Manifest,
    rank: int,
    *,
    comm: Comm | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> CausalLM:
    """Rank `rank`'s stage, reading only its files (those of `replica_of` for DP replicas).
    dtype: cast each tensor as it is read (None: as stored)."""
    entry = rank_entry(manifest, rank)
    source = entry if entry.get("replica_of") is None else rank_entry(manifest, entry["replica_of"])
    hp = manifest.hparams
    stored = None if hp.quantization else resolve_dtype(dtype)  # packed ints stay as stored
    tensors = _read_rank_tensors(Path(out_dir), source, device, stored)
    scheme = hp.quantization
    tensors = dequantize_tensors(tensors, scheme, torch.float32 if scheme else None)
    tie_lm_head(hp, tensors)
    return build_model(
        hp,
        tensors,
        comm=comm,
        expert_layout=manifest.layout.experts,
        ep_rank=int(entry.get("ep_rank", 0)),
        where=f"{out_dir} rank {rank}",
    )


def rank_entry(manifest: Manifest, rank: int) -> dict[str, Any]:
    for entry in manifest.ranks:
        if int(entry["rank"]) == rank:
            return entry
    raise OutputError(f"manifest.json has no entry for rank {rank}; re-run `reshard convert`.")


def _read_rank_tensors(
    out_dir: Path, entry: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for name, info in entry["tensors"].items():
        by_file.setdefault(info["file"], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if not (out_dir / file).exists():
            raise OutputError(
                f"{out_dir / file}: missing (rank {entry['rank']}). Re-run `reshard convert`."
            )
        tensors.update(read_tensors(out_dir / file, names, dtype, device))
    for name, info in entry["tensors"].items():
        if list(tensors[name].shape) != list(info["shape"]):
            raise OutputError(
                f"{out_dir / info['file']}: tensor {name} (rank {entry['rank']}) has shape "
                f"{list(tensors[name].shape)}, manifest.json says {info['shape']}. "
                "Re-run `reshard convert` into an empty folder."
            )
    return native_tensors(entry, tensors)


def native_tensors(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    """An output format's tensors as the native ones the runtime builds from: each stacked
    tensor's parts cut back out, a transposed one turned back (views, no copy), a format's
    constants left out unless they stand for a native tensor (a bias zeroed on this rank)."""
    out = {}
    for name, tensor in tensors.items():
        meta = entry["tensors"][name]
        if "fill" in meta and not meta.get("parts"):
            continue
        if meta.get("transposed"):
            tensor = tensor.transpose(-1, -2)
        for part in meta.get("parts") or [{"name": name, "shape": meta["shape"], "at": None}]:
            out[part["name"]] = _cut(tensor, part["shape"], part["at"])
    return out


def _cut(tensor: torch.Tensor, shape: list[int], at: list[int] | None) -> torch.Tensor:
    if at is None:
        return tensor
    lift = len(at) - len(shape)
    index = tuple(at[:lift]) + tuple(slice(a, a + n) for a, n in zip(at[lift:], shape))
    return tensor[index]
