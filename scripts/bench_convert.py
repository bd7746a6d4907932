"""Benchmark: whole-process `reshard convert --tp 4` at each --workers against `cp -r` + `sync`
of the same checkpoint and against a naive load-and-slice converter, with peak RSS.

Builds Llama-shaped bf16 checkpoints (random values, ~256 MB shard files), then runs rounds in
which every contender runs once (the order rotates from round to round, so none always runs
first on a machine others share), on a warm page cache. Every contender ends with its bytes
on disk: cp is followed by sync (system-wide, the issue's baseline) or by `sync OUT/*` (fsync
of the copy's files only: on a shared machine a plain sync also flushes what others wrote),
reshard fsyncs its files, the naive converter calls os.sync(). Reports medians, the ratio to
the median of cp -r + sync from the same run, and the 1-minute load average, since on a
shared machine that is what the figures move with. The account of what remains: CPU seconds
per GB (user and system, from the children's rusage, medians) and, from one extra untimed run
of each under `strace -c -f` (when strace is installed), system calls per GB by kind.

    python scripts/bench_convert.py [--gb 1 --gb 4] [--repeats 5] [--workers 1 --workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries the parent's peak across fork+exec into ru_maxrss.
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
RESHARD = f"""
import sys
from reshard.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", {PEAK}, file=sys.stderr)
"""
# The converter without a plan: load each source file whole, slice with torch, hold every
# rank's tensors until the end, save_file each rank. kv heads (4) divide tp (4) here.
NAIVE = f"""
import os, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out, tp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ROW = ("o_proj", "down_proj")
REPLICATE = ("norm",)
out.mkdir()
ranks = [{{}} for _ in range(tp)]
for f in sorted(src.glob("*.safetensors")):
    for name, t in load_file(f).items():
        for r in range(tp):
            if any(k in name for k in REPLICATE):
                part = t
            else:
                part = t.chunk(tp, dim=1 if any(k in name for k in ROW) else 0)[r]
            ranks[r][name] = part.contiguous()
for r, tensors in enumerate(ranks):
    save_file(tensors, str(out / f"rank-{{r:05d}}.safetensors"), metadata={{"format": "pt"}})
os.sync()
print("PEAK_RSS_KB", {PEAK}, file=sys.stderr)
"""


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
    }


def build_checkpoint(path: Path, gb: float) -> int:
    """Write a Llama-shaped bf16 checkpoint of about `gb` GB in ~256 MB shard files."""
    cfg = llama_config(1)
    per_layer = sum(2 * math.prod(s) for s in layer_shapes(cfg, 0).values())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    layers = max(1, round((gb * 1e9 - 2 * 2 * v * h) / per_layer))
    cfg = llama_config(layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (v, h)}]
    for i in range(layers):
        if sum(2 * math.prod(s) for s in groups[-1].values()) > 256e6:
            groups.append({})
        groups[-1].update(layer_shapes(cfg, i))
    groups[-1].update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return write_shards(path, groups)


def write_shards(path: Path, groups: list[dict[str, tuple[int, ...]]]) -> int:
    """Random bf16 tensors of these shapes, one safetensors file per group, and the index;
    the bytes written."""
    import torch
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in group.items()}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
        total += sum(2 * math.prod(s) for s in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def run_once(cmd: list[str], out: Path) -> tuple[float, int | None, float, float]:
    """Seconds for the whole process, its peak RSS in KiB (None for cp), and the user and
    system CPU seconds of it and its children (the final sync's included, as cp's is)."""
    subprocess.run(["sync"], check=True)  # start from no dirty pages, ours or others'
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"benchmark command failed ({done.returncode}): {cmd}\n{done.stderr}")
    shutil.rmtree(out)
    peak = done.stderr.split("PEAK_RSS_KB")[1].split()[0] if "PEAK_RSS_KB" in done.stderr else None
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return seconds, int(peak) if peak else None, user, system


def count_syscalls(cmd: list[str], out: Path, work: Path) -> dict[str, int]:
    """{syscall: calls} of one run under `strace -c -f` (every thread and child)."""
    report = work / "strace.txt"
    subprocess.run(["strace", "-f", "-c", "-o", str(report), *cmd], check=True,
                   capture_output=True)  # fmt: skip
    shutil.rmtree(out)
    calls = {}
    for line in report.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def print_account(total: int, results: dict[str, list], syscalls: dict[str, dict]) -> None:
    gb = total / 1e9
    print("CPU per GB (medians of user / system seconds; cp's figure includes its sync):")
    for name, runs in results.items():
        user = statistics.median(r[2] for r in runs) / gb
        system = statistics.median(r[3] for r in runs) / gb
        print(f"  {name:<24} user {user:5.2f} s/GB  system {system:5.2f} s/GB")
    for name, calls in syscalls.items():
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
        kinds = ", ".join(f"{k} {v / gb:.0f}" for k, v in top)
        print(f"  syscalls per GB, {name}: {sum(calls.values()) / gb:.0f} ({kinds})")


def contenders(
    src: Path, work: Path, workers: list[int], naive: bool = True
) -> dict[str, tuple[list[str], Path]]:
    py = sys.executable
    out = work / "out"
    copy = f"cp -r '{src}' '{out}'"
    runs = {
        "cp -r + sync": (["sh", "-c", f"{copy} && sync"], out),
        # fsync of the copy's own files and folder: sync alone also flushes what others wrote
        "cp -r + sync OUT/*": (["sh", "-c", f"{copy} && sync '{out}'/* '{out}'"], out),
    }
    for w in workers:
        cmd = [py, "-c", RESHARD, "convert", str(src), "--tp", "4", "-o", str(out)]
        runs[f"reshard --workers {w}"] = ([*cmd, "--quiet", "--workers", str(w)], out)
    if naive:
        runs["naive load+slice+save"] = ([py, "-c", NAIVE, str(src), str(out), "4"], out)
    return runs


def bench(src: Path, work: Path, workers: list[int], repeats: int, loads: list[float], naive):
    """{contender: [(seconds, peak KiB, user s, system s)]}; `loads` gets the load average
    before each run."""
    runs = contenders(src, work, workers, naive)
    names = list(runs)
    results: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            loads.append(os.getloadavg()[0])
            results[name].append(run_once(*runs[name]))
    return results


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(gb: float, total: int, results: dict[str, list], loads: list[float]) -> None:
    cp = statistics.median(r[0] for r in results["cp -r + sync"])
    print(
        f"\n{total / 1e9:.2f} GB ({gb:g} GB asked), {len(next(iter(results.values())))} rounds, "
        f"1-min load average {min(loads):.1f}-{max(loads):.1f} (median "
        f"{statistics.median(loads):.1f}) on {os.cpu_count()} cores"
    )
    print(f"{'what':<24} {'median_s':>9} {'min_s':>7} {'x cp':>6} {'peak_RSS_MiB':>13}")
    for name, runs in results.items():
        med = statistics.median(r[0] for r in runs)
        peaks = [r[1] for r in runs if r[1] is not None]
        rss = f"{max(peaks) / 1024:.0f}" if peaks else "-"
        print(f"{name:<24} {med:9.2f} {min(r[0] for r in runs):7.2f} {med / cp:6.2f} {rss:>13}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, action="append", help="checkpoint size(s); default 1 4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, action="append", help="default: 1, 2, cores")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench"))
    ap.add_argument("--no-naive", action="store_true", help="skip the naive converter")
    args = ap.parse_args()
    sizes = args.gb or [1.0, 4.0]
    workers = sorted(set(args.workers or [1, 2, os.cpu_count() or 1]))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {platform.platform()}")
    print("whole-process wall seconds (interpreter start to exit, data on disk), medians;")
    print("x cp = median / median of cp -r + sync in the same run; RSS = peak (VmHWM).")
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        for gb in sizes:
            src = args.workdir / f"src-{gb:g}"
            total = build_checkpoint(src, gb)
            loads: list[float] = []
            results = bench(src, args.workdir, workers, args.repeats, loads, not args.no_naive)
            print_table(gb, total, results, loads)
            syscalls = {}
            if shutil.which("strace"):
                runs = contenders(src, args.workdir, workers)
                for name in ("cp -r + sync", f"reshard --workers {workers[-1]}"):
                    syscalls[name] = count_syscalls(*runs[name], args.workdir)
            print_account(total, results, syscalls)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
