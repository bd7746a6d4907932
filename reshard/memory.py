"""Per-GPU memory of a layout: each rank's weight bytes (summed from the Plan's output tensors,
so exactly what convert writes), its KV cache for B sequences of T tokens, and the headroom
left on a GPU after a fixed reserve.

Pure numbers over a Plan: no I/O, no printing. Reading the model is memory_plan.py's job, the
layout search memory_suggest.py's, and the text and JSON views memory_format.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .hparams import HParams
from .plan import Plan

GB = 10**9  # GPU memory is sold in decimal GB; every figure here uses them

# Datasheet memory per GPU, decimal GB (REFERENCES.md, "GPU memory").
GPU_MEMORY_GB = {
    "B200": 192,
    "B100": 192,
    "H200": 141,
    "H100": 80,
    "L4": 24,
    "L40S": 48,
    "L40": 48,
    "A100": 80,
}

# Kept back on every GPU for what is neither weights nor KV cache: activations, the CUDA
# context, NCCL buffers, CUDA graphs and allocator fragmentation. 10% is what vLLM leaves by
# default (gpu_memory_utilization=0.9); SGLang's default static fraction is similar.
RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Gpu:
    name: str  # "H100", or "80 GB GPU" for --gpu-memory
    memory_bytes: int

    @property
    def reserve_bytes(self) -> int:
        return round(self.memory_bytes * RESERVE_FRACTION)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes


def resolve_gpu(name: str | None = None, memory_gb: float | None = None) -> Gpu | None:
    """--gpu NAME (case-insensitive, from GPU_MEMORY_GB) or --gpu-memory GB; None if neither."""
    if name is not None and memory_gb is not None:
        raise InputError(
            f"--gpu {name} and --gpu-memory {memory_gb:g} both set the GPU's memory; give one."
        )
    if memory_gb is not None:
        if not memory_gb > 0:
            raise InputError(f"--gpu-memory {memory_gb:g}: give the GPU's memory in GB, > 0.")
        return Gpu(f"{memory_gb:g} GB GPU", round(memory_gb * GB))
    if name is None:
        return None
    known = {k.lower(): k for k in GPU_MEMORY_GB}
    key = known.get(name.strip().lower())
    if key is None:
        listed = ", ".join(f"{k} ({v} GB)" for k, v in GPU_MEMORY_GB.items())
        raise InputError(
            f"--gpu {name}: unknown GPU. Known: {listed}. For another GPU pass its memory "
            "with --gpu-memory GB instead."
        )
    return Gpu(key, GPU_MEMORY_GB[key] * GB)


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


def layer_kv_bytes(hp: HParams, layer: int, tp: int, budget: KvBudget) -> int:
    """One rank's K and V cache for one layer: local kv heads x head_dim x 2 x dtype x B x T."""
    per_token = local_kv_heads(hp, tp) * hp.head_dim * 2 * budget.dtype_bytes
    return per_token * budget.batch * cached_tokens(hp, layer, budget.context)


def kv_bytes_per_token(hp: HParams, layers, tp: int, dtype_bytes: int) -> int:
    """One rank's KV bytes per cached token over `layers` (no sliding-window cap)."""
    return len(layers) * local_kv_heads(hp, tp) * hp.head_dim * 2 * dtype_bytes


@dataclass(frozen=True)
class RankMemory:
    rank: int
    dp_index: int
    pp_stage: int
    tp_rank: int
    layers: tuple[int, int]  # decoder layers on the rank, inclusive
    weight_bytes: int
    kv_bytes: int
    headroom_bytes: int | None  # usable GPU bytes minus total; None without a GPU

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class MemoryReport:
    plan: Plan
    ranks: tuple[RankMemory, ...]  # every rank of the world, DP replicas included
    gpu: Gpu | None
    budget: KvBudget

    @property
    def weight_bytes_total(self) -> int:
        """Bytes convert writes: one DP replica's files."""
        return self.plan.total_bytes

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: (r.total_bytes, -r.rank))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.worst.total_bytes <= self.gpu.usable_bytes

    @property
    def over(self) -> tuple[RankMemory, ...]:
        """Ranks that do not fit (empty without a GPU)."""
        return tuple(r for r in self.ranks if r.headroom_bytes is not None and r.headroom_bytes < 0)


def memory_report(plan: Plan, gpu: Gpu | None, budget: KvBudget) -> MemoryReport:
    lay = plan.layout
    file_bytes = {f.name: f.nbytes for f in plan.files}
    ranks = []
    for rp in plan.ranks:
        c = rp.coord
        stage = lay.stages[c.pp_stage]
        weights = sum(file_bytes[name] for name in rp.files)
        kv = sum(layer_kv_bytes(plan.hparams, i, lay.tp, budget) for i in stage.layers)
        headroom = None if gpu is None else gpu.usable_bytes - weights - kv
        span = (stage.first_layer, stage.last_layer)
        ranks.append(
            RankMemory(c.rank, c.dp_index, c.pp_stage, c.tp_rank, span, weights, kv, headroom)
        )
    return MemoryReport(plan, tuple(ranks), gpu, budget)
