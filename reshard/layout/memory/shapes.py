"""A model's tensor shapes as plan sees them (from safetensors headers or config.json alone)
and what is derived from them without reading a byte: the written dtype, the KV budget, the
bytes of an expert, a lower bound on a replica's bytes, the notes and the expert placement
report of `reshard plan`. Opening a model is the plan use case's (reshard/plan.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...dtypes import CAST_DTYPES, DTYPE_SIZES
from ...errors import InputError
from ...models.hparams import HParams, parse_hparams
from ...models.rules import TensorRole, match_tensors
from ...models.shapes import synthesize_tensors
from ..experts.nodes import NodeLayout
from ..experts.report import PlacementReport, read_expert_load, report_placement
from ..gpus import GPUS
from ..plan import Plan
from ..recipe import Recipe
from ..resolve import resolve
from ..stages.pipeline import StagePlan
from .model import Gpu, KvBudget, MemoryReport, kv_bytes_per_token, state_bytes_per_sequence

if TYPE_CHECKING:  # a Source is only carried here; io/ sits above layout/
    from ...io.source import Source

EXPERT_ROLES = (
    "expert_column",
    "expert_row",
    "fused_expert_column",
    "fused_expert_row",
    "stacked_expert",
)


@dataclass(frozen=True)
class ModelShapes:
    model: str  # what the user passed
    hparams: HParams
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), file order
    roles: dict[str, TensorRole]
    origin: str  # where the shapes came from, for the report
    source: Source | None  # set when safetensors headers were read


def config_shapes(model: str, config: dict, *, where: str, dtype: str = "keep") -> ModelShapes:
    hp = parse_hparams(config, where=where)
    st_dtype = CAST_DTYPES.get(hp.torch_dtype) or CAST_DTYPES.get(dtype)
    if st_dtype is None:
        raise InputError(
            f"{where}: torch_dtype {hp.torch_dtype!r} is not a float dtype reshard can size "
            "from config.json alone. Pass --dtype bf16 (or fp16, fp32)."
        )
    tensors = synthesize_tensors(hp, st_dtype)
    roles = match_tensors(hp, tensors, where=where)
    origin = f"config.json alone ({where}; shapes synthesized, {st_dtype})"
    return ModelShapes(model, hp, tensors, roles, origin, None)


def build_layout(shapes: ModelShapes, recipe: Recipe) -> Plan:
    """The plan over shapes already matched (config.json alone, or a source's headers)."""
    return resolve(shapes.hparams, shapes.tensors, shapes.roles, recipe).plan


def out_dtype(shapes: ModelShapes, recipe: Recipe) -> str:
    """The safetensors dtype convert writes (the embedding's; one float dtype throughout)."""
    if recipe.dtype != "keep":
        return CAST_DTYPES[recipe.dtype]
    return shapes.tensors["model.embed_tokens.weight"][0]


def kv_budget(shapes: ModelShapes, recipe: Recipe, *, context: int, batch: int) -> KvBudget:
    """KV cache in the dtype the weights are written in (what engines use by default)."""
    dtype = out_dtype(shapes, recipe)
    size = DTYPE_SIZES[dtype] if dtype in CAST_DTYPES.values() else 2
    return KvBudget(context, batch, size)


def resolve_context(hp: HParams, context: int | None) -> tuple[int, str]:
    """--context, else the longest sequence the model takes (what engines default to)."""
    if context:
        return context, "--context"
    return hp.max_position_embeddings, "max_position_embeddings in config.json"


@dataclass(frozen=True)
class PlanMemory:
    """Everything `reshard plan` shows for one layout."""

    shapes: ModelShapes
    recipe: Recipe
    memory: MemoryReport
    stages: StagePlan
    placement: PlacementReport | None
    context_origin: str  # where the context length came from (resolve_context)
    notes: tuple[str, ...]


def roofline_device(gpu: Gpu | None) -> str:
    """The GPU whose FLOP/s and bandwidth the stage roofline uses: --gpu's, else the H100's
    (--gpu-memory gives a size, not a speed)."""
    return gpu.name if gpu is not None and gpu.name in GPUS else "H100"


def plan_notes(hp: HParams, recipe: Recipe, budget: KvBudget) -> tuple[str, ...]:
    notes = []
    if recipe.load is not None and not (hp.is_moe and recipe.ep > 1):
        notes.append("--expert-load is used only for a mixture-of-experts model with --ep > 1.")
    windowed = sum(t == "sliding_attention" for t in hp.layer_types) if hp.sliding_window else 0
    if windowed and hp.sliding_window < budget.context:
        notes.append(
            f"{windowed} of {hp.num_layers} layers use a {hp.sliding_window}-token sliding "
            f"window: their KV cache holds at most {hp.sliding_window} tokens per sequence."
        )
    linear = sum(hp.is_linear(i) for i in range(hp.num_layers))
    if linear:
        state = recipe.tp * state_bytes_per_sequence(
            hp, range(hp.num_layers), recipe.tp, budget.dtype_bytes
        )
        per_token = recipe.tp * kv_bytes_per_token(
            hp, range(hp.num_layers), recipe.tp, budget.dtype_bytes
        )
        notes.append(
            f"{linear} of {hp.num_layers} layers are linear attention: no KV cache per token, "
            f"a fixed state of {state:,} B per sequence over all ranks (conv + recurrent, as "
            f"vLLM holds it; as much as {-(-state // per_token):,} tokens of KV cache), counted "
            "in KV needed for each of the --batch sequences; KV tokens and concurrency count "
            "the attention layers' cache only."
        )
    return tuple(notes)


def expert_report(shapes: ModelShapes, recipe: Recipe) -> PlacementReport | None:
    """Balancedness of contiguous vs the recipe's placement over the measured load."""
    hp = shapes.hparams
    if not (hp.is_moe and recipe.ep > 1 and recipe.load is not None):
        return None
    load = read_expert_load(recipe.load)
    return report_placement(
        load.layers,
        load.heldout or None,
        ep=recipe.ep,
        redundant=tuple(sorted({0, recipe.redundant})),
        placements=tuple(dict.fromkeys(("contiguous", "balanced", recipe.placement))),
        bytes_per_expert=bytes_per_expert(shapes, recipe),
        nodes=None
        if recipe.gpus_per_node is None
        else NodeLayout(recipe.ep, recipe.gpus_per_node, hp.num_expert_groups),
    )


def bytes_per_expert(shapes: ModelShapes, recipe: Recipe) -> int:
    """Bytes of one routed expert (gate, up and down) of one MoE layer, as written."""
    hp = shapes.hparams
    total = 0
    for name, role in shapes.roles.items():
        if role.layer == hp.moe_layers[0] and role.role in EXPERT_ROLES:
            if role.expert is None:  # fused [E, ...]: one expert's share
                total += written_bytes(shapes.tensors[name], recipe) // hp.num_experts
            elif role.expert == 0:
                total += written_bytes(shapes.tensors[name], recipe)
    return total


def weight_lower_bound(shapes: ModelShapes, recipe: Recipe) -> int:
    """Bytes of every tensor convert writes at tp 1: a lower bound on one replica's bytes at
    any layout (splitting only adds vocab padding and replicas)."""
    return sum(
        written_bytes(entry, recipe)
        for name, entry in shapes.tensors.items()
        if shapes.roles[name].role != "drop"
    )


def written_bytes(entry: tuple[str, tuple[int, ...]], recipe: Recipe) -> int:
    """A (dtype, shape) source tensor's bytes once written (cast when the recipe asks)."""
    dtype, shape = entry
    if recipe.dtype != "keep" and dtype in CAST_DTYPES.values():
        dtype = CAST_DTYPES[recipe.dtype]
    return DTYPE_SIZES[dtype] * math.prod(shape)
