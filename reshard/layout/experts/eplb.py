"""DeepSeek's EPLB (github.com/deepseek-ai/EPLB, eplb.py, 2025), re-implemented on plain
lists as a baseline for reshard's own placement: replicate the hottest experts, then pack
physical experts onto GPUs heaviest-first; in hierarchical mode pack expert groups onto
nodes first. Written from the published algorithm, not copied; it may put two replicas
of one expert on one GPU, as the original does. One layer at a time; no I/O."""

from __future__ import annotations

from collections.abc import Sequence


def pack_balanced(weight: Sequence[float], num_packs: int) -> list[tuple[int, int]]:
    """(pack, index in pack) per item: heaviest first into the lightest pack that is not
    full, every pack taking len(weight) // num_packs items (EPLB's balanced_packing)."""
    per_pack = len(weight) // num_packs
    assert per_pack * num_packs == len(weight), "items must split evenly over packs"
    pack_weight = [0.0] * num_packs
    pack_items = [0] * num_packs
    out = [(0, 0)] * len(weight)
    for i in sorted(range(len(weight)), key=lambda i: (-weight[i], i)):
        open_packs = [p for p in range(num_packs) if pack_items[p] < per_pack]
        p = min(open_packs, key=lambda p: (pack_weight[p], p))
        out[i] = (p, pack_items[p])
        pack_weight[p] += weight[i]
        pack_items[p] += 1
    return out


def replicate(weight: Sequence[float], num_phy: int) -> tuple[list[int], list[int]]:
    """(phy2log, logcnt): one slot per expert, then each further slot to the expert with
    the highest load per replica (EPLB's replicate_experts; first max on ties)."""
    logcnt = [1] * len(weight)
    phy2log = list(range(len(weight)))
    for _ in range(num_phy - len(weight)):
        e = max(range(len(weight)), key=lambda e: (weight[e] / logcnt[e], -e))
        phy2log.append(e)
        logcnt[e] += 1
    return phy2log, logcnt


def rebalance_hierarchical(
    weight: Sequence[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[int]:
    """phy2log, GPU-major (GPU g holds slots g*k .. g*k+k-1). Groups of consecutive experts
    go to nodes, each node replicates and packs its own experts over its GPUs."""
    num_log = len(weight)
    group_size = num_log // num_groups
    per_node = num_log // num_nodes  # logical experts per node
    group_load = [sum(weight[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    node_of_group = pack_balanced(group_load, num_nodes)
    groups_per_node = num_groups // num_nodes
    mlog2log = [0] * num_log  # node-major expert order
    for g, (node, pos) in enumerate(node_of_group):
        start = (node * groups_per_node + pos) * group_size
        for j in range(group_size):
            mlog2log[start + j] = g * group_size + j
    phy2log: list[int] = []
    for node in range(num_nodes):
        experts = mlog2log[node * per_node : (node + 1) * per_node]
        phy2log += place_node(
            [weight[e] for e in experts], num_phy // num_nodes, num_gpus // num_nodes, experts
        )
    return phy2log


def place_node(
    weight: Sequence[float], num_phy: int, num_gpus: int, experts: Sequence[int]
) -> list[int]:
    """One node's slots, GPU-major: replicate, then pack equal-share replicas over GPUs."""
    phy2mlog, logcnt = replicate(weight, num_phy)
    share = [weight[m] / logcnt[m] for m in phy2mlog]
    per_gpu = num_phy // num_gpus
    slots = [0] * num_phy
    for phy, (gpu, pos) in enumerate(pack_balanced(share, num_gpus)):
        slots[gpu * per_gpu + pos] = experts[phy2mlog[phy]]
    return slots


def rebalance_experts(
    weight: Sequence[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[int]:
    """EPLB's entry point: hierarchical when groups split evenly over nodes, else global
    (the hierarchical algorithm with one group and one node)."""
    if num_groups % num_nodes == 0:
        return rebalance_hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus)
    return rebalance_hierarchical(weight, num_phy, 1, 1, num_gpus)


def count_duplicates(phy2log: Sequence[int], num_gpus: int) -> int:
    """Replicas that share a GPU with another replica of the same expert."""
    per_gpu = len(phy2log) // num_gpus
    gpus = [phy2log[g * per_gpu : (g + 1) * per_gpu] for g in range(num_gpus)]
    return sum(len(held) - len(set(held)) for held in gpus)
