"""Benchmark: `reshard convert --tp 4` against `cp -r` of the same checkpoint, and peak RSS.

Builds Llama-shaped bf16 checkpoints (random bytes, several shard files) of two sizes, then
alternates cp and convert runs on a warm page cache and reports medians, the ratio
convert/cp, and the peak RSS of each convert next to the RSS of merely importing reshard:
a flat RSS across model sizes is what "memory does not grow with model size" means.

    python scripts/bench_convert.py [--gb 1.0] [--repeats 5] [--workdir /tmp/reshard-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# VmHWM, not ru_maxrss: Linux carries the parent's peak across fork+exec into ru_maxrss.
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
RSS_WRAPPER = f"""
import sys, time
from reshard.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", {PEAK}, "SECONDS", time.perf_counter() - start, file=sys.stderr)
"""
IMPORT_ONLY = f"import reshard.cli, reshard.convert, reshard.writer; print({PEAK})"


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


def layer_tensors(cfg: dict, i: int) -> dict[str, torch.Tensor]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    p = f"model.layers.{i}."
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    return {p + k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}


def build_checkpoint(path: Path, gb: float) -> int:
    """Write a Llama-shaped bf16 checkpoint of about `gb` GB in ~256 MB shard files."""
    cfg = llama_config(1)
    per_layer = sum(t.numel() * 2 for t in layer_tensors(cfg, 0).values())
    embed = 2 * cfg["vocab_size"] * cfg["hidden_size"] * 2
    layers = max(1, round((gb * 1e9 - embed) / per_layer))
    cfg = llama_config(layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    groups: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": torch.randn(v, h, dtype=torch.bfloat16)}
    ]
    for i in range(layers):
        if sum(t.numel() * 2 for t in groups[-1].values()) > 256e6:
            groups.append({})
        groups[-1].update(layer_tensors(cfg, i))
    groups[-1]["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    groups[-1]["lm_head.weight"] = torch.randn(v, h, dtype=torch.bfloat16)
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
        total += sum(t.numel() * 2 for t in group.values())
        group.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr


PY_COPY = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
buf = memoryview(bytearray(64 << 20))
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    fi = os.open(os.path.join(src, name), os.O_RDONLY)
    fo = os.open(os.path.join(dst, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    off = 0
    while n := os.preadv(fi, [buf], off):
        os.pwrite(fo, buf[:n], off)
        off += n
    os.fsync(fo)
    os.close(fi)
    os.close(fo)
"""


def bench(src: Path, work: Path, repeats: int) -> dict:
    """Every side ends with its bytes on disk: cp is followed by sync, the others fsync.
    GNU cp copies in the kernel (copy_file_range); the Python copy moves the same bytes
    through user space with pread/pwrite, as any converter that slices them must."""
    cp, py, conv, inner, rss = [], [], [], [], []
    for _ in range(repeats):
        subprocess.run(["sync"], check=True)
        cp.append(timed(["sh", "-c", f"cp -r '{src}' '{work / 'cp'}' && sync"])[0])
        shutil.rmtree(work / "cp")
        subprocess.run(["sync"], check=True)
        py.append(timed([sys.executable, "-c", PY_COPY, str(src), str(work / "py")])[0])
        shutil.rmtree(work / "py")
        subprocess.run(["sync"], check=True)
        cmd = [sys.executable, "-c", RSS_WRAPPER, "convert", str(src), "--tp", "4"]
        seconds, err = timed([*cmd, "-o", str(work / "out"), "--quiet"])
        conv.append(seconds)
        fields = err.split("PEAK_RSS_KB")[1].split()
        rss.append(int(fields[0]))
        inner.append(float(fields[2]))
        shutil.rmtree(work / "out")
    med = statistics.median
    return {
        "py_s": med(py),
        "py_ratio": med(conv) / med(py),
        "cp_s": med(cp),
        "convert_s": med(conv),
        "convert_inner_s": med(inner),
        "ratio": med(conv) / med(cp),
        "inner_ratio": med(inner) / med(cp),
        "peak_rss_mib": max(rss) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    base = subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True)
    print(f"import-only peak RSS: {int(base.stdout) / 1024:.0f} MiB (python + torch + reshard)")
    print("medians; cp = cp -r + sync (in-kernel copy); pycopy = pread/pwrite + fsync in Python;")
    print("convert = whole process (python + torch import included), in-process = the convert")
    print("call alone; RSS = peak of the convert process (VmHWM).")
    print(
        "size_GB  cp_s  pycopy_s  convert_s  in-process_s  convert/cp  convert/pycopy"
        "  in-process/cp  peak_RSS_MiB"
    )
    for gb in (args.gb / 4, args.gb):
        src = args.workdir / f"src-{gb:g}"
        total = build_checkpoint(src, gb)
        r = bench(src, args.workdir, args.repeats)
        print(
            f"{total / 1e9:7.2f}  {r['cp_s']:4.2f}  {r['py_s']:8.2f}  {r['convert_s']:9.2f}  "
            f"{r['convert_inner_s']:12.2f}  {r['ratio']:10.2f}  {r['py_ratio']:14.2f}  "
            f"{r['inner_ratio']:13.2f}  {r['peak_rss_mib']:12.0f}"
        )
        shutil.rmtree(src)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
