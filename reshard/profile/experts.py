"""`reshard profile experts`: tokens routed to each expert of every MoE layer, counted by the
reference runtime's router on calibration prompts (prefill + a few greedy decode steps).

Every k-th prompt is held out and counted separately, so a placement built from the
calibration load can be scored on prompts it never saw. The whole model runs on one device.
Returns an ExpertLoad for `write_expert_load`; it places nothing (see layout/experts/place.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.source import resolve_model
from ..layout.experts.place import check_placement
from ..layout.experts.report import (
    ExpertLoad,
    PlacementReport,
    format_placement_report,
    report_placement,
)
from ..models.hparams import HParams, load_hparams
from ..progress import progress_bar

# The report's ep when none is given: the largest that divides E and leaves each rank at
# least 2 experts (at ep = E every placement puts one expert per rank: nothing to compare).
DEFAULT_EP_CHOICES = (8, 4, 2)
BATCH = 16  # prompts per forward batch; padding is not counted, so batching changes no count


@dataclass(frozen=True)
class ExpertProfile:
    load: ExpertLoad
    hparams: HParams
    tokens: int  # calibration tokens each MoE layer routed (prompt + decoded, no padding)
    heldout_tokens: int
    max_new_tokens: int
    report_ep: int | None  # the ep of the placement report; None: no default ep divides E


def profile_experts(
    model: str,
    *,
    prompts_file: Path | None = None,
    prompt_ids: list[str] | None = None,
    heldout: float = 0.25,
    max_new_tokens: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    ep: int | None = None,
    progress: bool = False,
) -> ExpertProfile:
    """Load MODEL at world size 1, run the prompts, count tokens per expert per MoE layer.
    `ep` is only the report's (checked before the model runs); the load file has none."""
    from ..runtime.generate import check_new_tokens
    from ..runtime.launch import default_device  # lazy: the runtime imports torch
    from ..runtime.load import load_source_model

    path = resolve_model(model)[0]
    hp = load_hparams(path)
    if not hp.is_moe:
        raise InputError(
            f"{model}: {hp.architecture} is a dense model (no routed experts); `profile "
            "experts` needs a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE). For "
            "per-layer cost use `reshard profile layers`."
        )
    check_new_tokens(max_new_tokens, hp.max_position_embeddings, where=f"{path}/config.json")
    report_ep = default_report_ep(hp.num_experts) if ep is None else ep
    if report_ep is not None:
        check_placement(hp.num_experts, report_ep, 0, "balanced")
    prompts = read_calibration_prompts(path, hp.vocab_size, prompts_file, prompt_ids)
    calib, held = split_heldout(prompts, heldout)
    runtime = load_source_model(path, dtype=dtype, device=device or default_device())
    total = len(prompts) * max_new_tokens
    with progress_bar(total, desc="profile", unit="tok", enabled=progress) as bar:
        layers = count_routed(runtime, calib, max_new_tokens, bar=bar)
        held_layers = count_routed(runtime, held, max_new_tokens, bar=bar) if held else {}
    load = ExpertLoad(model, hp.num_experts, layers, held_layers, len(calib), len(held))
    return ExpertProfile(
        load, hp, routed_tokens(calib, max_new_tokens), routed_tokens(held, max_new_tokens),
        max_new_tokens, report_ep,
    )  # fmt: skip


def count_routed(
    runtime, prompts: list[list[int]], max_new_tokens: int, *, bar=None
) -> dict[int, tuple]:
    """{layer: tokens routed to each logical expert} over `prompts`, counted from zero."""
    from ..runtime.generate import generate_greedy

    runtime.enable_expert_load()  # resets the counters
    for start in range(0, len(prompts), BATCH):
        generate_greedy(runtime, prompts[start : start + BATCH], max_new_tokens, bar=bar)
    return {layer: tuple(counts) for layer, counts in runtime.read_expert_load().items()}


def routed_tokens(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Tokens each MoE layer sees: the prompt, then every decoded token but the last (which
    is chosen from the final step's logits and never fed back)."""
    return sum(len(p) for p in prompts) + (max_new_tokens - 1) * len(prompts)


def split_heldout(
    prompts: list[list[int]], fraction: float
) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration, held-out): round(n * fraction) prompts, evenly spaced (every k-th, the
    last one included), at least 1 when there are >= 2 prompts and at most n - 1."""
    if not 0 <= fraction < 1:
        raise InputError(f"--heldout {fraction}: give a fraction in [0, 1), e.g. 0.25.")
    n = len(prompts)
    count = 0 if fraction == 0 or n < 2 else min(max(1, round(n * fraction)), n - 1)
    held = {(i + 1) * n // count - 1 for i in range(count)}
    calib = [p for i, p in enumerate(prompts) if i not in held]
    return calib, [p for i, p in enumerate(prompts) if i in held]


def read_calibration_prompts(
    model_dir: Path, vocab: int, prompts_file: Path | None, prompt_ids: list[str] | None
) -> list[list[int]]:
    """Token ids from exactly one of `--prompts FILE` (one prompt per line, tokenised with
    the model's tokenizer.json) or `--prompt-ids` (comma-separated ids, repeatable)."""
    if (prompts_file is None) == (not prompt_ids):
        raise InputError(
            "give the calibration prompts with exactly one of --prompts FILE (text, one per "
            "line) or --prompt-ids 5,17,300 (repeatable)."
        )
    if prompt_ids:
        prompts = [parse_prompt_ids(text) for text in prompt_ids]
    else:
        prompts = tokenize_file(Path(prompts_file), model_dir, vocab)
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InputError(
                f"prompt {i} has token id {bad[0]}, outside the model's vocabulary [0, {vocab}) "
                "(vocab_size in config.json); check --prompt-ids or the tokenizer."
            )
    return prompts


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r}: expected comma-separated integers.") from None
    if not ids:
        raise InputError(f"--prompt-ids {text!r}: empty prompt.")
    return ids


def tokenize_file(prompts_file: Path, model_dir: Path, vocab: int) -> list[list[int]]:
    from ..verify.generate import read_prompts

    if not prompts_file.is_file():
        raise InputError(f"--prompts {prompts_file}: no such file.")
    prompts = [p for p in read_prompts(prompts_file, [model_dir], vocab) if p]
    if not prompts:
        raise InputError(f"--prompts {prompts_file}: no non-empty lines to profile on.")
    return prompts


def default_report_ep(num_experts: int) -> int | None:
    fits = (ep for ep in DEFAULT_EP_CHOICES if num_experts % ep == 0 and num_experts // ep >= 2)
    return next(fits, None)


def placement_report(profile: ExpertProfile) -> PlacementReport | None:
    """Contiguous vs balanced placement (no redundant slots) at the report's ep, scored on
    calibration and held-out load; None when no default ep divides E."""
    if profile.report_ep is None:
        return None
    load = profile.load
    return report_placement(load.layers, load.heldout or None, ep=profile.report_ep)


def format_profile(profile: ExpertProfile) -> str:
    load, hp = profile.load, profile.hparams
    decoded = f"prompt + {profile.max_new_tokens - 1} decoded each"
    lines = [
        f"{hp.architecture}: {len(load.layers)} MoE layers x {load.num_experts} experts, "
        f"top-{hp.num_experts_per_tok}",
        f"calibration: {load.prompts} prompts, {profile.tokens} tokens ({decoded}), "
        f"{profile.tokens * hp.num_experts_per_tok} expert visits per layer",
        f"held-out:    {load.heldout_prompts} prompts, {profile.heldout_tokens} tokens",
    ]
    report = placement_report(profile)
    if report is None:
        choices = "/".join(map(str, DEFAULT_EP_CHOICES))
        lines.append(
            f"no placement report: no ep of {choices} divides E={load.num_experts}; pass --ep"
        )
    else:
        lines += ["", format_placement_report(report), heldout_verdict(report)]
    return "\n".join(lines)


def heldout_verdict(report: PlacementReport) -> str:
    """One line: does the balanced placement still beat contiguous on prompts it never saw?
    If not, the calibration load is mostly sampling noise for this placement."""
    by_name = {s.placement: s for s in report.strategies}
    balanced, contiguous = by_name["balanced"], by_name["contiguous"]
    if balanced.heldout_sum is None:
        return "no held-out prompts: the placement is scored only on the load it was built from"
    figures = (
        f"held-out balancedness (sum) {balanced.heldout_sum:.4f} balanced vs "
        f"{contiguous.heldout_sum:.4f} contiguous"
    )
    if balanced.heldout_sum > contiguous.heldout_sum:
        return f"{figures}: the measured load carries over to unseen prompts"
    return (
        f"{figures}: the advantage does not carry over to unseen prompts; profile more (and "
        "more varied) prompts before converting with this load"
    )
