"""Benchmark: whole-process `reshard convert --format vllm` against the native format of the
same layout (tp 4 x pp 2 by default) on the same Llama-shaped bf16 checkpoint, in rounds that
alternate the two (first one, then the other), on a warm page cache. Prints the medians, the
vllm/native ratio and peak RSS; the issue asks for at most 1.1x.

`--model gpt-oss`: gpt-oss-120b's real dimensions (hidden 2880, experts 2880 wide, 64 heads)
with fewer layers, experts and vocab rows to fit --gb, in bf16: the vLLM format then writes
every expert transposed (reshard/io/transposed.py), which the native format copies as runs.
Transposing needs torch, whose import the native format never pays: the script also times
`python -c "import torch"` alone, a fixed cost that a 100 GB checkpoint does not notice.

    python scripts/bench_vllm_format.py [--gb 1] [--repeats 5] [--tp 4 --pp 2] [--model gpt-oss]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # reshard, when not installed

from bench_convert import RESHARD, build_checkpoint, cpu_name, run_once, write_shards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--model", choices=("llama", "gpt-oss"), default="llama")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reshard-bench-vllm-"))
    src = work / "src"
    total = (build_gpt_oss if args.model == "gpt-oss" else build_checkpoint)(src, args.gb)
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
    shutil.rmtree(work)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}")
    print(
        f"checkpoint: {args.model}, {total / 1e9:.2f} GB, convert {' '.join(layout)}, "
        f"{args.repeats} rounds"
    )
    print(f"load average before runs: median {statistics.median(loads):.1f}")
    if args.model == "gpt-oss":
        imports = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            imports.append(time.perf_counter() - start)
        print(f"python -c 'import torch' alone: median {statistics.median(imports):.2f} s")
    base = statistics.median(row[0] for row in results["native"])
    for name, rows in results.items():
        secs = statistics.median(row[0] for row in rows)
        peak = max(row[1] for row in rows) / 1024
        print(
            f"{name:8s} median {secs:6.2f} s  ({secs / base:.2f}x native)  peak RSS {peak:.0f} MiB"
        )


def build_gpt_oss(path: Path, gb: float) -> int:
    """gpt-oss-120b's config (examples/configs) in bf16 with 16 experts, a 32000-row vocab
    and as many layers as fit `gb`; random values, ~256 MB shard files."""
    import json
    import math

    from reshard.models.hparams import parse_hparams
    from reshard.models.shapes import synthesize_tensors

    root = Path(__file__).resolve().parent.parent
    config = json.loads((root / "examples/configs/gpt-oss-120b/config.json").read_text())
    del config["quantization_config"]
    config.update(num_local_experts=16, vocab_size=32000, torch_dtype="bfloat16")
    config.pop("layer_types", None)

    def shapes(layers: int) -> dict:
        config["num_hidden_layers"] = layers
        return synthesize_tensors(parse_hparams(config, where="bench"), "BF16")

    per_layer = sum(2 * math.prod(s) for _, s in shapes(2).values()) - sum(
        2 * math.prod(s) for _, s in shapes(1).values()
    )
    fixed = sum(2 * math.prod(s) for _, s in shapes(1).values()) - per_layer
    tensors = shapes(max(1, round((gb * 1e9 - fixed) / per_layer)))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    groups: list[dict] = [{}]
    for name, (_, shape) in tensors.items():
        if sum(2 * math.prod(s) for s in groups[-1].values()) > 256e6:
            groups.append({})
        groups[-1][name] = shape
    return write_shards(path, groups)


if __name__ == "__main__":
    main()
