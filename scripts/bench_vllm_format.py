"""Benchmark: whole-process `reshard convert --format vllm` against the native format of the
same layout (tp 4 x pp 2 by default) on the same Llama-shaped bf16 checkpoint, in rounds that
alternate the two (first one, then the other), on a warm page cache. Prints the medians, the
vllm/native ratio and peak RSS; the issue asks for at most 1.1x.

    python scripts/bench_vllm_format.py [--gb 1] [--repeats 5] [--tp 4 --pp 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import RESHARD, build_checkpoint, cpu_name, run_once  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--pp", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reshard-bench-vllm-"))
    src = work / "src"
    total = build_checkpoint(src, args.gb)
    layout = ["--tp", str(args.tp), "--pp", str(args.pp)]
    out = work / "out"
    cmd = [sys.executable, "-c", RESHARD, "convert", str(src), *layout, "-o", str(out), "--quiet"]
    runs = {"native": cmd, "vllm": [*cmd, "--format", "vllm"]}
    results: dict[str, list] = {name: [] for name in runs}
    loads = []
    for r in range(args.repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            loads.append(os.getloadavg()[0])
            results[name].append(run_once(runs[name], out))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}")
    print(f"checkpoint: {total / 1e9:.2f} GB, convert {' '.join(layout)}, {args.repeats} rounds")
    print(f"load average before runs: median {statistics.median(loads):.1f}")
    base = statistics.median(s for s, _ in results["native"])
    for name, rows in results.items():
        secs = statistics.median(s for s, _ in rows)
        peak = max(k for _, k in rows) / 1024
        print(
            f"{name:8s} median {secs:6.2f} s  ({secs / base:.2f}x native)  peak RSS {peak:.0f} MiB"
        )


if __name__ == "__main__":
    main()
