"""Peak memory of verify's two references on the same checkpoint: `full` (the whole model in
memory) vs `streamed` (one layer at a time), each in a fresh process, read from VmHWM.

    python scripts/bench_reference_memory.py [--gb 1.0] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import build_checkpoint  # noqa: E402

RUN = """
import sys, time, torch
from reshard.runtime.generate import PromptResult
from reshard.runtime.launch import generate_reference
from reshard.runtime.streamed import reference_streamed
src, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [[(7 * i + j) % 32000 for j in range(length)] for i, length in enumerate((11, 3, 7, 16))]
start = time.perf_counter()
if mode == "full":
    generate_reference(src, prompts, n, device="cpu")
else:  # token values do not change the cost of a teacher-forced pass
    fake = [PromptResult(i, p, [1] * n, torch.zeros(0)) for i, p in enumerate(prompts)]
    reference_streamed(src, fake, device="cpu")
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(f"{hwm / 1024:.0f} {time.perf_counter() - start:.2f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench-ref"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    total = build_checkpoint(args.workdir / "src", args.gb)
    print(f"checkpoint: {total / 1e9:.2f} GB bf16 on disk; reference on cpu, 4 prompts, "
          f"{args.new_tokens} tokens")  # fmt: skip
    print("reference  peak_RSS_MiB  seconds")
    for mode in ("full", "streamed"):
        cmd = [sys.executable, "-c", RUN, str(args.workdir / "src"), mode, str(args.new_tokens)]
        rss, seconds = subprocess.run(
            cmd, capture_output=True, text=True, check=True
        ).stdout.split()
        print(f"{mode:<9}  {rss:>12}  {seconds:>7}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
