"""Expert placement on a synthetic DeepSeek-V3-like load: 256 routed experts in 8 groups,
MoE layers 3..60 (58), EP 32 (4 nodes of 8 GPUs), R = 0 and 32 redundant slots. Each layer
draws expert popularity from a lognormal (skew varies by layer); calibration and held-out
token counts are that popularity times independent noise. Scores reshard's placements,
DeepSeek's EPLB (re-implemented in reshard/eplb.py from github.com/deepseek-ai/EPLB) and
two oracles on calibration and held-out load. Reads no checkpoint.

    PYTHONPATH=. python scripts/bench_placement.py [--seed 0] [--noise 0.15] [--layers]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from reshard.layout.experts.eplb import count_duplicates, rebalance_experts
from reshard.layout.experts.nodes import (
    NodeLayout,
    cross_node_share,
    place_node_aware,
    place_on_nodes,
)
from reshard.layout.experts.place import place_experts
from reshard.layout.experts.report import (
    format_placement_report,
    overall_balancedness,
    report_placement,
)
from reshard.layout.experts.robust import place_robust

NUM_EXPERTS = 256
MOE_LAYERS = range(3, 61)  # DeepSeek-V3: first_k_dense_replace = 3, 61 decoder layers
EP = 32
TOP_K = 8
NODES = NodeLayout(ep=EP, gpus_per_node=8, num_groups=8)  # DeepSeek-V3: n_group = 8
# One expert of DeepSeek-V3 in fp8: gate, up, down of 7168 x 2048 (block scales ignored).
BYTES_PER_EXPERT = 3 * 7168 * 2048


def draw_popularity(rng: random.Random) -> list[float]:
    """Expert popularity of one layer; sigma 0.8-1.4 spans mildly to strongly skewed layers."""
    sigma = rng.uniform(0.8, 1.4)
    weights = [rng.lognormvariate(0.0, sigma) for _ in range(NUM_EXPERTS)]
    total = sum(weights)
    return [w / total for w in weights]


def draw_counts(
    rng: random.Random, popularity: list[float], tokens: int, noise: float
) -> list[int]:
    """Routed-token counts: each of `tokens` tokens visits TOP_K experts; `noise` is the
    lognormal spread between prompt sets (domain shift), on top of the shared popularity."""
    return [round(tokens * TOP_K * p * rng.lognormvariate(0.0, noise)) for p in popularity]


def make_loads(seed: int, noise: float) -> tuple[dict, dict, dict]:
    """(popularity, calibration, held-out) per MoE layer, in the draw order of earlier runs."""
    rng = random.Random(seed)
    popularity, calib, heldout = {}, {}, {}
    for layer in MOE_LAYERS:
        popularity[layer] = draw_popularity(rng)
        calib[layer] = draw_counts(rng, popularity[layer], 200_000, noise)
        heldout[layer] = draw_counts(rng, popularity[layer], 50_000, noise)
    return popularity, calib, heldout


def rank_loads(phy2log: Sequence[int], load: Sequence[float]) -> list[float]:
    """Tokens per GPU, each expert's tokens split evenly over its replicas (duplicates on
    one GPU allowed, for EPLB)."""
    count = [0] * len(load)
    for e in phy2log:
        count[e] += 1
    per_gpu = len(phy2log) // EP
    return [
        sum(load[e] / count[e] for e in phy2log[g * per_gpu : (g + 1) * per_gpu]) for g in range(EP)
    ]


def shrink(load: Sequence[float], alpha: float) -> list[float]:
    """Load pulled toward the layer mean by `alpha` (0 = as measured)."""
    mean = sum(load) / len(load)
    return [(1 - alpha) * x + alpha * mean for x in load]


def strategies(popularity: dict, heldout: dict) -> dict[str, Callable]:
    """name -> (layer, calibration load) -> phy2log."""
    phy = 256 + 32

    def balanced(r: int) -> Callable:
        return lambda k, x: place_experts(x, EP, r).phy2log

    return {
        "contiguous R=0": lambda k, x: place_experts(x, EP, 0, placement="contiguous").phy2log,
        "balanced R=0": balanced(0),
        "contiguous R=32": lambda k, x: place_experts(x, EP, 32, placement="contiguous").phy2log,
        "balanced R=32 (current)": balanced(32),
        "robust R=32 penalty 0.2": lambda k, x: place_robust(x, EP, 32, penalty=0.2).phy2log,
        "robust R=32 penalty 0.4": lambda k, x: place_robust(x, EP, 32, penalty=0.4).phy2log,
        "robust R=32 penalty 0.8": lambda k, x: place_robust(x, EP, 32, penalty=0.8).phy2log,
        "shrunk 0.05 + balanced R=32": lambda k, x: place_experts(shrink(x, 0.05), EP, 32).phy2log,
        "node-aware R=32 (loss<=0.01)": lambda k, x: place_node_aware(x, NODES, 32)[0].phy2log,
        "node-aware R=32 (loss<=0.02)": lambda k, x: (
            place_node_aware(x, NODES, 32, max_loss=0.02)[0].phy2log
        ),
        "groups on nodes R=32 (strict)": lambda k, x: place_on_nodes(x, NODES, 32).phy2log,
        "EPLB global R=32": lambda k, x: rebalance_experts(x, phy, 1, 1, EP),
        "EPLB hierarchical R=32": lambda k, x: rebalance_experts(x, phy, 8, 4, EP),
        "oracle: true popularity R=32": lambda k, x: place_experts(popularity[k], EP, 32).phy2log,
        "oracle: held-out itself R=32": lambda k, x: place_experts(heldout[k], EP, 32).phy2log,
    }


def score(name: str, place: Callable, calib: dict, heldout: dict) -> str:
    start = time.perf_counter()
    placed = {k: place(k, calib[k]) for k in calib}
    seconds = time.perf_counter() - start
    cal = overall_balancedness([rank_loads(placed[k], calib[k]) for k in calib])
    held = overall_balancedness([rank_loads(placed[k], heldout[k]) for k in calib])
    dups = sum(count_duplicates(placed[k], EP) > 0 for k in calib)
    tokens = sum(sum(heldout[k]) for k in calib)
    cross = sum(cross_node_share(placed[k], heldout[k], NODES) * sum(heldout[k]) for k in calib)
    crossing = f"{cross / tokens:.3f}"
    return (
        f"{name:<31} {cal[0]:>7.4f} {held[0]:>7.4f} {cal[1]:>7.4f} {held[1]:>7.4f} "
        f"{dups:>5} {crossing:>6} {seconds:>6.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.15, help="calibration/held-out spread")
    parser.add_argument("--layers", action="store_true", help="also print the per-layer table")
    args = parser.parse_args()
    popularity, calib, heldout = make_loads(args.seed, args.noise)
    print(
        f"E=256 in 8 groups, ep={EP} ({NODES.num_nodes} nodes x {NODES.gpus_per_node}), 58 MoE "
        f"layers, seed={args.seed} noise={args.noise}"
    )
    print("balancedness = mean/max tokens per GPU; mean = over layers, sum = sum of means / sum")
    print("of maxima; dup = layers with two replicas of an expert on one GPU; cross = share of")
    print("held-out routed tokens served off their expert group's home node (grouped routing)")
    columns = ("calib", "held", "calib", "held")
    print(
        f"{'placement':<31} "
        + " ".join(f"{c:>7}" for c in columns)
        + f" {'dup':>5} {'cross':>6} {'s':>6}"
    )
    print(f"{'':<31} {'mean':>7} {'mean':>7} {'sum':>7} {'sum':>7}")
    for name, place in strategies(popularity, heldout).items():
        print(score(name, place, calib, heldout), flush=True)
    if args.layers:
        report = report_placement(
            calib, heldout, ep=EP, redundant=(0, 32), bytes_per_expert=BYTES_PER_EXPERT
        )
        print(format_placement_report(report))


if __name__ == "__main__":
    main()
