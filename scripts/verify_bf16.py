"""verify's generate tier on a bf16 checkpoint: float32 compute (the default) against
checkpoint-dtype compute, and both against transformers running the same bf16 weights in fp32.

The fixture is a random Qwen2 (12 heads, 2 kv heads, vocab 1001, initializer_range 0.5 so that
greedy tokens vary), saved in bfloat16, converted at tp 4 (kv replicated, vocab padded). Needs
transformers. Prints one row per prompt:

  fp32: sharded tokens == reference tokens?, max |dlogit|   (--compute-dtype float32)
  bf16: the same, and whether the divergence was exempted as a near tie (checkpoint)
  hf:   does transformers (fp32 compute on the bf16 weights) produce the same greedy tokens
        as reshard's fp32 sharded run / as its bf16 sharded run?

Usage: python scripts/verify_bf16.py [--tokens 24] [--extra-prompts 4]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def write_fixture(path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=1001, initializer_range=0.5,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["Qwen2ForCausalLM"]
    model = transformers.Qwen2ForCausalLM(config).eval().to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def hf_greedy(src: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """transformers, fp32 compute on the bf16 weights, one prompt at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, max_new_tokens=tokens, do_sample=False)
            out.append(gen[0, len(prompt) :].tolist())
    return out


def run_verify(out: Path, prompts, tokens: int, compute: str) -> dict:
    from reshard.verify.levels import verify_output

    options = dict(prompt_ids=prompts, max_new_tokens=tokens, device="cpu", compute_dtype=compute)
    _, results = verify_output(out, levels=("generate",), generate_options=options)
    (result,) = results
    generation = result.data["generation"]
    return {"passed": result.passed, "failures": result.failures, **generation}


def main() -> None:
    from reshard.convert import convert_model
    from reshard.layout.recipe import build_recipe
    from reshard.verify.generate import default_prompts

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--extra-prompts", type=int, default=4)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    extra = [
        torch.randint(0, 1001, (n,), generator=gen).tolist()
        for n in (5, 9, 13, 20)[: args.extra_prompts]
    ]
    prompts = default_prompts(1001) + extra
    with tempfile.TemporaryDirectory(prefix="reshard-bf16-") as tmp:
        src = write_fixture(Path(tmp) / "src")
        out = Path(tmp) / "out"
        convert_model(str(src), out, build_recipe(tp=4), progress=False)
        fp32 = run_verify(out, prompts, args.tokens, "float32")
        bf16 = run_verify(out, prompts, args.tokens, "checkpoint")
        hf = hf_greedy(src, prompts, args.tokens)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"bf16 Qwen2 (12 heads, kv 2, vocab 1001) at tp 4, {args.tokens} new tokens")
    print(f"float32 compute: {'PASS' if fp32['passed'] else 'FAIL'}, exempted {fp32['exempted']}")
    print(f"bf16 compute:    {'PASS' if bf16['passed'] else 'FAIL'}, exempted {bf16['exempted']}")
    for failure in bf16["failures"]:
        print(f"  bf16 compute: {failure}")
    print(
        "prompt len max|logit| | fp32: same  max|dlogit| | bf16: same  max|dlogit|  exempt "
        "| hf==fp32 hf==bf16"
    )
    for i, (a, b, h) in enumerate(zip(fp32["prompts"], bf16["prompts"], hf, strict=True)):
        print(
            f"{i:>6} {len(a['prompt_ids']):>3} {a['max_abs_logit']:>10.1f} | {_same(a):>10}  "
            f"{a['max_abs_logit_diff']:.2e}  "
            f"| {_same(b):>10}  {b['max_abs_logit_diff']:.2e}  {str(b['near_tie']):>6} | "
            f"{str(a['sharded_ids'] == h):>8} {str(b['sharded_ids'] == h):>8}"
        )


def _same(row: dict) -> str:
    return "yes" if row["reference_ids"] == row["sharded_ids"] else f"no@{row['first_mismatch']}"


if __name__ == "__main__":
    main()
