"""Placement aimed at unseen traffic: the balanced placement, then a local search on each
rank's load plus `penalty` times the spread that load will have on other prompts. Each
replica's tokens move between prompt sets by a relative amount of similar size for every
expert, so a rank of replicas w_i varies by about sqrt(sum w_i^2): the penalty favours
ranks of many small replicas over ranks with one large one. Pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

from reshard.layout.experts.place import Placement, place_experts


def place_robust(
    load: Sequence[float], ep: int, redundant: int = 0, *, penalty: float = 0.4
) -> Placement:
    """place_experts(balanced), then swaps lowering max_r (W_r + penalty * sqrt(Q_r)) with
    W_r the rank's load and Q_r the sum of its replicas' squared loads. penalty ~ z * s *
    sqrt(2): s the relative per-expert spread between prompt sets, z ~ 2 for 32 ranks."""
    start = place_experts(load, ep, redundant)
    weight = [load[e] / start.logcnt[e] for e in range(len(load))]
    held = [list(start.rank_experts(r)) for r in range(ep)]
    swap_risky(held, weight, penalty)
    return Placement.from_phy2log([e for rank in held for e in rank], ep, len(load))


def swap_risky(held: list[list[int]], weight: Sequence[float], penalty: float) -> None:
    """Best swap off the riskiest rank first, until none lowers that pair's peak risk."""
    sums = [sum(weight[e] for e in rank) for rank in held]
    squares = [sum(weight[e] ** 2 for e in rank) for rank in held]

    def risk(w: float, q: float) -> float:
        return w + penalty * math.sqrt(max(q, 0.0))

    for _ in range(10_000):
        risks = [risk(w, q) for w, q in zip(sums, squares, strict=True)]
        peak = max(range(len(held)), key=lambda r: (risks[r], -r))
        floor = risks[peak] * (1 - 1e-9)
        best = None
        for r, rank in enumerate(held):
            if r == peak:
                continue
            for i, a in enumerate(held[peak]):
                if a in rank:
                    continue
                for j, b in enumerate(rank):
                    if b in held[peak]:
                        continue
                    dw, dq = weight[a] - weight[b], weight[a] ** 2 - weight[b] ** 2
                    new = max(
                        risk(sums[peak] - dw, squares[peak] - dq),
                        risk(sums[r] + dw, squares[r] + dq),
                    )
                    if new < floor and (best is None or new < best[0]):
                        best = (new, r, i, j)
        if best is None:
            return
        _, r, i, j = best
        a, b = held[peak][i], held[r][j]
        held[peak][i], held[r][j] = b, a
        for q, sign in ((peak, -1), (r, 1)):
            sums[q] += sign * (weight[a] - weight[b])
            squares[q] += sign * (weight[a] ** 2 - weight[b] ** 2)
