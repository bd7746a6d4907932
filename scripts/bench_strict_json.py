"""What the strict header JSON reader costs against Python's plain json.loads on the same
bytes: a synthetic MoE-sized header (100,000 tensors, ~13 MB). Interleaved repeats, medians.

    python scripts/bench_strict_json.py [--tensors 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

from reshard.strict_json import load_json


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return name


def header(tensors: int) -> bytes:
    doc = {
        f"model.layers.{i // 64}.mlp.experts.{i % 64}.gate_proj.weight": {
            "dtype": "BF16",
            "shape": [1536, 4096],
            "data_offsets": [i * 100, i * 100 + 100],
        }  # fmt: skip
        for i in range(tensors)
    }
    return json.dumps(doc).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    raw = header(args.tensors)
    plain, strict = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        json.loads(raw)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_json(raw, "bench", what="the header", fix="")
        strict.append(time.perf_counter() - start)
    p, s = statistics.median(plain), statistics.median(strict)
    print(f"machine: {machine()}")
    print(f"header: {args.tensors} tensors, {len(raw) / 1e6:.1f} MB, {args.repeats} repeats")
    print(f"json.loads  median {p:.3f} s")
    print(f"load_json   median {s:.3f} s  ({s / p:.2f}x json.loads)")


if __name__ == "__main__":
    main()
