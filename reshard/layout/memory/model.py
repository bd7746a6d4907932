"""Per-GPU memory of a layout in a serving engine's terms (vLLM's memory profile): each rank's
weight bytes (summed from the Plan's output tensors, so exactly what convert writes), non-torch
memory, the activation peak, and the KV cache: what remains of gpu_memory_utilization x the
GPU's memory, in bytes, blocks and tokens, against the cache B sequences of T tokens need.

Pure numbers over a Plan: no I/O, no printing. Reading the model is plan.py's job, the
layout search suggest.py's, and the text and JSON views format.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from ...models.hparams import HParams
from ...units import GB
from ..gpus import GPUS, find_gpu
from ..plan import Plan, Stage
from .activation import EngineLimits, activation_peak_bytes

DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default


@dataclass(frozen=True)
class Gpu:
    """One GPU's memory and the share an engine may use (vLLM's gpu_memory_utilization): the
    budget that weights, non-torch memory, the activation peak and the KV cache share."""

    name: str  # "H100", or "80 GB GPU" for --gpu-memory
    memory_bytes: int  # as sold (decimal GB)
    total_bytes: int  # as CUDA reports it: what the utilization multiplies
    utilization: float = DEFAULT_UTILIZATION

    def __post_init__(self):
        if not 0 < self.utilization <= 1:
            raise InputError(
                f"--gpu-memory-utilization {self.utilization:g}: give the share of the GPU's "
                "memory the engine may use, > 0 and <= 1 (vLLM's default is 0.9)."
            )

    @property
    def budget_bytes(self) -> int:
        return round(self.total_bytes * self.utilization)


def resolve_gpu(
    name: str | None = None,
    memory_gb: float | None = None,
    *,
    utilization: float = DEFAULT_UTILIZATION,
) -> Gpu | None:
    """--gpu NAME (case-insensitive, from gpus.GPUS) or --gpu-memory GB; None if neither."""
    if name is not None and memory_gb is not None:
        raise InputError(
            f"--gpu {name} and --gpu-memory {memory_gb:g} both set the GPU's memory; give one."
        )
    if memory_gb is not None:
        if not memory_gb > 0:
            raise InputError(f"--gpu-memory {memory_gb:g}: give the GPU's memory in GB, > 0.")
        n = round(memory_gb * GB)
        return Gpu(f"{memory_gb:g} GB GPU", n, n, utilization)
    if name is None:
        return None
    key = find_gpu(name)
    if key is None:
        listed = ", ".join(f"{k} ({v.memory_gb} GB)" for k, v in GPUS.items())
        raise InputError(
            f"--gpu {name}: unknown GPU. Known: {listed}. For another GPU pass its memory "
            "with --gpu-memory GB instead."
        )
    spec = GPUS[key]
    return Gpu(key, spec.memory_gb * GB, spec.total_bytes, utilization)


@dataclass(frozen=True)
class KvBudget:
    """The KV cache every rank must hold: `batch` sequences of `context` tokens each."""

    context: int
    batch: int
    dtype_bytes: int  # bytes per cached K or V element

    def __post_init__(self):
        for name in ("context", "batch", "dtype_bytes"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")


def local_kv_heads(hp: HParams, tp: int) -> int:
    """kv heads one TP rank caches: kv/tp, or 1 when kv < tp (each rank keeps its head's copy)."""
    return max(hp.num_kv_heads // tp, 1)


def cached_tokens(hp: HParams, layer: int, context: int) -> int:
    """Tokens a layer caches per sequence: sliding-window layers keep only the last `window`."""
    if hp.sliding_window and hp.layer_types[layer] == "sliding_attention":
        return min(context, hp.sliding_window)
    return context


def kv_token_elements(hp: HParams, tp: int) -> int:
    """Elements one rank caches per token and layer. K and V: local kv heads x head_dim x 2.
    MLA, as vLLM caches it: the latent kv_lora_rank + qk_rope_head_dim, whole on every TP
    rank (it is shared by all heads). reshard's own runtime caches full k/v per head instead
    (runtime/mla.py); plan reports the engine's form."""
    if hp.is_mla:
        return hp.kv_lora_rank + hp.head_dim
    return local_kv_heads(hp, tp) * hp.head_dim * 2


def layer_kv_token_elements(hp: HParams, layer: int, tp: int) -> int:
    """kv_token_elements of an attention layer; a linear-attention layer caches no tokens."""
    return 0 if hp.is_linear(layer) else kv_token_elements(hp, tp)


def linear_state_elements(hp: HParams, tp: int) -> int:
    """One rank's fixed state of one linear-attention layer for one sequence, whatever its
    length, as vLLM 0.32 holds it (MambaStateShapeCalculator.gated_delta_net_state_shape):
    the conv's last kernel-1 inputs over its (2 x key + value)/tp channels, and the recurrent
    state of value heads/tp x value x key width; both in the cache dtype ("auto": the
    model's)."""
    channels = (2 * hp.linear_key_size + hp.linear_value_size) // tp
    conv = channels * (hp.linear_conv_kernel_dim - 1)
    heads = hp.linear_num_value_heads // tp
    return conv + heads * hp.linear_value_head_dim * hp.linear_key_head_dim


def layer_kv_bytes(hp: HParams, layer: int, tp: int, budget: KvBudget) -> int:
    """One rank's KV cache for one layer: kv_token_elements x dtype x B x T; for a linear
    layer its fixed state x dtype x B."""
    if hp.is_linear(layer):
        return linear_state_elements(hp, tp) * budget.dtype_bytes * budget.batch
    per_token = kv_token_elements(hp, tp) * budget.dtype_bytes
    return per_token * budget.batch * cached_tokens(hp, layer, budget.context)


def kv_bytes_per_token(hp: HParams, layers, tp: int, dtype_bytes: int) -> int:
    """One rank's KV bytes per cached token over `layers` (no sliding-window cap)."""
    return sum(layer_kv_token_elements(hp, i, tp) for i in layers) * dtype_bytes


def state_bytes_per_sequence(hp: HParams, layers, tp: int, dtype_bytes: int) -> int:
    """One rank's fixed linear-attention state per sequence over `layers` (0 without)."""
    linear = sum(hp.is_linear(i) for i in layers)
    return linear * linear_state_elements(hp, tp) * dtype_bytes if linear else 0


def needed_kv_bytes(hp: HParams, layers, tp: int, budget: KvBudget, block_size: int) -> int:
    """KV bytes one rank must hold for the budget, in whole blocks per sequence."""
    context = -(-budget.context // block_size) * block_size
    whole = KvBudget(context, budget.batch, budget.dtype_bytes)
    return sum(layer_kv_bytes(hp, i, tp, whole) for i in layers)


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory in vLLM's terms. Without a GPU only the demands are known."""

    rank: int
    dp_index: int
    pp_stage: int
    tp_rank: int
    layers: tuple[int, int]  # decoder layers on the rank, inclusive
    weight_bytes: int
    non_torch_bytes: int
    activation_bytes: int
    kv_bytes: int  # KV cache the budget (--context x --batch) needs
    kv_token_bytes: int  # KV bytes of one cached token on this rank (no window cap)
    block_size: int
    budget_bytes: int | None  # gpu_memory_utilization x the GPU's memory; None without a GPU

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV cache: what the engine takes before it sizes the cache."""
        return self.weight_bytes + self.non_torch_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.kv_bytes

    @property
    def kv_cache_bytes(self) -> int | None:
        """What is left of the budget for the KV cache (negative: not even the rest fits)."""
        return None if self.budget_bytes is None else self.budget_bytes - self.fixed_bytes

    @property
    def kv_blocks(self) -> int | None:
        if self.kv_cache_bytes is None:
            return None
        if self.kv_token_bytes == 0:  # a rank without layers caches nothing
            return 0
        return max(self.kv_cache_bytes, 0) // (self.block_size * self.kv_token_bytes)

    @property
    def kv_tokens(self) -> int | None:
        return None if self.kv_blocks is None else self.kv_blocks * self.block_size

    @property
    def headroom_bytes(self) -> int | None:
        """KV cache room beyond what the budget needs; < 0 does not fit."""
        room = self.kv_cache_bytes
        if room is None:
            return None
        if room <= 0:  # vLLM stops: "No available memory for the cache blocks"
            return min(room, -1)
        return room - self.kv_bytes


@dataclass(frozen=True)
class MemoryReport:
    plan: Plan
    ranks: tuple[RankMemory, ...]  # every rank of the world, DP replicas included
    gpu: Gpu | None
    budget: KvBudget
    limits: EngineLimits

    @property
    def weight_bytes_total(self) -> int:
        """Bytes convert writes: one DP replica's files."""
        return self.plan.total_bytes

    @property
    def worst(self) -> RankMemory:
        if self.gpu is None:
            return max(self.ranks, key=lambda r: (r.total_bytes, -r.rank))
        return min(self.ranks, key=lambda r: (r.headroom_bytes, r.rank))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.worst.headroom_bytes >= 0

    @property
    def over(self) -> tuple[RankMemory, ...]:
        """Ranks that do not fit (empty without a GPU)."""
        return tuple(r for r in self.ranks if r.headroom_bytes is not None and r.headroom_bytes < 0)

    @property
    def kv_tokens(self) -> int | None:
        """Tokens the engine can cache: every stage holds every token, so the fewest."""
        tokens = [r.kv_tokens for r in self.ranks if r.kv_token_bytes]
        return None if self.gpu is None or not tokens else min(tokens)


def rank_memory(
    hp: HParams,
    stage: Stage,
    coord: tuple[int, int, int, int],
    weights: int,
    *,
    tp: int,
    gpu: Gpu | None,
    budget: KvBudget,
    limits: EngineLimits,
    ep: int = 1,
) -> RankMemory:
    """One rank's memory; coord = (rank, dp_index, pp_stage, tp_rank)."""
    layers = stage.layers
    activation = activation_peak_bytes(
        hp, layers, tp, head=stage.head, limits=limits, dtype_bytes=budget.dtype_bytes, ep=ep
    )
    return RankMemory(
        *coord,
        (stage.first_layer, stage.last_layer),
        weights,
        limits.non_torch_bytes,
        activation,
        needed_kv_bytes(hp, layers, tp, budget, limits.block_size),
        kv_bytes_per_token(hp, layers, tp, budget.dtype_bytes),
        limits.block_size,
        None if gpu is None else gpu.budget_bytes,
    )


def memory_report(
    plan: Plan, gpu: Gpu | None, budget: KvBudget, limits: EngineLimits | None = None
) -> MemoryReport:
    if limits is None:  # vllm serve's defaults for the GPU
        limits = EngineLimits.for_gpu(gpu and gpu.name, gpu and gpu.total_bytes)
    lay = plan.layout
    file_bytes = {f.name: f.nbytes for f in plan.files}
    ranks = []
    for rp in plan.ranks:
        c = rp.coord
        weights = sum(file_bytes[name] for name in rp.files)
        coord = (c.rank, c.dp_index, c.pp_stage, c.tp_rank)
        ranks.append(
            rank_memory(
                plan.hparams,
                lay.stages[c.pp_stage],
                coord,
                weights,
                tp=lay.tp,
                gpu=gpu,
                budget=budget,
                limits=limits,
                ep=lay.ep,
            )
        )
    return MemoryReport(plan, tuple(ranks), gpu, budget, limits)
