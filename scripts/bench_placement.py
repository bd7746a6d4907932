"""Balanced vs contiguous expert placement on a synthetic DeepSeek-V3-like load: 256 routed
experts, MoE layers 3..60 (58), EP 32, 0 and 32 redundant slots. Each layer draws expert
popularity from a lognormal (skew varies by layer); calibration and held-out token counts
are that popularity times independent noise. Prints the report table; reads no checkpoint.

    PYTHONPATH=. python scripts/bench_placement.py [--seed 0] [--noise 0.15]   # repo root
"""

from __future__ import annotations

import argparse
import random
import time

from reshard.expert_report import format_placement_report, report_placement

NUM_EXPERTS = 256
MOE_LAYERS = range(3, 61)  # DeepSeek-V3: first_k_dense_replace = 3, 61 decoder layers
EP = 32
TOP_K = 8
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


def make_loads(seed: int, noise: float) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    rng = random.Random(seed)
    calib, heldout = {}, {}
    for layer in MOE_LAYERS:
        popularity = draw_popularity(rng)
        calib[layer] = draw_counts(rng, popularity, 200_000, noise)
        heldout[layer] = draw_counts(rng, popularity, 50_000, noise)
    return calib, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.15, help="calibration/held-out spread")
    args = parser.parse_args()
    calib, heldout = make_loads(args.seed, args.noise)
    start = time.perf_counter()
    report = report_placement(
        calib,
        heldout,
        ep=EP,
        redundant=(0, 32),
        placements=("contiguous", "balanced"),
        bytes_per_expert=BYTES_PER_EXPERT,
    )
    seconds = time.perf_counter() - start
    print(format_placement_report(report))
    print(
        f"seed={args.seed} noise={args.noise}; placed and scored 4 x 58 layers in {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
