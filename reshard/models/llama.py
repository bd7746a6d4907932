"""Llama 2/3/3.1/3.2 and Mistral (Llama's layout plus a sliding window on every layer): the
dense decoder every other family extends."""

from .blocks import ATTENTION, DENSE_MLP, GLOBAL
from .family import WITH_VLLM, Family

FAMILY = Family(
    formats=WITH_VLLM,
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    rules=GLOBAL + ATTENTION + DENSE_MLP,
)
