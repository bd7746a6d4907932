"""What vLLM's sharded_state loader cannot take, refused before any write (exit 2), each
refusal naming the reason and the layout or flag that would fit."""

from __future__ import annotations

from ...errors import LayoutError
from ...models import family_of

FIX_NATIVE = "or convert with --format native"


def check_vllm_layout(hp, recipe, versions: tuple[str, ...]) -> None:
    version = recipe.vllm_version
    if version not in versions:
        raise LayoutError(
            f"--vllm-version {version}: reshard writes vLLM's sharded_state contract for vLLM "
            f"{', '.join(versions)} only (names and shapes differ between versions). Use "
            f"--vllm-version {versions[-1]}, {FIX_NATIVE}."
        )
    family = family_of(hp)
    if "vllm" not in family.formats:
        raise LayoutError(
            f"--format vllm: reshard does not yet write {hp.architecture} in vLLM {version}'s "
            "parameter names (no golden key list for it). Convert with --format native."
        )
    if scheme := hp.quantization:
        raise LayoutError(
            f"--format vllm: {hp.architecture} is quantized ({scheme.kind}); vLLM's loader "
            f"expects each quantization kernel's own parameters, a contract reshard has not "
            f"implemented and proven for {scheme.kind}. Convert with --format native."
        )
    if hp.is_moe and recipe.dp > 1:
        raise LayoutError(
            f"--format vllm with dp={recipe.dp}: vLLM spreads a MoE model's experts over the "
            "data-parallel ranks too, and sharded_state file names carry no DP rank. Convert "
            "with dp=1 and serve with vLLM's --data-parallel-size, " + FIX_NATIVE + "."
        )
    if recipe.ep > 1 and recipe.ep != recipe.tp:
        raise LayoutError(
            f"--format vllm with ep={recipe.ep}, tp={recipe.tp}: vLLM's expert parallelism "
            f"spans the whole TP group (each rank holds whole experts). Use --ep {recipe.tp} "
            f"(expert parallel) or drop --ep (experts split tp ways), {FIX_NATIVE}."
        )
    if recipe.redundant or recipe.load is not None:
        raise LayoutError(
            "--format vllm with redundant experts or --expert-load: vLLM builds its own expert "
            "map (contiguous experts per rank) and would load the wrong experts. Drop "
            f"--redundant and --expert-load (vLLM's EPLB balances at run time), {FIX_NATIVE}."
        )
    padded = -(-hp.vocab_size // 64) * 64
    if padded % recipe.tp:
        raise LayoutError(
            f"--format vllm with tp={recipe.tp}: vLLM pads the vocab ({hp.vocab_size}) to a "
            f"multiple of 64 ({padded}) and splits it evenly, which tp={recipe.tp} cannot. "
            f"Use a tp that divides {padded}, {FIX_NATIVE}."
        )
    if recipe.keep_mtp:
        raise LayoutError(
            "--format vllm with --keep-mtp: vLLM loads DeepSeek's MTP layer only as a separate "
            f"draft model, not in sharded_state files. Drop --keep-mtp, {FIX_NATIVE}."
        )


def check_vllm_plan(layout, placements) -> None:
    """Stages and expert placement as vLLM builds them: every stage has layers, and expert
    parallel places experts contiguously (vLLM's linear placement)."""
    for s in layout.stages:
        if not len(s.layers):
            raise LayoutError(
                f"--format vllm: stage {s.stage} has no decoder layer; vLLM gives every "
                "pipeline stage at least one. Give --costs or a stages list with a layer on "
                "every stage, " + FIX_NATIVE + "."
            )
    for layer, placement in placements.items():
        per = len(placement.rank_experts(0))
        for rank in range(layout.ep):
            if tuple(placement.rank_experts(rank)) != tuple(range(rank * per, (rank + 1) * per)):
                raise LayoutError(
                    f"--format vllm: layer {layer}'s experts are not placed contiguously on "
                    f"ep rank {rank} ({list(placement.rank_experts(rank))[:8]}...); vLLM loads "
                    "experts r*E/ep .. (r+1)*E/ep-1 on rank r. Use --placement contiguous, "
                    + FIX_NATIVE
                    + "."
                )
