"""Verification tier 3 (generation): the shards on a world of the manifest's size against the
unsharded source at world size 1, on distinct prompts of different lengths.

Called by reshard.verify.verify_output; returns its LevelResult. The reference runs in this
process (under torchrun: on global rank 0 only), in the shards' dtype, on the same kind of
device, so the whole source model must fit on one device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..verify import LevelResult
from .compare import PromptComparison, compare_results, tolerance_for
from .launch import default_device, generate_reference, generate_sharded
from .load import resolve_dtype
from .streamed import free_memory, reference_streamed, source_bytes

DEFAULT_PROMPT_LENGTHS = (11, 3, 7, 16)


def verify_generation(
    out_dir: Path,
    manifest: dict[str, Any],
    source_dir: Path,
    *,
    prompt_ids: list[list[int]] | None = None,
    prompts_file: Path | None = None,
    max_new_tokens: int = 16,
    device: str | None = None,
    reference: str = "auto",
) -> LevelResult:
    device = device or default_device()
    vocab = int(manifest["hparams"]["vocab_size"])
    prompts = prompt_ids or read_prompts(prompts_file, [out_dir, source_dir], vocab)
    dtype = shard_dtype(manifest)
    sharded = generate_sharded(out_dir, prompts, max_new_tokens, device=device)
    backend = "nccl" if device == "cuda" else "gloo"
    if int(os.environ.get("RANK", "0")) != 0:
        return LevelResult(
            "generate", None, "compared on global rank 0", data={"backend": backend},
            elsewhere=True,
        )  # fmt: skip
    mode = choose_reference(reference, source_dir, dtype, device)
    if mode == "full":
        ref = generate_reference(source_dir, prompts, max_new_tokens, dtype=dtype, device=device)
    else:
        ref = reference_streamed(source_dir, sharded, dtype=dtype, device=device)
    comparisons = compare_results(ref, sharded, tolerance_for(dtype))
    return _level_result(comparisons, dtype, backend, manifest, mode)


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


def shard_dtype(manifest: dict[str, Any]) -> torch.dtype:
    """The dtype the shards hold: the recipe's cast, or the source's own ('keep').
    Quantized shards are dequantized to fp32 as they load and computed in fp32."""
    if manifest["hparams"].get("quantization"):
        return torch.float32
    cast = resolve_dtype(manifest["layout"].get("dtype", "keep"))
    return cast or resolve_dtype(manifest["hparams"].get("torch_dtype", "float32"))


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
    comparisons: list[PromptComparison], dtype: torch.dtype, backend: str, manifest: dict,
    mode: str,
) -> LevelResult:  # fmt: skip
    failures = [_failure(c) for c in comparisons if not c.passed]
    ties = [c.index for c in comparisons if c.near_tie]
    tol = tolerance_for(dtype)
    detail = (
        f"{len(comparisons)} prompts x {len(comparisons[0].reference_ids)} tokens on "
        f"{manifest['layout']['world_size']} {backend} ranks, {str(dtype).removeprefix('torch.')}"
        f" (max |dlogit| <= {tol.atol:g} + {tol.rtol:g}*max|logit|, KL <= {tol.kl:g});"
        f" {mode} reference"
    )
    if ties:
        detail += f"; prompts {ties} diverge at a near tie (compared up to it)"
    nonfinite = sum(c.source_nonfinite for c in comparisons)
    if nonfinite:
        detail += (
            f"; the source model itself gives NaN/inf logits in {nonfinite} rows (its weights "
            "hold NaN or inf); NaN is compared as NaN"
        )
    prompts = [_prompt_entry(c) for c in comparisons]
    data = {
        "backend": backend,
        "generation": {"dtype": str(dtype), "reference": mode, "prompts": prompts},
    }
    return LevelResult("generate", not failures, detail, failures, data)


def _prompt_entry(c: PromptComparison) -> dict[str, Any]:
    return {
        "prompt_ids": c.prompt,
        "reference_ids": c.reference_ids,
        "sharded_ids": c.sharded_ids,
        "max_abs_logit_diff": c.max_abs,
        "kl": c.kl,
        "first_mismatch": c.first_mismatch,
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
        f"{c.sharded_ids[step]} (max |dlogit| {c.max_abs:.3e}, KL {c.kl:.3e})"
    )
