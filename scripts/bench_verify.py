"""Benchmark: `reshard verify --level hashes` and `--level weights` (whole processes) against a
plain Python xxh3 read of the same files, on the Llama-shaped bf16 checkpoint of
bench_convert.py converted to tp 4. Interleaved repeats, medians, peak RSS (VmHWM).

  hashes  vs  xxh3 of every output file                (the bytes the tier must hash)
  weights vs  xxh3 of every output file and the source (the bytes the tier must read)

    python scripts/bench_verify.py [--gb 1.0] [--repeats 5] [--workdir /tmp/reshard-bench-verify]
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
from bench_convert import RESHARD, build_checkpoint, cpu_name  # noqa: E402

# The plain read: 16 MiB blocks into one buffer, every file hashed whole.
XXH3 = """
import sys, xxhash
buf = memoryview(bytearray(16 << 20))
for name in sys.argv[1:]:
    h = xxhash.xxh3_128()
    with open(name, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    print(name, h.hexdigest())
print("PEAK_RSS_KB", int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]),
      file=sys.stderr)
"""


def run(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark command failed ({done.returncode}): {cmd}\n{done.stdout}{done.stderr}")
    return seconds, int(done.stderr.split("PEAK_RSS_KB")[1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench-verify"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src, out, py = args.workdir / "src", args.workdir / "out", sys.executable
    try:
        total = build_checkpoint(src, args.gb)
        run([py, "-c", RESHARD, "convert", str(src), "--tp", "4", "-o", str(out), "--quiet"])
        rank_files = sorted(str(p) for p in out.glob("rank-*.safetensors"))
        src_files = sorted(str(p) for p in src.glob("*.safetensors"))
        steps = {
            "xxh3 read of OUT": [py, "-c", XXH3, *rank_files],
            "verify --level hashes": [py, "-c", RESHARD, "verify", str(out), "--level", "hashes",
                                      "--quiet"],
            "xxh3 read of OUT + source": [py, "-c", XXH3, *rank_files, *src_files],
            "verify --level weights": [py, "-c", RESHARD, "verify", str(out), "--level",
                                       "weights", "--quiet"],
        }  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in steps}
        rss: dict[str, list[int]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds, peak = run(steps[name])
                times[name].append(seconds)
                rss[name].append(peak)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {cpu_name()}; checkpoint {total / 1e9:.2f} GB bf16 -> tp 4, warm page cache")
    print(f"medians of {args.repeats} interleaved whole-process runs (interpreter start to exit)")
    print(f"{'step':<28} {'median_s':>9} {'min_s':>7} {'ratio':>6} {'peak_RSS_MiB':>13}")
    base = {"verify --level hashes": "xxh3 read of OUT",
            "verify --level weights": "xxh3 read of OUT + source"}  # fmt: skip
    for name in names:
        ratio = med[name] / med[base[name]] if name in base else 1.0
        print(
            f"{name:<28} {med[name]:9.2f} {min(times[name]):7.2f} {ratio:6.2f} "
            f"{max(rss[name]) / 1024:13.0f}"
        )


if __name__ == "__main__":
    main()
