"""What a serving engine holds on a GPU besides weights and KV cache, in vLLM's terms: the
non-torch memory (CUDA context, cuBLAS workspaces, NCCL buffers) and the PyTorch activation
peak of its start-up profile run, a forward pass of `max_num_batched_tokens` tokens followed by
the sampler over `max_num_seqs` rows. Pure numbers from config.json shapes, per rank; the
constants are calibrated in docs/memory.md against published vLLM memory-profile logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from ...models.hparams import HParams
from ...units import GIB

# `vllm serve` defaults (V1 engine, vllm/engine/arg_utils.py): on GPUs of 70 GiB or more other
# than the A100 (H100, H200, B200) max_num_batched_tokens 8192 and max_num_seqs 1024; on the
# others 2048 and 256. The sampler over max_num_seqs rows is most of the activation peak.
LARGE_GPU_DEFAULTS = (8192, 1024)
SMALL_GPU_DEFAULTS = (2048, 256)
LARGE_GPU_BYTES = 70 * 2**30
BLOCK_SIZE = 16  # tokens per KV cache block: vLLM's default on CUDA
# Memory the engine allocates outside PyTorch's allocator. vLLM logs 0.16-0.7 GiB since
# 0.7 and 1.8-5.7 GiB in 0.6 (which also counted NCCL and custom all-reduce buffers there);
# 1 GiB is the top of the 0.5-1 GiB that current versions show with TP.
NON_TORCH_BYTES = 1 * GIB
# Bytes the sampler keeps alive per (row, vocab) logit at its peak: about ten float32 copies
# of the gathered [rows, vocab] logits (fp32 logits, top-k/top-p sort values and int64
# indices, softmax, cumsum, masks, probabilities, log-probabilities, sampling noise).
# Calibrated: 1.26 GiB at 256 rows x 128256 vocab (vLLM PR 10511, Llama-3-8B).
SAMPLER_BYTES_PER_LOGIT = 40


@dataclass(frozen=True)
class EngineLimits:
    """The engine's start-up settings, named as vLLM names its flags."""

    max_num_batched_tokens: int = LARGE_GPU_DEFAULTS[0]
    max_num_seqs: int = LARGE_GPU_DEFAULTS[1]
    block_size: int = BLOCK_SIZE
    non_torch_bytes: int = NON_TORCH_BYTES

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} {value!r}: give a positive whole number.")

    @classmethod
    def for_gpu(
        cls, gpu_name: str | None, total_bytes: int | None, tokens=None, seqs=None
    ) -> EngineLimits:
        """vllm serve's defaults for this GPU (the large-GPU ones without a GPU), unless given."""
        defaults = engine_defaults(gpu_name, total_bytes)
        return cls(tokens or defaults[0], seqs or defaults[1])

    @property
    def sampled_rows(self) -> int:
        """Rows the profile run samples: one per sequence, at most one per token."""
        return min(self.max_num_seqs, self.max_num_batched_tokens)


def engine_defaults(gpu_name: str | None, total_bytes: int | None) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that `vllm serve` picks on this GPU."""
    if total_bytes is None:
        return LARGE_GPU_DEFAULTS
    large = total_bytes >= LARGE_GPU_BYTES and "a100" not in (gpu_name or "").lower()
    return LARGE_GPU_DEFAULTS if large else SMALL_GPU_DEFAULTS


def layer_transient(hp: HParams, layer: int, tp: int, ep: int = 1) -> int:
    """Elements per token one rank holds inside a layer beyond the residual stream: the larger
    of attention (q/k/v out + attention out) and the MLP (gate/up out + activation out;
    for MoE the fused kernel's per-token caches over top-k experts, each expert split tp/ep
    ways)."""
    kv_local = max(hp.num_kv_heads // tp, 1) * hp.head_dim
    if hp.is_mla:  # the latent (+ rope key) and its per-head expansion into k_nope and v
        kv_local = hp.kv_lora_rank + hp.head_dim
        kv_local += hp.num_heads // tp * (hp.qk_nope_head_dim + hp.v_head_dim)
    attention = 2 * (hp.q_size // tp) + 2 * kv_local
    if layer not in hp.moe_layers:
        return max(attention, 3 * (hp.intermediate_size // tp))
    expert_local = hp.moe_intermediate_size // (tp // ep)
    routed = hp.num_experts_per_tok * (3 * expert_local + hp.hidden_size)
    shared = 3 * (hp.shared_expert_intermediate_size // tp)
    return max(attention, routed, shared)


def forward_peak_bytes(
    hp: HParams, layers, tp: int, tokens: int, dtype_bytes: int, ep: int = 1
) -> int:
    """Peak of one forward pass over `tokens`: residual + hidden state [T, hidden] plus the
    largest in-layer transient of the rank's layers (0 for a rank without layers)."""
    transient = max((layer_transient(hp, i, tp, ep) for i in layers), default=0)
    return tokens * dtype_bytes * (2 * hp.hidden_size + transient)


def sampler_peak_bytes(hp: HParams, rows: int, tp: int, dtype_bytes: int) -> int:
    """lm_head output [rows, vocab/tp] in the weights' dtype, gathered to the full vocab on
    every rank of the last stage, where the sampler works in float32."""
    local = rows * -(-hp.vocab_size // tp) * dtype_bytes
    return local + rows * hp.vocab_size * SAMPLER_BYTES_PER_LOGIT


def activation_peak_bytes(
    hp: HParams,
    layers,
    tp: int,
    *,
    head: bool,
    limits: EngineLimits,
    dtype_bytes: int,
    ep: int = 1,
) -> int:
    """The PyTorch activation peak vLLM's profile run measures on one rank: the forward pass,
    or the sampler on a rank of the last stage, whichever is larger (they do not overlap)."""
    tokens = limits.max_num_batched_tokens
    forward = forward_peak_bytes(hp, layers, tp, tokens, dtype_bytes, ep)
    if not head:
        return forward
    return max(forward, sampler_peak_bytes(hp, limits.sampled_rows, tp, dtype_bytes))
