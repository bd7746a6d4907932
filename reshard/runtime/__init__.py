"""A small torch runtime that loads reshard's per-rank shards (or the unsharded source) and
generates greedily on a torch.distributed world, so the shards can be compared with the
original model. It reads the manifest; it knows nothing of recipes or plans."""

from .compare import PromptComparison, Tolerance, compare_results, tolerance_for
from .dist import Comm
from .generate import PromptResult, forward_logits, generate_greedy
from .launch import generate_reference, generate_sharded, run_world
from .load import load_rank, load_source_model
from .model import CausalLM, build_model

__all__ = [
    "CausalLM",
    "Comm",
    "PromptComparison",
    "PromptResult",
    "Tolerance",
    "build_model",
    "compare_results",
    "forward_logits",
    "generate_greedy",
    "generate_reference",
    "generate_sharded",
    "load_rank",
    "load_source_model",
    "run_world",
    "tolerance_for",
]
