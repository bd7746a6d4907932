"""Compare sharded generation with the reference, prompt by prompt and row by row.

A row is the logits that chose one generated token (row 0: the prompt's last position).
Rows are compared up to and including the first token that differs: after that the two runs
condition on different text and their logits are not comparable. With float32 compute (the
default) a differing token always fails. With checkpoint-dtype compute (bf16 on GPUs) a
differing token may be exempted as a "near tie": the reference's margin of its own pick over
the sharded pick is at most twice the |dlogit| measured at that very row (and that |dlogit|
is within the tolerance), i.e. the rounding seen there is enough to swap the two. Exemptions
are counted and reported with the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import VerificationError
from ..runtime.generate import PromptResult


@dataclass(frozen=True)
class Tolerance:
    """A row passes when max|diff| <= atol + rtol * max|reference| and KL <= kl."""

    atol: float
    rtol: float
    kl: float


# fp32: the sharded run differs from the reference only in summation order (all-reduce of
# partial sums): ~1e-6 on tiny models, 1e-4 + 1e-5 * logit scale leaves room for big ones.
# bf16/fp16: TP rounds partial sums to 8 / 11 mantissa bits before adding them. Measured on
# random Llamas (CPU, tp 4, bf16), the TP-vs-reference difference is the same size as the
# bf16-vs-fp32 difference of the reference itself (~1% of the logit scale, KL ~1e-2 for
# badly conditioned random weights), so these bounds sit a few times above that noise. A
# wrong shard moves logits by the whole logit scale (KL > 1) and still fails by far.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-5, kl=1e-6),
    torch.float16: Tolerance(atol=1e-1, rtol=1e-2, kl=1e-2),
    torch.bfloat16: Tolerance(atol=5e-1, rtol=5e-2, kl=5e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])


@dataclass(frozen=True)
class PromptComparison:
    index: int
    prompt: list[int]
    reference_ids: list[int]
    sharded_ids: list[int]
    max_abs: float  # over the compared rows
    max_abs_reference: float  # max |reference logit| over the compared rows (the scale)
    kl: float  # max over the compared rows of KL(reference || sharded)
    first_mismatch: int | None  # step of the first differing token
    margin: float | None  # reference logit of its pick minus that of the sharded pick, there
    near_tie: bool  # exempted: near ties allowed, margin <= 2 * |dlogit| (in tolerance) there
    passed: bool
    source_nonfinite: int = 0  # compared rows where the reference itself has NaN/inf logits


def logits_kl(reference: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(sharded)) per row, in fp32. [..., V] -> [...]."""
    ref_logp = torch.log_softmax(reference.float(), dim=-1)
    got_logp = torch.log_softmax(sharded.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - got_logp)).sum(dim=-1).clamp(min=0)


def compare_prompt(
    ref: PromptResult, got: PromptResult, tol: Tolerance, *, near_ties: bool = False
) -> PromptComparison:
    mismatch = _first_mismatch(ref.tokens, got.tokens)
    rows = len(ref.tokens) if mismatch is None else mismatch + 1
    ref_rows, got_rows = ref.logits[:rows], got.logits[:rows]  # [rows, V]
    same = _same_values(ref_rows, got_rows)  # [rows, V]: NaN == NaN, inf == inf
    diff = (ref_rows - got_rows).abs().masked_fill(same, 0).nan_to_num(nan=torch.inf)
    diff = diff.amax(dim=-1)  # [rows]
    scale = ref_rows.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=-1)  # [rows]
    bound = tol.atol + tol.rtol * scale  # [rows]
    kl = logits_kl(ref_rows, got_rows).masked_fill(same.all(dim=-1), 0)  # [rows]
    margin = None if mismatch is None else _margin(ref.logits[mismatch], got.tokens[mismatch])
    explained = 2 * min(float(diff[-1]), float(bound[-1]))  # what rounding there can swap
    near_tie = near_ties and margin is not None and margin <= explained
    return PromptComparison(
        index=ref.index,
        prompt=list(ref.prompt),
        reference_ids=list(ref.tokens),
        sharded_ids=list(got.tokens),
        max_abs=float(diff.max()),
        max_abs_reference=float(scale.max()),
        kl=float(kl.nan_to_num(nan=torch.inf).max()),
        first_mismatch=mismatch,
        margin=margin,
        near_tie=near_tie,
        passed=(mismatch is None or near_tie)
        and bool((diff <= bound).all())
        and bool((kl <= tol.kl).all()),
        source_nonfinite=int((~ref_rows.isfinite()).any(dim=-1).sum()),
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equality where NaN equals NaN: a source whose weights hold NaN gives NaN
    logits, and a bitwise-faithful shard gives the same NaN, which is a match, not 'max nan'."""
    return (a == b) | (a.isnan() & b.isnan())


def compare_results(
    reference: list[PromptResult],
    sharded: list[PromptResult],
    tol: Tolerance,
    *,
    near_ties: bool = False,
) -> list[PromptComparison]:
    """Pair results by prompt index and compare each pair. near_ties: exempt a differing
    token whose reference margin the measured |dlogit| explains (checkpoint-dtype compute)."""
    by_index = {r.index: r for r in sharded}
    missing = [r.index for r in reference if r.index not in by_index]
    if missing:
        raise VerificationError(f"the sharded run returned no result for prompts {missing}.")
    return [compare_prompt(r, by_index[r.index], tol, near_ties=near_ties) for r in reference]


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return step
    return None


def _margin(ref_row: torch.Tensor, sharded_token: int) -> float:
    """How far the reference scores the sharded pick below its own best token (>= 0)."""
    return float(ref_row.max() - ref_row[sharded_token])
