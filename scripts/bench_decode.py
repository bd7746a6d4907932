"""Decode throughput of reshard's runtime (tp 1) vs transformers' generate, same checkpoint.

Writes a random Llama-style checkpoint (hidden 512, 4 layers by default), then for each
engine times greedy generation of 1 token (prefill only) and of N tokens; decode tokens/s =
batch * (N - 1) / (t_N - t_1). Several repeats, medians reported, and the ratio.

    python scripts/bench_decode.py [--batch 1] [--new-tokens 64] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p.parse_args()


def write_model(path: Path, args: argparse.Namespace):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None  # always decode N tokens
    model.generation_config.pad_token_id = 0
    return model.to(device=args.device, dtype=getattr(torch, args.dtype))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rates(engines: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Per engine: decode tokens/s and seconds for N tokens, one list entry per repeat.
    Engines alternate within each repeat so that background load hits them alike."""
    for run in engines.values():
        run(2)  # warm-up
    out: dict = {name: ([], []) for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            t1, tn = timed(lambda run=run: run(1)), timed(lambda run=run: run(new_tokens))
            out[name][0].append(batch * (new_tokens - 1) / (tn - t1))
            out[name][1].append(tn)
    return out


def main() -> None:
    args = parse_args()
    from reshard.runtime.generate import generate_greedy
    from reshard.runtime.load import load_source_model

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_model(Path(tmp), args)
        ours = load_source_model(tmp, dtype=args.dtype, device=args.device)
    ids = prompts.to(args.device)

    def run_hf(n: int) -> list:
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).tolist()

    def run_ours(n: int) -> list:
        return [r.tokens for r in generate_greedy(ours, prompts.tolist(), n)]

    assert [r[args.prompt_len :] for r in run_hf(8)] == run_ours(8), "engines disagree"
    engines = {"reshard": run_ours, "transformers": run_hf}
    rates = decode_rates(engines, args.batch, args.new_tokens, args.repeats)
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype} "
        f"on {args.device} ({torch.get_num_threads()} threads); batch {args.batch}, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} interleaved repeats"
    )
    print(f"{'engine':<14}{'median tok/s':>14}{'min':>9}{'max':>9}{'median s':>10}")
    for name, (tok_s, secs) in rates.items():
        print(
            f"{name:<14}{statistics.median(tok_s):>14.1f}{min(tok_s):>9.1f}{max(tok_s):>9.1f}"
            f"{statistics.median(secs):>10.3f}"
        )
    ratio = statistics.median(rates["reshard"][0]) / statistics.median(rates["transformers"][0])
    print(f"ratio reshard/transformers (median decode tok/s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
