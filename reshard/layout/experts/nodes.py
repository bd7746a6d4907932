"""Node-aware expert placement: when the router picks experts by group (DeepSeek's n_group /
topk_group), keep each group's replicas on one node, so a token that picked a group sends
to one node for it, as EPLB's hierarchical mode does, but with reshard's packing (never two
replicas on one GPU) and only where it costs little balance. Pure functions, no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reshard.errors import LayoutError
from reshard.layout.experts.place import (
    Placement,
    check_model_loads,
    place_experts,
    replica_counts,
    swap_replicas,
)


@dataclass(frozen=True)
class NodeLayout:
    """ep ranks in nodes of gpus_per_node consecutive ranks; experts in num_groups groups
    of consecutive ids (DeepSeek-V3: 8 groups of 32)."""

    ep: int
    gpus_per_node: int
    num_groups: int

    @property
    def num_nodes(self) -> int:
        return self.ep // self.gpus_per_node


def check_node_layout(nodes: NodeLayout, num_experts: int, redundant: int) -> None:
    """Raise LayoutError, with the numbers and a fix, unless groups split evenly over nodes
    and each node can hold its own share of the redundant slots."""
    n, g = nodes.num_nodes, nodes.num_groups
    if nodes.gpus_per_node < 1 or nodes.ep % nodes.gpus_per_node:
        raise LayoutError(
            f"gpus_per_node={nodes.gpus_per_node} does not divide ep={nodes.ep}; use a divisor "
            "of ep (ranks fill nodes in order)"
        )
    if g < 1 or num_experts % g or g % n:
        raise LayoutError(
            f"{num_experts} experts in {g} groups over {n} nodes: groups must split evenly "
            f"into experts and over nodes; use gpus_per_node so that ep/gpus_per_node divides {g}"
        )
    per_node = (num_experts + redundant) // n
    if redundant % n or per_node % nodes.gpus_per_node:
        raise LayoutError(
            f"redundant={redundant} does not split evenly over {n} nodes of "
            f"{nodes.gpus_per_node} GPUs; use a multiple of {n} with (E+R) divisible by ep"
        )


def place_on_nodes(load: Sequence[float], nodes: NodeLayout, redundant: int) -> Placement:
    """Groups onto nodes heaviest-first (lightest node with room), then each node places its
    own experts and R / nodes redundant slots over its GPUs with the balanced placement."""
    num_experts = len(load)
    check_node_layout(nodes, num_experts, redundant)
    size = num_experts // nodes.num_groups
    group_load = [sum(load[g * size : (g + 1) * size]) for g in range(nodes.num_groups)]
    node_groups = pack_groups(group_load, nodes.num_nodes)
    phy2log: list[int] = []
    for groups in node_groups:
        experts = [g * size + j for g in groups for j in range(size)]
        local = place_experts(
            [load[e] for e in experts], nodes.gpus_per_node, redundant // nodes.num_nodes
        )
        phy2log += [experts[m] for m in local.phy2log]
    return Placement.from_phy2log(phy2log, nodes.ep, num_experts)


def pack_groups(group_load: Sequence[float], num_nodes: int) -> list[list[int]]:
    """Group ids per node: heaviest group first onto the lightest node not yet full."""
    per_node = len(group_load) // num_nodes
    held: list[list[int]] = [[] for _ in range(num_nodes)]
    node_load = [0.0] * num_nodes
    for g in sorted(range(len(group_load)), key=lambda g: (-group_load[g], g)):
        n = min((n for n in range(num_nodes) if len(held[n]) < per_node), key=node_load.__getitem__)
        held[n].append(g)
        node_load[n] += group_load[g]
    return held


def place_node_aware(
    load: Sequence[float], nodes: NodeLayout, redundant: int, *, max_loss: float = 0.01
) -> tuple[Placement, str]:
    """(placement, kind): the first of "grouped" (whole groups per node), "homed" (one
    replica of every expert on its group's node, extra replicas anywhere) and "flat" (the
    global balanced placement) whose balancedness is within `max_loss` of flat's."""
    flat = place_experts(load, nodes.ep, redundant)
    floor = score(flat, load) - max_loss
    grouped = place_on_nodes(load, nodes, redundant)
    if score(grouped, load) >= floor:
        return grouped, "grouped"
    homed = place_homed(load, nodes, redundant, grouped)
    if homed is not None and score(homed, load) >= floor:
        return homed, "homed"
    return flat, "flat"


def place_homed(
    load: Sequence[float], nodes: NodeLayout, redundant: int, grouped: Placement
) -> Placement | None:
    """Every expert keeps one replica on the node `grouped` gave its group; the other
    replicas take the least-loaded ranks anywhere; then swaps that keep that rule.
    None when the greedy pass cannot complete (the caller falls back to flat)."""
    per_node = grouped.slots_per_rank * nodes.gpus_per_node
    home = [grouped.log2phy[e][0] // per_node for e in range(len(load))]
    counts = replica_counts(load, len(load) + redundant, max_replicas=nodes.ep)
    weight = [load[e] / counts[e] for e in range(len(load))]
    held = pack_homed(weight, counts, home, nodes, grouped.slots_per_rank)
    if held is None:
        return None
    swap_homed(held, weight, home, nodes.gpus_per_node)
    return Placement.from_phy2log([e for rank in held for e in rank], nodes.ep, len(load))


def pack_homed(
    weight: Sequence[float],
    counts: Sequence[int],
    home: Sequence[int],
    nodes: NodeLayout,
    slots_per_rank: int,
) -> list[list[int]] | None:
    """Heaviest expert first: one replica on the lightest free rank of its home node, the
    rest on the lightest free ranks elsewhere, keeping room for homes still to come."""
    gpn = nodes.gpus_per_node
    free = [slots_per_rank] * nodes.ep
    loads = [0.0] * nodes.ep
    held: list[list[int]] = [[] for _ in range(nodes.ep)]
    waiting = [home.count(n) for n in range(nodes.num_nodes)]  # homes not yet placed
    for e in sorted(range(len(weight)), key=lambda e: (-weight[e], e)):
        waiting[home[e]] -= 1
        node_ranks = range(home[e] * gpn, (home[e] + 1) * gpn)
        first = [r for r in node_ranks if free[r]]
        if not first:
            return None
        chosen = [min(first, key=lambda r: (loads[r], r))]
        for _ in range(counts[e] - 1):
            node_free = [
                sum(free[r] for r in range(n * gpn, (n + 1) * gpn)) for n in range(nodes.num_nodes)
            ]
            node_free[home[e]] -= 1
            spare = [
                r
                for r in range(nodes.ep)
                if free[r] and r not in chosen and node_free[r // gpn] > waiting[r // gpn]
            ]
            if not spare:
                return None
            chosen.append(min(spare, key=lambda r: (loads[r], r)))
        for r in chosen:
            free[r] -= 1
            loads[r] += weight[e]
            held[r].append(e)
    return held


def swap_homed(
    held: list[list[int]], weight: Sequence[float], home: Sequence[int], gpn: int
) -> None:
    """swap_replicas' local search, allowing only swaps after which every expert still has
    a replica on its home node."""
    swap_replicas(held, weight, allowed=lambda move: keeps_home(held, home, gpn, move))


def keeps_home(held, home, gpn, move) -> bool:
    """After swapping held[p][i] with held[r][j], do both experts keep a home replica?"""
    p, i, r, j = move
    if p // gpn == r // gpn:
        return True
    for e, leaving in ((held[p][i], p), (held[r][j], r)):
        if leaving // gpn != home[e]:
            continue
        node = range(home[e] * gpn, (home[e] + 1) * gpn)
        if not any(e in held[q] for q in node if q != leaving):
            return False
    return True


def score(placement: Placement, load: Sequence[float]) -> float:
    loads = placement.rank_load(load)
    peak = max(loads)
    return 1.0 if peak == 0 else sum(loads) / len(loads) / peak


def cross_node_share(phy2log: Sequence[int], load: Sequence[float], nodes: NodeLayout) -> float:
    """Share of routed tokens served off their group's home node (the node serving most
    of the group's tokens), each expert's tokens split evenly over its replicas.

    Model: with grouped routing a token that picks a group sends its hidden state to that
    group's home node once; each visit served on another node is an extra inter-node send.
    0 when every group lives on one node; about 1 - 1/nodes when groups are scattered.
    Takes phy2log (GPU-major slots) so maps with duplicates on a GPU (EPLB's) score too."""
    total = sum(load)
    if total == 0:
        return 0.0
    size = len(load) // nodes.num_groups
    per_node = len(phy2log) // nodes.num_nodes
    count = [0] * len(load)
    for e in phy2log:
        count[e] += 1
    served = [[0.0] * nodes.num_nodes for _ in range(nodes.num_groups)]
    for slot, e in enumerate(phy2log):
        served[e // size][slot // per_node] += load[e] / count[e]
    return sum(sum(row) - max(row) for row in served) / total


def place_model_on_nodes(
    loads: Mapping[int, Sequence[float]] | None,
    num_experts: int,
    moe_layers: Sequence[int],
    nodes: NodeLayout,
    redundant: int,
) -> dict[int, Placement]:
    """place_node_aware per MoE layer; uniform load when none was measured."""
    if loads is not None:
        check_model_loads(loads, num_experts, moe_layers)
    uniform = [1.0] * num_experts
    return {
        layer: place_node_aware(uniform if loads is None else loads[layer], nodes, redundant)[0]
        for layer in moe_layers
    }


@dataclass(frozen=True)
class NodeReport:
    """Balanced vs node-aware placement with nodes of `gpus_per_node` GPUs: balancedness
    (sum figure) and the share of routed tokens served off their group's home node, on
    held-out load when there is one, else on calibration. `kinds`: layers per outcome of
    place_node_aware (grouped / homed / flat)."""

    gpus_per_node: int
    num_groups: int
    redundant: int
    on: str
    balance_before: float
    balance_after: float
    cross_before: float
    cross_after: float
    kinds: tuple[tuple[str, int], ...]


def report_nodes(
    loads: Mapping[int, Sequence[float]],
    heldout: Mapping[int, Sequence[float]] | None,
    nodes: NodeLayout,
    redundant: int,
) -> NodeReport:
    """Score balanced against node-aware placement (both built from calibration)."""
    layers = sorted(loads)
    score_on = heldout or loads
    before = {k: place_experts(loads[k], nodes.ep, redundant) for k in layers}
    chosen = {k: place_node_aware(loads[k], nodes, redundant) for k in layers}
    after = {k: p for k, (p, _) in chosen.items()}
    tokens = sum(sum(score_on[k]) for k in layers) or 1

    def cross(placed: Mapping[int, Placement]) -> float:
        return (
            sum(
                cross_node_share(placed[k].phy2log, score_on[k], nodes) * sum(score_on[k])
                for k in layers
            )
            / tokens
        )

    def balance(placed: Mapping[int, Placement]) -> float:
        means = sum(sum(placed[k].rank_load(score_on[k])) / nodes.ep for k in layers)
        peaks = sum(max(placed[k].rank_load(score_on[k])) for k in layers)
        return 1.0 if peaks == 0 else means / peaks

    kinds = Counter(kind for _, kind in chosen.values())
    return NodeReport(
        gpus_per_node=nodes.gpus_per_node,
        num_groups=nodes.num_groups,
        redundant=redundant,
        on="held-out" if heldout else "calibration",
        balance_before=balance(before),
        balance_after=balance(after),
        cross_before=cross(before),
        cross_after=cross(after),
        kinds=tuple(sorted(kinds.items())),
    )


def format_node_report(nodes: NodeReport) -> list[str]:
    kinds = ", ".join(f"{n} {kind}" for kind, n in nodes.kinds)
    return [
        f"nodes of {nodes.gpus_per_node} GPUs, {nodes.num_groups} expert groups, "
        f"R={nodes.redundant}, on {nodes.on} load (layers: {kinds})",
        f"  tokens served off their group's node: balanced {nodes.cross_before:.1%} -> "
        f"node-aware {nodes.cross_after:.1%}",
        f"  balancedness (sum): balanced {nodes.balance_before:.4f} -> node-aware "
        f"{nodes.balance_after:.4f}",
    ]
