"""Regenerate examples/tiny-llama: the small random Llama the README's first command converts.

Needs transformers (a test-only dependency); the committed files make the demo work offline
without it. Weights are scaled so greedy decoding varies from token to token.
"""

import json
import sys
from pathlib import Path

import torch
import transformers

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-llama")


def main() -> None:
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=509,  # prime: exercises vocab padding at every tp > 1
        max_position_embeddings=512,
        initializer_range=0.15,
        rope_theta=10000.0,
    )
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(OUT, max_shard_size="400KB")
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print("greedy sample:", out[0, 5:].tolist())
    print(json.dumps(sorted(p.name for p in OUT.iterdir())))


if __name__ == "__main__":
    main()
