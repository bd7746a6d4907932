"""Calibration: reshard's per-GPU memory model against vLLM's own memory-profile log lines.

For each published (model, tp, GPU) point, the settings that run used (vLLM version defaults,
stated per point) go into reshard's model, and its weights, non-torch memory, activation peak
and KV cache are printed next to the logged figures, in GiB as vLLM logs them. Needs no GPU
and reads only the example config.json files.

    python scripts/calibrate_memory.py [--markdown]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reshard.layout.gpus import GIB  # noqa: E402
from reshard.layout.memory.activation import (  # noqa: E402
    NON_TORCH_BYTES,
    EngineLimits,
    activation_peak_bytes,
)
from reshard.layout.memory.shapes import build_layout  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.plan import load_shapes  # noqa: E402


@dataclass(frozen=True)
class Point:
    name: str
    config: str  # folder under examples/configs
    tp: int
    gpu: str
    budget_gib: float  # total_gpu_memory x gpu_memory_utilization, as the log prints it
    tokens: int  # max_num_batched_tokens of that run
    seqs: int  # max_num_seqs of that run
    samples: bool  # the logged rank runs the sampler (V0: the driver rank only)
    published: dict  # GiB: weights, non_torch, activation, kv; None where not logged
    source: str
    settings: str  # why `tokens`, `seqs` and `samples`


POINTS = (
    Point(
        "Llama-3-8B",
        "llama-3-8b",
        1,
        "H100 80GB",
        71.29,
        8192,
        256,
        True,
        {"weights": 14.96, "non_torch": 1.79, "activation": 1.26, "kv": 53.29},
        "https://github.com/vllm-project/vllm/pull/10511 (comment 2024-12-14)",
        "V0, max_model_len 8192 so no chunked prefill: tokens = max(8192, 2048); "
        "max_num_seqs 256; the driver's lines",
    ),
    Point(
        "Llama-3-8B",
        "llama-3-8b",
        2,
        "H100 80GB",
        71.29,
        8192,
        256,
        True,
        {"weights": 7.48, "non_torch": 3.58, "activation": 1.26, "kv": 71.29 - 7.48 - 3.58 - 1.26},
        "https://github.com/vllm-project/vllm/pull/10511 (comment 2024-12-14)",
        "as above; the KV figure is the budget less the three logged terms (the excerpt "
        "stops before available_kv_cache_memory)",
    ),
    Point(
        "Llama-3.1-70B-Instruct",
        "llama-3.1-70b-instruct",
        8,
        "H200",
        139.72 * 0.95,
        2048,
        256,
        False,
        {"weights": None, "torch_peak": 16.53, "non_torch": 5.68, "kv": 110.52},
        "https://github.com/vllm-project/vllm/issues/10702",
        "V0 0.6.4, gpu_memory_utilization 0.95, max_model_len 131072 turns chunked prefill "
        "on: tokens 2048 (SchedulerConfig default); VllmWorkerProcess lines, which do not "
        "sample; peak_torch_memory = weights + activation",
    ),
    Point(
        "DeepSeek-R1-Distill-Qwen-14B",
        "deepseek-r1-distill-qwen-14b",
        2,
        "RTX 4090",
        23.08,
        2048,
        256,
        False,
        {"weights": 13.9476, "non_torch": 0.25, "activation": 0.19, "kv": 8.69},
        "https://github.com/vllm-project/vllm/issues/13061",
        "V0 0.7, gpu_memory_utilization 0.98 of 23.55 GiB, max_model_len 131072: chunked "
        "prefill, tokens 2048; the quoted line is a worker's (its KV exceeds the engine's "
        "below), which does not sample",
    ),
    Point(
        "DeepSeek-R1-Distill-Qwen-14B (driver)",
        "deepseek-r1-distill-qwen-14b",
        2,
        "RTX 4090",
        23.08,
        2048,
        256,
        True,
        {
            "weights": 13.9476,
            "non_torch": 0.25,
            # the engine's KV: "maximum number of tokens that can be stored in KV cache
            # (81536)" x 98304 B a token (48 layers x 4 kv heads x 128 x K,V x bf16)
            "kv": 81536 * 98304 / 2**30,
            # the rest of the budget, with the worker's non-torch figure
            "activation": 23.08 - 13.9476 - 0.25 - 81536 * 98304 / 2**30,
        },
        "https://github.com/vllm-project/vllm/issues/13061",
        "as above; the driver rank samples and holds the least KV cache, which the engine "
        "uses: its KV and activation are derived from the error's 81536 tokens",
    ),
)


@dataclass(frozen=True)
class Prediction:
    weights: float  # GiB
    non_torch: float
    activation: float
    forward: float  # activation without the sampler
    kv: float


def predict(point: Point) -> Prediction:
    shapes = load_shapes(str(ROOT / "examples" / "configs" / point.config))
    hp = shapes.hparams
    plan = build_layout(shapes, build_recipe(tp=point.tp))
    weights = max(sum(f.nbytes for f in plan.files if f.rank == r) for r in range(point.tp))
    limits = EngineLimits(point.tokens, point.seqs)
    layers = range(hp.num_layers)

    def peak(head: bool) -> int:
        return activation_peak_bytes(hp, layers, point.tp, head=head, limits=limits, dtype_bytes=2)

    activation = peak(point.samples)
    kv = point.budget_gib * GIB - weights - NON_TORCH_BYTES - activation
    return Prediction(
        weights / GIB, NON_TORCH_BYTES / GIB, activation / GIB, peak(False) / GIB, kv / GIB
    )


def error(ours: float, theirs: float | None) -> str:
    if theirs is None:
        return "-"
    return f"{(ours - theirs) / theirs:+.0%}"


def rows() -> list[list[str]]:
    out = []
    for p in POINTS:
        pr, pub = predict(p), p.published
        if pub.get("weights") is None:  # only weights + activation were logged
            act = f"{pr.weights + pr.activation:.2f} / {pub['torch_peak']:.2f} (w+a)"
            act_err = error(pr.weights + pr.activation, pub["torch_peak"])
            weights = f"{pr.weights:.2f} / -"
        else:
            act = f"{pr.activation:.2f} / {pub['activation']:.2f}"
            act_err = error(pr.activation, pub["activation"])
            weights = f"{pr.weights:.2f} / {pub['weights']:.2f}"
        out.append(
            [
                f"{p.name} tp {p.tp}, {p.gpu}",
                weights,
                f"{pr.non_torch:.2f} / {pub['non_torch']:.2f}",
                f"{act} {act_err}",
                f"{pr.kv:.2f} / {pub['kv']:.2f} {error(pr.kv, pub['kv'])}",
                f"{pr.forward:.2f}",
            ]
        )
    return out


HEADER = [
    "point",
    "weights GiB ours / vLLM",
    "non-torch",
    "activation peak",
    "KV cache",
    "forward only",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    table = rows()
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
        for row in [HEADER, *table]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for i, p in enumerate(POINTS, 1):
        print(f"[{i}] {p.name} tp {p.tp}: {p.source}; {p.settings}")


if __name__ == "__main__":
    main()
