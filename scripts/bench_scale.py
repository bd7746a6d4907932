"""Scale figure: a ~16 GB slice of Llama-3-70B (its real dimensions, the first layers, random
bytes; scripts/make_llama_slice.py) converted to tp 8 x pp 2 and verified (hashes, weights),
each step a whole process with its wall time, throughput and peak RSS (VmHWM), against
`cp -r` + `sync` of the same checkpoint in the same run.

    python scripts/bench_scale.py [--gb 16] [--workdir /tmp/reshard-scale] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_convert import RESHARD, cpu_name  # noqa: E402

MAKE = HERE / "make_llama_slice.py"


def run(cmd: list[str]) -> tuple[float, int | None, str]:
    """Wall seconds, peak RSS in KiB (reshard steps report VmHWM), stdout."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"step failed ({done.returncode}): {cmd}\n{done.stdout}\n{done.stderr}")
    peak = done.stderr.split("PEAK_RSS_KB")[1].split()[0] if "PEAK_RSS_KB" in done.stderr else None
    return seconds, int(peak) if peak else None, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=16.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for a rerun")
    ap.add_argument("--config", type=Path, help="another model's dimensions (default 70B)")
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    src, out, copy = work / "src", work / "out", work / "copy"
    for folder in (out, copy):
        shutil.rmtree(folder, ignore_errors=True)
    steps: list[tuple[str, list[str]]] = []
    if not (src / "model.safetensors.index.json").is_file():
        make = [py, str(MAKE), str(src), "--gb", str(args.gb)]
        make += ["--config", str(args.config)] if args.config else []
        steps.append(("generate (make_llama_slice)", make))
    steps += [
        ("cp -r + sync", ["sh", "-c", f"cp -r '{src}' '{copy}' && sync"]),
        ("convert tp 8 x pp 2", [py, "-c", RESHARD, "convert", str(src), "--tp", "8", "--pp",
                                 "2", "-o", str(out), "--quiet"]),
        ("verify --level hashes", [py, "-c", RESHARD, "verify", str(out), "--level", "hashes",
                                   "--quiet"]),
        ("verify --level weights", [py, "-c", RESHARD, "verify", str(out), "--level",
                                    "weights", "--quiet"]),
    ]  # fmt: skip
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        for name, cmd in steps:
            seconds, peak, stdout = run(cmd)
            if name.startswith("cp"):
                shutil.rmtree(copy)
            if name.startswith("verify") and "PASS" not in stdout:
                sys.exit(f"{name} did not pass:\n{stdout}")
            rows.append((name, seconds, peak))
            print(f"  {name}: {seconds:.1f} s", flush=True)
        total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]
        gb = total["total_size"] / 1e9
        cfg = json.loads((src / "config.json").read_text())
        cp = next(s for n, s, _ in rows if n.startswith("cp"))
        dims = args.config.name if args.config else "Llama-3-70B"
        print(f"\n{gb:.2f} GB bf16: {dims} dimensions, {cfg['num_hidden_layers']} layers; "
              f"load {os.getloadavg()[0]:.1f} after")  # fmt: skip
        print(f"{'step':<28} {'seconds':>8} {'GB/s':>6} {'x cp':>6} {'peak_RSS_MiB':>13}")
        for name, seconds, peak in rows:
            rss = f"{peak / 1024:.0f}" if peak else "-"
            print(f"{name:<28} {seconds:8.1f} {gb / seconds:6.2f} {seconds / cp:6.2f} {rss:>13}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
