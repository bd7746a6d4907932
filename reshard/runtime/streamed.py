"""A reference that never holds the whole model: the unsharded source run one piece at a time
(embedding, each decoder layer, final norm + head) over teacher-forced sequences.

Greedy decoding is a chain of argmax decisions, so the sharded tokens equal the reference's
greedy tokens exactly when, at every step, the reference's argmax given the *sharded* prefix
is the sharded token. One forward pass over prompt + sharded tokens therefore checks all N
steps at once, with peak memory of one layer (or the head) instead of the model: a 70B
checkpoint is verified on one 80 GB GPU. Rows after a first divergence answer "what would
the reference pick after the sharded prefix", which is what the comparison reports.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.hparams import HParams, load_hparams
from ..progress import progress_bar
from ..quant import unpacked_numel
from .cache import KVCache, pad_left
from .dequant import dequantize_tensors
from .dist import Comm
from .generate import PromptResult
from .load import _source_files, derived_names
from .model import build_model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def tensor_files(source_dir: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> the safetensors file that holds it."""
    where: dict[str, Path] = {}
    for file, names in _source_files(Path(source_dir)).items():
        path = Path(source_dir) / file
        if names is None:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        where.update((name, path) for name in names)
    for name in derived_names(load_hparams(source_dir), where):
        del where[name]
    return where


def piece_groups(hp: HParams, names: list[str]) -> list[tuple[Comm, list[str]]]:
    """(stage coordinates, tensor names) for the embedding, each layer, and the head: each
    piece is built as a stage of a 3-stage pipeline so the runtime's checks still apply."""
    by_layer: dict[int, list[str]] = {}
    for name in names:
        if m := _LAYER.match(name):
            by_layer.setdefault(int(m.group(1)), []).append(name)
    head = ["model.norm.weight", "lm_head.weight" if "lm_head.weight" in names else None]
    groups = [(Comm(pp=3, pp_stage=0), ["model.embed_tokens.weight"])]
    groups += [(Comm(pp=3, pp_stage=1), by_layer[i]) for i in range(hp.num_layers)]
    groups.append((Comm(pp=3, pp_stage=2), [n for n in head if n]))
    return groups


@torch.inference_mode()
def reference_streamed(
    source_dir: str | Path,
    sharded: list[PromptResult],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[PromptResult]:
    """Reference results for the sharded ones, teacher-forced on their tokens. Weights are
    cast to `dtype` tensor by tensor as they load; one piece is held at a time."""
    source_dir = Path(source_dir)
    hp = load_hparams(source_dir)
    files = tensor_files(source_dir)
    sequences = [r.prompt + r.tokens[:-1] for r in sharded]
    ids, valid = pad_left(sequences, device)  # [B, S]
    cache = KVCache(len(sequences), ids.shape[1], device)
    step = cache.begin_step(valid, hp.sliding_window)
    x = ids
    groups = piece_groups(hp, list(files))
    bar = progress_bar(len(groups), desc="reference (streamed)", unit="piece", enabled=progress)
    scheme = hp.quantization
    for comm, names in groups:
        tensors = _read(files, names, None if scheme else dtype, device)
        tensors = dequantize_tensors(tensors, scheme, dtype)
        if comm.pp_stage == 2 and "lm_head.weight" not in tensors:  # tied embeddings
            tensors["lm_head.weight"] = _read(files, ["model.embed_tokens.weight"], dtype, device)[
                "model.embed_tokens.weight"
            ]
        piece = build_model(hp, tensors, comm=comm, where=str(source_dir))
        x = piece(x, step, cache, last_only=False)  # hidden [B, S, H], then logits [B, S, V]
        del piece, tensors
        bar.update(1)
    bar.close()
    return [_result(r, x[b, valid[b]]) for b, r in enumerate(sharded)]


def _read(files: dict[str, Path], names: list[str], dtype, device) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        with safe_open(str(files[name]), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(name)
        out[name] = tensor if dtype is None else tensor.to(dtype)
    return out


def _result(sharded: PromptResult, logits: torch.Tensor) -> PromptResult:
    """logits: [len(prompt) + N - 1, V] of one sequence -> the N rows that chose tokens."""
    rows = logits[len(sharded.prompt) - 1 :].float().cpu()  # [N, V]
    return PromptResult(sharded.index, sharded.prompt, rows.argmax(dim=-1).tolist(), rows)


def source_bytes(source_dir: Path, dtype: torch.dtype) -> int:
    """Bytes the whole source model takes in memory at `dtype` (quantized: dequantized)."""
    total = 0
    scheme = load_hparams(source_dir).quantization
    for name, path in tensor_files(source_dir).items():
        with safe_open(str(path), framework="pt") as f:
            piece = f.get_slice(name)
            total += unpacked_numel(name, piece.get_shape(), piece.get_dtype(), scheme)
    return total * dtype.itemsize


def free_memory(device: str | torch.device) -> int:
    """Bytes free on the device (CUDA) or available host memory (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
