"""`reshard plan --suggest`: the smallest layout (tp x pp) whose every rank holds its weights
and the KV budget on the given GPU, keeping TP inside a node and PP across nodes: tp grows up
to a node (tp <= gpus_per_node, from plan.valid_tp) before pp > 1 is used, and then only with
the node's largest valid tp. Layouts with fewer GPUs that need PP inside a node are listed as
alternatives. Per-rank bytes come from the real slicing (build_plan over one representative
layer per layer shape; see TpBytes) and the stages convert would use; every smaller or invalid
layout's rejection is recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .convert import resolve_stages
from .errors import LayoutError
from .hparams import HParams
from .memory import GB, Gpu, KvBudget, RankMemory, layer_kv_bytes
from .memory_plan import ModelShapes, weight_lower_bound
from .plan import Stage, build_plan, valid_tp
from .recipe import Recipe


@dataclass(frozen=True)
class Candidate:
    """The fewest stages that fit at one tp; `worst` is its fullest rank."""

    tp: int
    pp: int
    nodes: int
    worst: RankMemory
    pp_across_nodes: bool  # pp == 1, or tp is the node's largest valid tp

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
    gpus_per_node: int
    candidates: tuple[Candidate, ...]  # best first (see suggest_layout)
    rejected: tuple[Rejection, ...]

    @property
    def choice(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def suggest_layout(
    shapes: ModelShapes, base: Recipe, gpu: Gpu, budget: KvBudget, *, gpus_per_node: int = 8
) -> Suggestion:
    """`base` carries what the search keeps fixed (dtype, costs); it sets tp and pp.
    Candidates (the fewest fitting stages per tp) in order: those with PP only across nodes
    before those with PP inside a node, then fewest GPUs, then the most TP."""
    hp = shapes.hparams
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
        found, why = _fewest_stages(shapes, base, gpu, budget, tp, weights)
        rejected.extend(why)
        if found is not None:
            pp, worst = found
            nodes = -(-pp // (gpus_per_node // tp))  # a TP group never spans nodes
            candidates.append(Candidate(tp, pp, nodes, worst, pp == 1 or tp == node_tp))
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
    return Suggestion(gpu, budget, gpus_per_node, tuple(candidates), tuple(rejected))


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
    plan = build_plan(hp, subset, shapes.roles, dataclasses.replace(base, tp=tp), whole, {})
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


def layout_ranks(
    shapes: ModelShapes, base: Recipe, budget: KvBudget, gpu: Gpu | None, tb: TpBytes, pp: int
) -> list[RankMemory]:
    """One replica's ranks at (tb.tp, pp), with the stages convert would use."""
    hp, tp = shapes.hparams, tb.tp
    stages = resolve_stages(hp, dataclasses.replace(base, tp=tp, pp=pp))
    ranks = []
    for stage in stages:
        kv = sum(layer_kv_bytes(hp, i, tp, budget) for i in stage.layers)
        for tp_rank in range(tp):
            weights = tb.rank_weights(stage, tp_rank)
            room = None if gpu is None else gpu.usable_bytes - weights - kv
            span = (stage.first_layer, stage.last_layer)
            rank = stage.stage * tp + tp_rank
            ranks.append(RankMemory(rank, 0, stage.stage, tp_rank, span, weights, kv, room))
    return ranks


def _fewest_stages(
    shapes: ModelShapes, base: Recipe, gpu: Gpu, budget: KvBudget, tp: int, weights: int
) -> tuple[tuple[int, RankMemory] | None, list[Rejection]]:
    """The smallest pp that fits at this tp, and why each smaller pp does not."""
    hp = shapes.hparams
    usable = gpu.usable_bytes
    tb = tp_bytes(shapes, base, tp)
    edge = _edge_bound(hp, tb, budget)
    if edge > usable:
        return None, [
            Rejection(
                (tp,),
                None,
                f"even one decoder layer per stage puts {_gb(edge)} on an end stage's rank "
                f"(embedding or lm_head + a layer + its KV cache); {_gb(usable)} usable",
            )
        ]
    # The average rank holds (weights + KV) / world: no fewer stages can fit.
    kv = tp * sum(layer_kv_bytes(hp, i, tp, budget) for i in range(hp.num_layers))
    first = max(1, -(-(weights + kv) // (tp * usable)))
    why = []
    if first > 1:
        average = _average_reason(weights, kv, tp * (first - 1), gpu)
        at = f"at pp {first - 1}, " if first > 2 else ""
        why.append(Rejection((tp,), (1, first - 1), at + average))
    for pp in range(first, hp.num_layers + 1):
        worst = max(layout_ranks(shapes, base, budget, gpu, tb, pp), key=_fullness)
        if worst.headroom_bytes >= 0:
            return (pp, worst), why
        why.append(
            Rejection(
                (tp,),
                (pp, pp),
                f"rank {worst.rank} (stage {worst.pp_stage}) needs {_gb(worst.total_bytes)} "
                f"({_gb(worst.weight_bytes)} weights + {_gb(worst.kv_bytes)} KV); "
                f"{_gb(usable)} usable",
            )
        )
    return None, why


def _fullness(r: RankMemory) -> tuple[int, int]:
    return r.total_bytes, -r.rank


def _edge_bound(hp: HParams, tb: TpBytes, budget: KvBudget) -> int:
    """The fullest rank of any pp holds at least an end stage with a single layer: the
    embedding and layer 0, or the head (and its tied copy) and the last layer."""
    last = hp.num_layers - 1
    first_stage = Stage(0, 0, 0, True, False)
    last_stage = Stage(1, last, last, False, True)
    return max(
        tb.rank_weights(stage, r) + layer_kv_bytes(hp, stage.first_layer, tb.tp, budget)
        for stage in (first_stage, last_stage)
        for r in range(tb.tp)
    )


def _average_reason(weights: int, kv: int, world: int, gpu: Gpu) -> str:
    gpus = "one GPU" if world == 1 else f"{world} GPUs"
    return (
        f"{_gb(weights)} of weights + {_gb(kv)} of KV cache on {gpus} is at least "
        f"{_gb(-(-(weights + kv) // world))} a GPU; {_gb(gpu.usable_bytes)} usable of "
        f"{gpu.memory_bytes / GB:g} GB"
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
    return "the MLP widths do not split evenly (see `reshard plan --tp N`)"


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"
