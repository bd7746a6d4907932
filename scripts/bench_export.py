"""Benchmark: `reshard export` and a re-layout from a reshard output, against `reshard convert`
from the HF checkpoint, on the Llama-shaped bf16 checkpoint of bench_convert.py.

Interleaved repeats of four whole processes (the order rotates from round to round), medians,
ratios against convert in the same run, and the peak RSS (VmHWM) of each:
  convert  HF -> tp 4            (the baseline; its output is the source of the next two)
  export   tp 4 -> HF            (`reshard export`)
  relayout tp 4 -> tp 2          (`reshard convert OUT --tp 2`)
  convert  HF -> tp 2            (what the re-layout replaces)

    python scripts/bench_export.py [--gb 1.0] [--repeats 5] [--workdir /tmp/reshard-bench-export]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import RESHARD, build_checkpoint  # noqa: E402


def run(args: list[str]) -> tuple[float, int]:
    """Seconds of the whole process and its peak RSS in KiB."""
    subprocess.run(["sync"], check=True)  # start from no dirty pages
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RESHARD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark command failed ({done.returncode}): {args}\n{done.stderr}")
    return seconds, int(done.stderr.split("PEAK_RSS_KB")[1].split()[0])


def bench(src: Path, work: Path, repeats: int) -> dict[str, tuple[float, float]]:
    out = work / "tp4"
    steps = {
        "convert HF -> tp4": ["convert", str(src), "--tp", "4", "-o", str(out), "--quiet"],
        "export tp4 -> HF": ["export", str(out), "-o", str(work / "hf")],
        "relayout tp4 -> tp2": [
            "convert",
            str(out),
            "--tp",
            "2",
            "-o",
            str(work / "re"),
            "--quiet",
        ],
        "convert HF -> tp2": [
            "convert",
            str(src),
            "--tp",
            "2",
            "-o",
            str(work / "direct"),
            "--quiet",
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    rss: dict[str, list[int]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        # the tp 4 output feeds export and re-layout: convert tp4 stays first in every round
        rest = names[1:]
        for name in [names[0], *rest[r % 3 :], *rest[: r % 3]]:
            args = steps[name]
            seconds, peak = run(args)
            times[name].append(seconds)
            rss[name].append(peak)
        for folder in ("hf", "re", "direct", "tp4"):
            shutil.rmtree(work / folder)
    return {k: (statistics.median(times[k]), max(rss[k]) / 1024) for k in steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench-export"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "src"
    total = build_checkpoint(src, args.gb)
    results = bench(src, args.workdir, args.repeats)
    base = results["convert HF -> tp4"][0]
    print(f"checkpoint {total / 1e9:.2f} GB bf16; medians of {args.repeats} interleaved runs,")
    print("whole processes (interpreter start to exit), bytes fsynced; x tp4 / x tp2: ratio to")
    print("convert HF -> tp4 / HF -> tp2 (the convert writing the same files as the re-layout)")
    print("step                  seconds  x tp4  x tp2  peak_RSS_MiB")
    tp2 = results["convert HF -> tp2"][0]
    for name, (seconds, peak) in results.items():
        print(
            f"{name:20s}  {seconds:7.2f}  {seconds / base:5.2f}  {seconds / tp2:5.2f}  {peak:12.0f}"
        )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
