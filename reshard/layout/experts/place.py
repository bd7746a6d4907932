"""Expert placement for expert parallelism: how many replicas each routed expert gets and
which ep_rank holds each replica, per MoE layer, from measured (or uniform) expert load.
Pure functions on numbers, no I/O. The load file, the metrics, the report and the engine
exports (what goes in and comes out as files and text) live in `report.py`."""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from reshard.errors import InputError, LayoutError

PLACEMENTS = ("contiguous", "round_robin", "balanced")  # recipe, --placement and here


@dataclass(frozen=True)
class Placement:
    """One MoE layer's expert map, in the vocabulary of DeepSeek EPLB / vLLM / SGLang.

    Physical slot p lives on ep_rank p // slots_per_rank. `log2phy[e]` lists expert e's
    physical slots in increasing order, padded with -1 to the largest replica count.
    """

    phy2log: tuple[int, ...]
    log2phy: tuple[tuple[int, ...], ...]
    logcnt: tuple[int, ...]
    slots_per_rank: int
    ep: int

    @classmethod
    def from_phy2log(cls, phy2log: Sequence[int], ep: int, num_experts: int) -> Placement:
        """Build the maps from a physical->logical list, refusing maps no engine can load."""
        check_phy2log(phy2log, ep, num_experts)
        slots: list[list[int]] = [[] for _ in range(num_experts)]
        for p, e in enumerate(phy2log):
            slots[e].append(p)
        width = max(len(s) for s in slots)
        return cls(
            phy2log=tuple(phy2log),
            log2phy=tuple(tuple(s + [-1] * (width - len(s))) for s in slots),
            logcnt=tuple(len(s) for s in slots),
            slots_per_rank=len(phy2log) // ep,
            ep=ep,
        )

    @property
    def num_experts(self) -> int:
        return len(self.logcnt)

    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    def rank_experts(self, ep_rank: int) -> tuple[int, ...]:
        """Logical expert ids held by `ep_rank`, in slot order (the order of its weights)."""
        start = ep_rank * self.slots_per_rank
        return self.phy2log[start : start + self.slots_per_rank]

    def rank_load(self, load: Sequence[float]) -> tuple[float, ...]:
        """Tokens each rank computes when expert e's tokens split evenly over its replicas."""
        if len(load) != self.num_experts:
            raise InputError(f"load has {len(load)} experts, the placement {self.num_experts}")
        return tuple(
            sum(load[e] / self.logcnt[e] for e in self.rank_experts(r)) for r in range(self.ep)
        )

    def choose_replica(self, expert: int, token_index: int) -> int:
        """The ep_rank that serves `token_index`'s visit to `expert`.

        Replica i = token_index % logcnt[expert]: consecutive tokens cycle over the replicas,
        so each replica gets load/logcnt tokens (+-1), the split `rank_load` assumes.
        """
        replica = token_index % self.logcnt[expert]
        return self.log2phy[expert][replica] // self.slots_per_rank


def check_phy2log(phy2log: Sequence[int], ep: int, num_experts: int) -> None:
    """Raise LayoutError unless every expert has a slot, ids are in range, slots divide
    evenly over ep, and no rank holds two replicas of one expert."""
    if ep < 1 or len(phy2log) % ep:
        raise LayoutError(f"{len(phy2log)} physical slots do not split evenly over ep={ep}")
    bad = [e for e in phy2log if not 0 <= e < num_experts]
    if bad:
        raise LayoutError(f"expert id {bad[0]} is outside 0..{num_experts - 1}")
    missing = sorted(set(range(num_experts)) - set(phy2log))
    if missing:
        raise LayoutError(f"experts {missing[:8]} have no slot; every expert needs one")
    per_rank = len(phy2log) // ep
    for r in range(ep):
        held = phy2log[r * per_rank : (r + 1) * per_rank]
        if len(set(held)) != len(held):
            dup = next(e for e in held if held.count(e) > 1)
            raise LayoutError(f"ep_rank {r} holds expert {dup} twice; a second copy there is waste")


def replica_counts(
    load: Sequence[float], slots: int, *, max_replicas: int | None = None
) -> list[int]:
    """Replicas per expert for `slots` physical slots: each expert gets one, then each
    further slot goes to the expert with the highest load per replica (ties: lowest id).

    Greedy minimises max_e load[e] / count[e]: reaching a peak t needs ceil(load[e] / t)
    replicas of each expert independently, and greedy always splits the current peak, the
    only move that can lower it. `max_replicas` caps the count (placement caps it at ep:
    two replicas on one rank split nothing).
    """
    n = len(load)
    cap = slots if max_replicas is None else max_replicas
    if slots < n or slots > n * cap:
        raise LayoutError(f"{slots} slots cannot hold {n} experts with 1..{cap} replicas each")
    counts = [1] * n
    heap = [(-load[e], e) for e in range(n) if cap > 1]
    heapq.heapify(heap)
    for _ in range(slots - n):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < cap:
            heapq.heappush(heap, (-load[e] / counts[e], e))
    return counts


def place_experts(
    load: Sequence[float], ep: int, redundant: int = 0, *, placement: str = "balanced"
) -> Placement:
    """Place one layer's E experts plus `redundant` extra replicas on `ep` ranks.

    balanced: replica_counts, then heaviest replica first onto the least-loaded rank with a
      free slot that does not hold that expert yet, then swap local search.
    contiguous: physical slot p holds expert p % E, the engines' default without a load file
      (SGLang's `init_trivial`; TRT-LLM's default when num_slots == E). R > 0 adds copies
      of experts 0..R-1 on the last ranks, blind to load, as SGLang's default does.
    round_robin: expert e on rank e % ep; needs redundant == 0.

    `load` is one number per expert: a list, tuple or 1-D tensor (read with .tolist()).
    """
    load = check_load(load)
    check_placement(len(load), ep, redundant, placement)
    num_experts = len(load)
    if placement == "contiguous":
        phy2log = [p % num_experts for p in range(num_experts + redundant)]
    elif placement == "round_robin":
        phy2log = [j * ep + r for r in range(ep) for j in range(num_experts // ep)]
    else:
        phy2log = place_balanced(load, ep, redundant)
    return Placement.from_phy2log(phy2log, ep, num_experts)


def check_placement(num_experts: int, ep: int, redundant: int, placement: str) -> None:
    """Raise LayoutError, with the numbers and a fix, for a layout no placement can meet."""
    for name, value in (("ep", ep), ("redundant", redundant)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name}={value!r} ({type(value).__name__}); give an int.")
    if placement not in PLACEMENTS:
        raise LayoutError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if num_experts < 1 or ep < 1 or redundant < 0:
        raise LayoutError(
            f"need experts >= 1, ep >= 1, redundant >= 0; got E={num_experts}, ep={ep}, "
            f"redundant={redundant}"
        )
    if (num_experts + redundant) % ep:
        what = f"E={num_experts}" if redundant == 0 else f"E+R={num_experts}+{redundant}"
        total = "" if redundant == 0 else f"={num_experts + redundant}"
        options = " or ".join(str(r) for r in suggest_redundant(num_experts, ep, redundant))
        raise LayoutError(f"{what}{total} is not divisible by ep={ep}; use redundant = {options}")
    if redundant > num_experts * (ep - 1):
        raise LayoutError(
            f"redundant={redundant} needs more than ep={ep} replicas of some expert, and a rank "
            f"never holds two; use redundant <= {num_experts * (ep - 1)}"
        )
    if placement == "round_robin" and redundant:
        raise LayoutError(
            f"round_robin has no place for redundant={redundant} replicas; use "
            "placement='balanced' or redundant=0"
        )
    if placement == "contiguous" and (num_experts + redundant) // ep > num_experts:
        raise LayoutError(
            f"contiguous would put two copies of an expert on one rank ({num_experts + redundant}"
            f" slots over ep={ep} exceeds E={num_experts} per rank); use placement='balanced'"
        )


def suggest_redundant(num_experts: int, ep: int, redundant: int) -> list[int]:
    """The valid redundant counts nearest `redundant`: one below and one above, or the next
    two above when none below is >= 0."""
    above = redundant + (-(num_experts + redundant)) % ep
    below = above - ep
    return [below, above] if below >= 0 else [above, above + ep]


def check_load(load: Sequence[float]) -> list[float]:
    """Loads are token counts: finite and non-negative, one per expert. Returns a list
    (a tensor row is read with .tolist())."""
    if hasattr(load, "tolist"):
        load = load.tolist()
    if isinstance(load, (str, bytes)) or not isinstance(load, Sequence):
        raise InputError(
            f"load is a {type(load).__name__}; give one number per expert (list or 1-D tensor)"
        )
    for e, x in enumerate(load):
        if not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
            raise InputError(
                f"expert {e} has load {x!r} ({type(x).__name__}); loads are token counts >= 0, "
                "one number per expert"
            )
    return list(load)


def place_balanced(load: Sequence[float], ep: int, redundant: int) -> list[int]:
    """phy2log of the balanced placement (see place_experts)."""
    slots_per_rank = (len(load) + redundant) // ep
    counts = replica_counts(load, len(load) + redundant, max_replicas=ep)
    weight = [load[e] / counts[e] for e in range(len(load))]
    held = pack_replicas(weight, counts, ep, slots_per_rank)
    swap_replicas(held, weight)
    return [e for rank in held for e in rank]


def pack_replicas(
    weight: Sequence[float], counts: Sequence[int], ep: int, slots_per_rank: int
) -> list[list[int]]:
    """Heaviest replica first onto the least-loaded rank with a free slot that lacks it.

    All replicas of an expert weigh the same, so they arrive together and take the
    count[e] least-loaded eligible ranks. DeepSeek EPLB stops there and may stack two copies
    on one rank; here, when that choice would leave later experts without enough distinct
    ranks (Gale-Ryser test), the expert takes the ranks with the most free slots instead,
    which always keeps the rest placeable (Ryser's construction).
    """
    free = [slots_per_rank] * ep
    rank_load = [0.0] * ep
    held: list[list[int]] = [[] for _ in range(ep)]
    pending = [0] * (ep + 1)  # pending[c]: experts not yet placed that need c ranks
    for c in counts:
        pending[c] += 1
    for e in sorted(range(len(weight)), key=lambda e: (-weight[e], e)):
        pending[counts[e]] -= 1
        open_ranks = [r for r in range(ep) if free[r]]
        ranks = sorted(open_ranks, key=lambda r: (rank_load[r], r))[: counts[e]]
        if not fits_after(free, ranks, pending):
            ranks = sorted(open_ranks, key=lambda r: (-free[r], rank_load[r], r))[: counts[e]]
        assert len(ranks) == counts[e], "Ryser's construction keeps the layout placeable"
        for r in ranks:
            free[r] -= 1
            rank_load[r] += weight[e]
            held[r].append(e)
    return held


def fits_after(free: Sequence[int], taken: Sequence[int], pending: Sequence[int]) -> bool:
    """Gale-Ryser: experts needing pending[c] sets of c distinct ranks fit into the free
    slots left after `taken` iff, for every k, the k largest free counts sum to at most
    sum over experts of min(c, k)."""
    left = list(free)
    for r in taken:
        left[r] -= 1
    left.sort(reverse=True)
    at_least = [0] * (len(pending) + 1)  # at_least[k]: experts needing >= k ranks
    for c in range(len(pending) - 1, 0, -1):
        at_least[c] = at_least[c + 1] + pending[c]
    supply = demand = 0
    for k in range(1, len(left) + 1):
        supply += left[k - 1]
        demand += at_least[k]
        if supply > demand:
            return False
    return True


def swap_replicas(
    held: list[list[int]],
    weight: Sequence[float],
    max_rounds: int = 10_000,
    allowed: Callable[[tuple[int, int, int, int]], bool] | None = None,
) -> None:
    """Local search in place: swap a replica on the most-loaded rank with a lighter one on
    another rank when that lowers the pair's peak, best swap first, until none helps.

    Each swap lowers the sorted load vector lexicographically, so it terminates; max_rounds
    only bounds pathological float cases. Ties break by rank id, then slot, for determinism.
    """
    loads = [sum(weight[e] for e in rank) for rank in held]
    for _ in range(max_rounds):
        peak = max(range(len(held)), key=lambda r: (loads[r], -r))
        best = best_swap(held, weight, loads, peak, allowed)
        if best is None:
            return
        _, r, i, j = best
        a, b = held[peak][i], held[r][j]
        held[peak][i], held[r][j] = b, a
        loads[peak] += weight[b] - weight[a]
        loads[r] += weight[a] - weight[b]


def best_swap(
    held: list[list[int]],
    weight: Sequence[float],
    loads: Sequence[float],
    peak: int,
    allowed: Callable[[tuple[int, int, int, int]], bool] | None = None,
) -> tuple[float, int, int, int] | None:
    """(new pair peak, rank, slot on peak, slot on rank) of the best improving swap;
    `allowed((peak, slot, rank, slot))`, when given, vetoes swaps (node-aware placement)."""
    tolerance = 1e-12 * max(1.0, loads[peak])
    on_peak = set(held[peak])
    best = None
    for r, rank in enumerate(held):
        gap = loads[peak] - loads[r]
        if r == peak or gap <= tolerance:
            continue
        on_rank = set(rank)
        for i, a in enumerate(held[peak]):
            if a in on_rank:
                continue
            for j, b in enumerate(rank):
                moved = weight[a] - weight[b]
                if b in on_peak or not tolerance < moved < gap - tolerance:
                    continue
                new_peak = max(loads[peak] - moved, loads[r] + moved)
                if (best is None or new_peak < best[0]) and (
                    allowed is None or allowed((peak, i, r, j))
                ):
                    best = (new_peak, r, i, j)
    return best


def place_model(
    loads: Mapping[int, Sequence[float]] | None,
    num_experts: int,
    moe_layers: Sequence[int],
    ep: int,
    redundant: int = 0,
    placement: str = "balanced",
) -> dict[int, Placement]:
    """A Placement per MoE layer (global layer index). Without measured loads every expert
    counts 1 (uniform); with loads ({layer: E numbers}), every MoE layer must have one."""
    if loads is not None and not isinstance(loads, Mapping):
        raise InputError(
            f"loads is a {type(loads).__name__}; give a dict {{MoE layer index: [load per "
            "expert]} (as `reshard profile experts` writes it), or None for uniform"
        )
    if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Sequence):
        raise InputError(f"moe_layers is {moe_layers!r}; give a list of layer indices")
    if loads is not None:
        check_model_loads(loads, num_experts, moe_layers)
    uniform = [1.0] * num_experts
    return {
        layer: place_experts(
            uniform if loads is None else loads[layer], ep, redundant, placement=placement
        )
        for layer in moe_layers
    }


def check_model_loads(
    loads: Mapping[int, Sequence[float]], num_experts: int, moe_layers: Sequence[int]
) -> None:
    """Loads must describe exactly this model's MoE layers; a silent uniform fallback for a
    missing layer would hide a load file made for another model."""
    missing = sorted(set(moe_layers) - set(loads))
    extra = sorted(set(loads) - set(moe_layers))
    if missing or extra:
        raise InputError(
            f"expert loads cover layers {sorted(loads)[:4]}..., the model's MoE layers are "
            f"{list(moe_layers)[:4]}... (missing {missing[:4]}, extra {extra[:4]}); profile "
            "this model with `reshard profile experts`"
        )
    for layer in moe_layers:
        if len(loads[layer]) != num_experts:
            raise InputError(
                f"layer {layer} has loads for {len(loads[layer])} experts, the model has "
                f"{num_experts}; profile this model with `reshard profile experts`"
            )
