"""Write a Llama checkpoint with a real model's dimensions and the first N of its layers, filled
with random bytes, in HF's layout (model-0000X-of-0000N.safetensors of at most 5 GB, the index,
config.json with num_hidden_layers = N). No torch: headers come from reshard's encoder, data
are 16 MiB windows taken at random offsets of a 256 MiB os.urandom pool (fast, and every
window differs; the values are random bf16 bit patterns, NaNs included: a byte-path test).

    python scripts/make_llama_slice.py OUT [--gb 16] [--config examples/configs/llama-3-70b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from reshard.headers import encode_header  # noqa: E402

POOL = 256 << 20
WINDOW = 16 << 20
SHARD = 5 * 10**9


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "mlp.down_proj.weight": (h, inter),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.v_proj.weight": (kv, h),
    }


def slice_tensors(cfg: dict, gb: float) -> tuple[int, dict[str, tuple[int, ...]]]:
    """As many of the model's layers as fit `gb` GB next to the embedding, norm and head."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    ends = {"model.embed_tokens.weight": (v, h)}
    tail = {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    fixed = 2 * sum(math.prod(s) for s in (*ends.values(), *tail.values()))
    per_layer = 2 * sum(math.prod(s) for s in layer_shapes(cfg, 0).values())
    layers = max(1, min(cfg["num_hidden_layers"], round((gb * 1e9 - fixed) / per_layer)))
    tensors = dict(ends)
    for i in range(layers):
        tensors.update(layer_shapes(cfg, i))
    return layers, {**tensors, **tail}


def write_file(path: Path, tensors: dict[str, tuple[int, ...]], pool: memoryview, rng) -> None:
    header, offsets = encode_header([(n, "BF16", s) for n, s in tensors.items()], {"format": "pt"})
    total = len(header) + (offsets[-1][1] if offsets else 0)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, header, 0)
        pos = len(header)
        while pos < total:
            n = min(WINDOW, total - pos)
            start = rng.randrange(POOL - n)
            pos += os.pwrite(fd, pool[start : start + n], pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gb", type=float, default=16.0)
    ap.add_argument("--config", type=Path, default=ROOT / "examples/configs/llama-3-70b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads((args.config / "config.json").read_text())
    layers, tensors = slice_tensors(cfg, args.gb)
    cfg["num_hidden_layers"] = layers
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    for name, shape in tensors.items():
        if (
            shards[-1]
            and 2 * sum(map(math.prod, shards[-1].values())) + 2 * math.prod(shape) > SHARD
        ):
            shards.append({})
        shards[-1][name] = shape
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    rng = random.Random(args.seed)
    pool = memoryview(os.urandom(POOL))
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(args.out / name, shard, pool, rng)
        weight_map.update({t: name for t in shard})
    total = 2 * sum(math.prod(s) for s in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{args.out}: {layers} layers of {args.config.name}, {total / 1e9:.2f} GB bf16")


if __name__ == "__main__":
    main()
