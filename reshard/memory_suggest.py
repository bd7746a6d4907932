"""`reshard plan --suggest`: the smallest layout (tp x pp) whose every rank holds its weights
and the KV budget on the given GPU, keeping TP inside a node and PP across nodes: tp grows up
to a node (tp <= gpus_per_node, from plan.valid_tp) before pp > 1 is used, and then only with
the node's largest valid tp. Layouts with fewer GPUs that need PP inside a node are listed as
alternatives. The real Plan (the one convert writes) is built only where cheap lower bounds do
not already rule a layout out; every smaller or invalid layout's rejection is recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import LayoutError
from .hparams import HParams
from .memory import GB, Gpu, KvBudget, RankMemory, layer_kv_bytes, memory_report
from .memory_plan import ModelShapes, build_layout, weight_lower_bound, written_bytes
from .plan import valid_tp
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
            nodes = -(-tp * pp // gpus_per_node)
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


def _fewest_stages(
    shapes: ModelShapes, base: Recipe, gpu: Gpu, budget: KvBudget, tp: int, weights: int
) -> tuple[tuple[int, RankMemory] | None, list[Rejection]]:
    """The smallest pp that fits at this tp, and why each smaller pp does not."""
    hp = shapes.hparams
    usable = gpu.usable_bytes
    kv = tp * sum(layer_kv_bytes(hp, i, tp, budget) for i in range(hp.num_layers))
    edge = _edge_stage_bound(shapes, base, budget, tp)
    if edge > usable:
        return None, [
            Rejection(
                (tp,),
                None,
                f"even one decoder layer per stage puts {_gb(edge)} on an end stage's rank "
                f"(embedding or lm_head / {tp} + a layer + its KV cache); {_gb(usable)} usable",
            )
        ]
    # The average rank holds (weights + KV) / world: no fewer stages can fit.
    first = max(1, -(-(weights + kv) // (tp * usable)))
    why = []
    if first > 1:
        average = _average_reason(weights, kv, tp * (first - 1), gpu)
        why.append(Rejection((tp,), (1, first - 1), average))
    for pp in range(first, hp.num_layers + 1):
        try:
            plan = build_layout(shapes, dataclasses.replace(base, tp=tp, pp=pp))
        except LayoutError as e:
            why.append(Rejection((tp,), (pp, pp), str(e)))
            continue
        report = memory_report(plan, gpu, budget)
        if report.fits:
            return (pp, report.worst), why
        w = report.worst
        why.append(
            Rejection(
                (tp,),
                (pp, pp),
                f"rank {w.rank} (stage {w.pp_stage}) needs {_gb(w.total_bytes)} "
                f"({_gb(w.weight_bytes)} weights + {_gb(w.kv_bytes)} KV); {_gb(usable)} usable",
            )
        )
    return None, why


def _average_reason(weights: int, kv: int, world: int, gpu: Gpu) -> str:
    gpus = "one GPU" if world == 1 else f"{world} GPUs"
    return (
        f"{_gb(weights)} of weights + {_gb(kv)} of KV cache on {gpus} is at least "
        f"{_gb(-(-(weights + kv) // world))} a GPU; {_gb(gpu.usable_bytes)} usable of "
        f"{gpu.memory_bytes / GB:g} GB"
    )


def _edge_stage_bound(shapes: ModelShapes, base: Recipe, budget: KvBudget, tp: int) -> int:
    """A lower bound on the fullest rank of any pp: the first stage holds the embedding and
    layer 0, the last the final norm, lm_head and the last layer, each split at best tp ways."""
    hp = shapes.hparams
    per_layer = [0] * hp.num_layers
    ends = {"embed": 0, "head": 0}
    for name, entry in shapes.tensors.items():
        role = shapes.roles[name]
        if role.role == "drop":
            continue
        size = written_bytes(entry, base)
        if role.layer is not None:
            per_layer[role.layer] += size
        elif role.role == "vocab":
            ends["embed"] += size
            ends["head"] += size if hp.tie_word_embeddings else 0
        else:
            ends["head"] += size
    last = hp.num_layers - 1
    first_stage = (ends["embed"] + per_layer[0]) // tp + layer_kv_bytes(hp, 0, tp, budget)
    last_stage = (ends["head"] + per_layer[last]) // tp + layer_kv_bytes(hp, last, tp, budget)
    return max(first_stage, last_stage)


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
