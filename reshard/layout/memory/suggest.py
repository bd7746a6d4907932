"""`reshard plan --suggest`: the smallest layout (tp x pp) whose every rank, after its weights,
non-torch memory and activation peak (vLLM's terms, model.py), still holds the KV cache that
--context x --batch needs in the GPU's budget, keeping TP inside a node and PP across nodes:
tp grows up to a node (tp <= gpus_per_node, from check.valid_tp) before pp > 1 is used, and
then only with the node's largest valid tp. Layouts with fewer GPUs that need PP inside a
node are listed as alternatives. Per-rank bytes come from the real slicing (build_plan over
one representative layer per layer shape; see TpBytes) and the stages convert would use;
every smaller or invalid layout's rejection is recorded with its numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import LayoutError
from ...models.hparams import HParams
from ...units import format_gb
from ..check import check_layout, valid_tp
from ..plan import Stage, build_plan
from ..quant_splits import split_problems
from ..recipe import Recipe
from ..resolve import resolve_stages
from .activation import EngineLimits
from .model import Gpu, KvBudget, RankMemory, layer_kv_bytes, rank_memory
from .shapes import ModelShapes, weight_lower_bound


@dataclass(frozen=True)
class Candidate:
    """The fewest stages that fit at one tp; `worst` is its fullest rank."""

    tp: int
    pp: int
    nodes: int
    worst: RankMemory  # the rank with the least KV headroom
    pp_across_nodes: bool  # pp == 1, or tp is the node's largest valid tp
    kv_tokens: int  # tokens the engine caches: the fewest any rank holds

    @property
    def world(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Rejection:
    tp: tuple[int, ...]  # the tp degree(s) this reason covers
    pp: tuple[int, int] | None  # the stage counts rejected (inclusive); None: every pp
    reason: str


@dataclass(frozen=True)
class Suggestion:
    gpu: Gpu
    budget: KvBudget
    limits: EngineLimits
    gpus_per_node: int
    candidates: tuple[Candidate, ...]  # best first (see suggest_layout)
    rejected: tuple[Rejection, ...]

    @property
    def choice(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def suggest_layout(
    shapes: ModelShapes,
    base: Recipe,
    gpu: Gpu,
    budget: KvBudget,
    *,
    gpus_per_node: int = 8,
    limits: EngineLimits | None = None,
) -> Suggestion:
    """`base` carries what the search keeps fixed (dtype, costs); it sets tp and pp.
    Candidates (the fewest fitting stages per tp) in order: those with PP only across nodes
    before those with PP inside a node, then fewest GPUs, then the most TP."""
    hp = shapes.hparams
    limits = limits or EngineLimits.for_gpu(gpu.name, gpu.total_bytes)
    if gpus_per_node < 1:
        raise LayoutError(f"--gpus-per-node {gpus_per_node}: need at least 1.")
    base = dataclasses.replace(base, tp=1, pp=1, ep=1, dp=1, stages=None)
    weights = weight_lower_bound(shapes, base)
    valid = valid_tp(hp, max(gpus_per_node, 128))
    node_tp = max(t for t in valid if t <= gpus_per_node)
    candidates, rejected = [], []
    for tp in range(1, gpus_per_node + 1):
        if tp not in valid:
            rejected.append(Rejection((tp,), None, tp_problem(hp, tp)))
            continue
        found, why = _fewest_stages(shapes, base, Fit(gpu, budget, limits), tp, weights)
        rejected.extend(why)
        if found is not None:
            pp, worst, tokens = found
            nodes = -(-pp // (gpus_per_node // tp))  # a TP group never spans nodes
            candidates.append(Candidate(tp, pp, nodes, worst, pp == 1 or tp == node_tp, tokens))
    beyond = tuple(t for t in valid if t > gpus_per_node)
    if beyond:
        rejected.append(
            Rejection(
                beyond,
                None,
                f"more than the {gpus_per_node} GPUs of a node: TP all-reduces after every "
                "layer and needs the node's NVLink; span nodes with pp instead",
            )
        )
    candidates.sort(key=lambda c: (not c.pp_across_nodes, c.world, -c.tp))
    return Suggestion(gpu, budget, limits, gpus_per_node, tuple(candidates), tuple(rejected))


@dataclass(frozen=True)
class TpBytes:
    """Weight bytes each TP rank holds per item at one tp, read off the OutTensors of a Plan
    built over one representative layer per distinct layer shape (slicing does not depend on
    pp, and layers of one shape slice alike), so any pp costs a sum, not a Plan."""

    tp: int
    layers: tuple[tuple[int, ...], ...]  # [layer][tp_rank]
    embed: tuple[int, ...]  # [tp_rank]: the embedding (the first stage)
    head: tuple[int, ...]  # [tp_rank]: final norm + lm_head (the last stage)
    tied: bool  # a last stage without the embedding writes its own copy as lm_head

    def rank_weights(self, stage: Stage, tp_rank: int) -> int:
        n = sum(self.layers[i][tp_rank] for i in stage.layers)
        if stage.embed:
            n += self.embed[tp_rank]
        if stage.head:
            n += self.head[tp_rank] + (self.embed[tp_rank] if self.tied and not stage.embed else 0)
        return n


def tp_bytes(shapes: ModelShapes, base: Recipe, tp: int) -> TpBytes:
    hp = shapes.hparams
    by_shape: dict[tuple, list[int]] = {}
    for layer, signature in enumerate(_layer_signatures(shapes)):
        by_shape.setdefault(signature, []).append(layer)
    reps = {layers[0] for layers in by_shape.values()}
    subset = {n: e for n, e in shapes.tensors.items() if shapes.roles[n].layer in (None, *reps)}
    whole = (Stage(0, 0, hp.num_layers - 1, True, True),)
    recipe = dataclasses.replace(base, tp=tp)
    check_layout(hp, recipe)
    plan = build_plan(hp, subset, shapes.roles, recipe, whole, {})
    rep_bytes = {layer: [0] * tp for layer in reps}
    embed, head = [0] * tp, [0] * tp
    for f in plan.files:
        tp_rank = plan.layout.coord(f.rank).tp_rank
        for t in f.tensors:
            role = shapes.roles[t.name]
            if role.layer is not None:
                rep_bytes[role.layer][tp_rank] += t.nbytes
            elif role.role == "vocab":
                embed[tp_rank] += t.nbytes
            else:
                head[tp_rank] += t.nbytes
    layers = [()] * hp.num_layers
    for group in by_shape.values():
        for layer in group:
            layers[layer] = tuple(rep_bytes[group[0]])
    return TpBytes(tp, tuple(layers), tuple(embed), tuple(head), hp.tie_word_embeddings)


def _layer_signatures(shapes: ModelShapes) -> list[tuple]:
    """Per layer, its tensors (name without the layer index, dtype, shape, role), sorted."""
    sig: list[list] = [[] for _ in range(shapes.hparams.num_layers)]
    for name, (dtype, shape) in shapes.tensors.items():
        role = shapes.roles[name]
        if role.layer is not None and role.role != "drop":
            local = name.replace(f"layers.{role.layer}.", "layers.*.", 1)
            sig[role.layer].append((local, dtype, shape, role.role))
    return [tuple(sorted(s)) for s in sig]


@dataclass(frozen=True)
class Fit:
    """What every rank must fit: the GPU's budget, the KV cache demand, the engine settings."""

    gpu: Gpu | None
    budget: KvBudget
    limits: EngineLimits


def layout_ranks(shapes: ModelShapes, base: Recipe, fit: Fit, tb: TpBytes, pp: int) -> list:
    """One replica's ranks (RankMemory) at (tb.tp, pp), with the stages convert would use."""
    hp, tp = shapes.hparams, tb.tp
    stages = resolve_stages(hp, dataclasses.replace(base, tp=tp, pp=pp))
    return [_stage_rank(hp, stage, tp_rank, tb, fit) for stage in stages for tp_rank in range(tp)]


def _stage_rank(hp: HParams, stage: Stage, tp_rank: int, tb: TpBytes, fit: Fit) -> RankMemory:
    coord = (stage.stage * tb.tp + tp_rank, 0, stage.stage, tp_rank)
    weights = tb.rank_weights(stage, tp_rank)
    return rank_memory(
        hp, stage, coord, weights, tp=tb.tp, gpu=fit.gpu, budget=fit.budget, limits=fit.limits
    )


def _fewest_stages(
    shapes: ModelShapes, base: Recipe, fit: Fit, tp: int, weights: int
) -> tuple[tuple[int, RankMemory, int] | None, list[Rejection]]:
    """The smallest pp that fits at this tp, and why each smaller pp does not."""
    hp, gpu = shapes.hparams, fit.gpu
    tb = tp_bytes(shapes, base, tp)
    edge = _edge_rank(hp, tb, fit)
    if edge.headroom_bytes < 0:
        return None, [Rejection((tp,), None, "even one decoder layer per stage: " + why_not(edge))]
    # Every rank holds at least the non-torch memory; the rest (weights + KV) averages out
    # over the world: no fewer stages can fit.
    kv = tp * sum(layer_kv_bytes(hp, i, tp, fit.budget) for i in range(hp.num_layers))
    room = gpu.budget_bytes - fit.limits.non_torch_bytes
    first = max(1, -(-(weights + kv) // (tp * room))) if room > 0 else hp.num_layers + 1
    why = []
    if first > 1:
        average = _average_reason(weights, kv, tp * (first - 1), fit)
        at = f"at pp {first - 1}, " if first > 2 else ""
        why.append(Rejection((tp,), (1, min(first - 1, hp.num_layers)), at + average))
    for pp in range(first, hp.num_layers + 1):
        ranks = layout_ranks(shapes, base, fit, tb, pp)
        worst = min(ranks, key=_room)
        if worst.headroom_bytes >= 0:
            return (pp, worst, min(r.kv_tokens for r in ranks if r.kv_token_bytes)), why
        why.append(Rejection((tp,), (pp, pp), why_not(worst)))
    return None, why


def why_not(r: RankMemory) -> str:
    """Why a rank does not fit, in vLLM's terms and with every number."""
    parts = (
        f"weights {format_gb(r.weight_bytes)} + non-torch {format_gb(r.non_torch_bytes)} + "
        f"activation peak {format_gb(r.activation_bytes)} = {format_gb(r.fixed_bytes)} of the "
        f"{format_gb(r.budget_bytes)} budget"
    )
    where = f"rank {r.rank} (stage {r.pp_stage})"
    if r.kv_cache_bytes <= 0:
        return f"{where}: {parts}, no memory left for the KV cache"
    return (
        f"{where}: {parts} leaves {format_gb(r.kv_cache_bytes)} of KV cache "
        f"({r.kv_tokens:,} tokens), {format_gb(r.kv_bytes)} needed"
    )


def _room(r: RankMemory) -> tuple[int, int]:
    return r.headroom_bytes, r.rank


def _edge_rank(hp: HParams, tb: TpBytes, fit: Fit) -> RankMemory:
    """The fullest rank of any pp holds at least an end stage with a single layer: the
    embedding and layer 0, or the head (and its tied copy) and the last layer."""
    last = hp.num_layers - 1
    first_stage = Stage(0, 0, 0, True, False)
    last_stage = Stage(1, last, last, False, True)
    ranks = [
        _stage_rank(hp, stage, r, tb, fit)
        for stage in (first_stage, last_stage)
        for r in range(tb.tp)
    ]
    return min(ranks, key=_room)


def _average_reason(weights: int, kv: int, world: int, fit: Fit) -> str:
    gpus = "one GPU" if world == 1 else f"{world} GPUs"
    gpu, non_torch = fit.gpu, fit.limits.non_torch_bytes
    return (
        f"{format_gb(weights)} of weights + {format_gb(kv)} of KV cache on {gpus} is at least "
        f"{format_gb(-(-(weights + kv) // world))} a GPU, + {format_gb(non_torch)} non-torch; "
        f"the budget is {format_gb(gpu.budget_bytes)} "
        f"({gpu.utilization:g} x {format_gb(gpu.total_bytes)})"
    )


def tp_problem(hp: HParams, tp: int) -> str:
    """Why valid_tp leaves `tp` out, in a few words."""
    if hp.num_heads % tp:
        return f"heads {hp.num_heads} not divisible"
    kv = hp.num_kv_heads
    if kv % tp and tp % kv:
        return f"kv heads {kv} neither divisible by {tp} nor dividing it"
    if hp.intermediate_size and hp.intermediate_size % tp:
        return f"intermediate_size {hp.intermediate_size} not divisible"
    quantized = split_problems(hp, tp)
    if quantized:  # a split that would cut an FP8 block or an int4 pack/group
        return quantized[0]
    return "the MLP widths do not split evenly (see `reshard plan --tp N`)"
