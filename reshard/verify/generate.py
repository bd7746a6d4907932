"""Verification tier 3 (generation): the shards on a world of the manifest's size against the
unsharded source at world size 1, on distinct prompts of different lengths.

Called by reshard.verify.levels.verify_output; returns its LevelResult. The reference runs in this
process (under torchrun: on global rank 0 only), on the same kind of device. Both sides
compute in float32 by default (weights upcast one tensor at a time as they load), so the
greedy tokens must be identical; `compute_dtype="checkpoint"` computes in the shards' own
dtype and allows narrow, counted near-tie exemptions (see compare.py).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dtypes import DTYPE_SIZES, dtype_name
from ..errors import InputError
from ..io.manifest_value import Manifest
from ..runtime.generate import check_new_tokens, check_prompts, check_rope_positions
from ..runtime.launch import default_device, generate_reference, generate_sharded
from ..runtime.load import resolve_dtype
from ..runtime.streamed import free_memory, reference_streamed, source_bytes
from ..units import format_bytes
from .compare import PromptComparison, compare_results, tolerance_for
from .result import LevelResult

DEFAULT_PROMPT_LENGTHS = (11, 3, 7, 16)
COMPUTE_DTYPES = ("float32", "checkpoint")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_generate_options(
    *,
    max_new_tokens: int = 16,
    device: str | None = None,
    compute_dtype: str = "float32",
    reference: str = "auto",
    vocab: int | None = None,
    prompt_ids: list[list[int]] | None = None,
    max_positions: tuple[int, str] | None = None,
    **_,
) -> None:
    """Refuse bad generate options before any tier runs or any rank is spawned.
    `max_positions`: the model's (max_position_embeddings, the file that says so)."""
    if reference not in REFERENCES:
        raise InputError(f"--reference {reference!r}: use one of {', '.join(REFERENCES)}.")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token.")
    if max_positions is not None:
        check_new_tokens(max_new_tokens, max_positions[0], where=max_positions[1])
    if compute_dtype not in COMPUTE_DTYPES:
        raise InputError(f"--compute-dtype {compute_dtype!r}: use one of float32, checkpoint.")
    if device is not None:
        check_device(device)
    if prompt_ids and vocab is not None:
        check_prompts(prompt_ids, vocab, max_new_tokens)


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and the GPU must exist."""
    if not _DEVICE.match(device):
        raise InputError(f"--device {device!r}: use cpu, cuda or cuda:N (e.g. cuda:0).")
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise InputError(
            f"--device {device}: this machine has {count} CUDA device(s) visible to torch; "
            "use --device cpu (gloo processes) or a GPU index below the count."
        )


def verify_generation(
    out_dir: Path,
    manifest: Manifest,
    source_dir: Path,
    *,
    prompt_ids: list[list[int]] | None = None,
    prompts_file: Path | None = None,
    max_new_tokens: int = 16,
    device: str | None = None,
    reference: str = "auto",
    compute_dtype: str = "float32",
    progress: bool = False,
) -> LevelResult:
    check_generate_options(
        max_new_tokens=max_new_tokens, device=device, compute_dtype=compute_dtype,
        reference=reference,
    )  # fmt: skip
    device = device or default_device()
    vocab = manifest.hparams.vocab_size
    prompts = prompt_ids or read_prompts(prompts_file, [out_dir, source_dir], vocab)
    check_prompts(prompts, vocab, max_new_tokens)
    check_rope_positions(manifest.hparams, prompts, max_new_tokens)
    stored = shard_dtype(manifest)
    compute = torch.float32 if compute_dtype == "float32" else stored
    cast = None if compute == stored else dtype_name(compute)
    sharded = generate_sharded(
        out_dir, prompts, max_new_tokens, device=device, dtype=cast, progress=progress
    )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if int(os.environ.get("RANK", "0")) != 0:
        return LevelResult(
            "generate", None, "compared on global rank 0", data={"backend": backend},
            elsewhere=True,
        )  # fmt: skip
    mode = choose_reference(reference, source_dir, compute, device)
    if mode == "full":
        ref = generate_reference(
            source_dir, prompts, max_new_tokens, dtype=compute, device=device, progress=progress
        )
    else:
        ref = reference_streamed(
            source_dir, sharded, dtype=compute, device=device, progress=progress
        )
    near_ties = compute != torch.float32
    comparisons = compare_results(ref, sharded, tolerance_for(compute), near_ties=near_ties)
    run = GenerateRun(stored, compute, backend, mode, compute_memory(manifest, source_dir, compute))
    return _level_result(comparisons, run, manifest)


@dataclass(frozen=True)
class GenerateRun:
    """How the generate tier ran, for its report."""

    stored: torch.dtype  # the shards' dtype
    compute: torch.dtype
    backend: str
    reference: str  # full | streamed
    memory: str  # what the compute dtype costs, in words


def compute_memory(manifest: Manifest, source_dir: Path, compute: torch.dtype) -> str:
    """The weight memory of the largest rank and of the reference at `compute` vs as stored."""
    ranks = [e for e in manifest.ranks if e.get("replica_of") is None]
    stored = max(_rank_bytes(e, None) for e in ranks)
    held = max(_rank_bytes(e, compute) for e in ranks)
    reference = source_bytes(source_dir, compute)
    return (
        f"weights in {dtype_name(compute)}: {format_bytes(held)} on the largest rank "
        f"({held / stored:.1f}x the {format_bytes(stored)} stored), {format_bytes(reference)} "
        "for a full reference (streamed: one layer at a time)"
    )


def _rank_bytes(entry: dict[str, Any], dtype: torch.dtype | None) -> int:
    return sum(
        math.prod(t["shape"]) * (dtype.itemsize if dtype else DTYPE_SIZES[t["dtype"]])
        for t in entry["tensors"].values()
    )


REFERENCES = ("auto", "full", "streamed")


def choose_reference(reference: str, source_dir: Path, dtype: torch.dtype, device: str) -> str:
    """full: the whole source model on one device, generating freely. streamed: one layer at a
    time, teacher-forced on the sharded tokens (see streamed.py). auto: full when the model
    takes under 80% of the free memory of the device, else streamed."""
    if reference not in REFERENCES:
        raise InputError(f"--reference {reference!r}: use one of {', '.join(REFERENCES)}.")
    if reference != "auto":
        return reference
    fits = source_bytes(source_dir, dtype) < 0.8 * free_memory(device)
    return "full" if fits else "streamed"


def shard_dtype(manifest: Manifest) -> torch.dtype:
    """The dtype the shards hold: the recipe's cast, or the source's own ('keep').
    Quantized shards are dequantized to fp32 as they load and computed in fp32."""
    if manifest.hparams.quantization:
        return torch.float32
    return resolve_dtype(manifest.layout.dtype) or resolve_dtype(manifest.hparams.torch_dtype)


def read_prompts(prompts_file: Path | None, folders: list[Path], vocab: int) -> list[list[int]]:
    """Token ids from a text file (tokenizer.json of OUT or the source), else fixed prompts."""
    if prompts_file is None:
        return default_prompts(vocab)
    lines = [ln for ln in Path(prompts_file).read_text(encoding="utf-8").splitlines() if ln]
    tokenizer = _load_tokenizer(folders)
    return [tokenizer.encode(line).ids for line in lines]


def default_prompts(vocab: int) -> list[list[int]]:
    """Distinct pseudo-random prompts of different lengths, the same on every run."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in DEFAULT_PROMPT_LENGTHS]


def _load_tokenizer(folders: list[Path]) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(
            "--prompts needs the `tokenizers` package; install it or pass --prompt-ids."
        ) from None
    for folder in folders:
        if (Path(folder) / "tokenizer.json").exists():
            return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    raise InputError(
        f"--prompts: no tokenizer.json in {', '.join(map(str, folders))}; pass --prompt-ids."
    )


def _level_result(
    comparisons: list[PromptComparison], run: GenerateRun, manifest: Manifest
) -> LevelResult:
    failures = [_failure(c) for c in comparisons if not c.passed]
    tol = tolerance_for(run.compute)
    detail = (
        f"{len(comparisons)} prompts x {len(comparisons[0].reference_ids)} tokens on "
        f"{manifest.layout.world_size} {run.backend} ranks, {dtype_name(run.stored)} "
        f"weights computed in {dtype_name(run.compute)} (max |dlogit| <= {tol.atol:g} + "
        f"{tol.rtol:g}*max|logit|, KL <= {tol.kl:g}); {run.reference} reference\n"
        f"          {run.memory}"
    )
    exempted = [c for c in comparisons if c.near_tie]
    for c in exempted:
        detail += (
            f"\n          prompt {c.index}: token {c.first_mismatch} exempted as a near tie "
            f"(reference margin {c.margin:.3g} <= 2 x |dlogit| there; compared up to it)"
        )
    nonfinite = sum(c.source_nonfinite for c in comparisons)
    if nonfinite:
        detail += (
            f"\n          the source model itself gives NaN/inf logits in {nonfinite} rows (its "
            "weights hold NaN or inf); NaN is compared as NaN"
        )
    data = {
        "backend": run.backend,
        "generation": {
            "dtype": dtype_name(run.stored),
            "compute_dtype": dtype_name(run.compute),
            "reference": run.reference,
            "exempted": len(exempted),
            "prompts": [_prompt_entry(c) for c in comparisons],
        },
    }
    return LevelResult("generate", not failures, detail, failures, data)


def _prompt_entry(c: PromptComparison) -> dict[str, Any]:
    return {
        "prompt_ids": c.prompt,
        "reference_ids": c.reference_ids,
        "sharded_ids": c.sharded_ids,
        "max_abs_logit_diff": c.max_abs,
        "max_abs_logit": c.max_abs_reference,
        "kl": c.kl,
        "first_mismatch": c.first_mismatch,
        "margin": c.margin,
        "near_tie": c.near_tie,
        "passed": c.passed,
    }


def _failure(c: PromptComparison) -> str:
    where = f"prompt {c.index} (length {len(c.prompt)})"
    if c.first_mismatch is None:
        return f"{where}: logits off by max {c.max_abs:.3e}, KL {c.kl:.3e}"
    step = c.first_mismatch
    return (
        f"{where}: token {step} differs, reference {c.reference_ids[step]} vs sharded "
        f"{c.sharded_ids[step]} (reference margin {c.margin:.3e}, max |dlogit| "
        f"{c.max_abs:.3e}, KL {c.kl:.3e})"
    )
