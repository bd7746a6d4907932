"""vLLM's `sharded_state` format (vLLM 0.32's ShardedStateLoader; REFERENCES.md).

Each TP rank of each PP stage gets `model-rank-{tp}-part-{k}.safetensors` (pp 1) or
`model-pp-{pp}-tp-{tp}-part-{k}.safetensors`, holding the parameters and persistent buffers
of vLLM's model *before* its post-load processing, under vLLM's names:
- q/k/v stacked as `qkv_proj` ([q_r; k_r; v_r], kv heads replicated as the plan cut them),
  gate/up as `gate_up_proj`, MLA's q_a/kv_a as `fused_qkv_a_proj`;
- routed experts stacked as `experts.routed_experts.w13_weight` [E_local, 2*I_r, H]
  ([gate_r; up_r] per expert) and `...w2_weight` [E_local, H, I_r];
- the vocab padded to a multiple of 64, split evenly; tied embeddings as `lm_head.weight`
  wherever the head is (vLLM keeps the smaller key of tensors sharing storage);
- each attention layer's `attn._k_scale`, `_v_scale`, `_q_scale`, `_prob_scale` (fp32 1.0).
Stacked tensors are the native pieces at offsets (Part), so nothing is re-cut. Which
families vLLM has, and the names only some of vLLM's model files use (where a module is
registered twice and the loader keeps the smaller key), are data in each family module
(`Family.formats`, `Family.vllm_renames`), as are the parameters vLLM keeps transposed
(gpt-oss's experts: `OutTensor.transposed`) and the biases it holds on one rank of an expert
only (zeros elsewhere: a constant whose part is the native bias, for the runtime).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ...errors import LayoutError
from ...models import family_of
from ..tensors import OutFile, OutTensor, Part, Piece, swap_last
from .native import group_by_size

VERSIONS = ("0.32",)  # contracts implemented, checked against that version's loader
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE
SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")


@dataclass(frozen=True)
class Stack:
    """Native tensors matching `pattern` become parts of one vLLM tensor `target` (a format
    string over the pattern's groups), concatenated on dim 0 in `members` order (group `m`;
    a member may have several spellings, "gate_proj|w1"); with `experts` (group `e`), each
    local expert is one slot of a new leading dim, in ascending expert order."""

    pattern: str
    target: str
    members: tuple[str, ...]
    experts: bool = False

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern + "$")

    def member_index(self, m: str) -> int:
        return next(i for i, names in enumerate(self.members) if m in names.split("|"))


# Which native names vLLM 0.32 stacks, for every family it loads: names, not families. The
# first match wins, so expert rules come before the dense gate/up rule.
STACKS = (
    # Qwen-MoE / DeepSeek (gate_proj, up_proj, down_proj) and Mixtral (w1, w3, w2) experts
    Stack(
        r"(?P<p>.+\.experts)\.(?P<e>\d+)\.(?P<m>gate_proj|up_proj|w1|w3)\.weight",
        "{p}.routed_experts.w13_weight",
        ("gate_proj|w1", "up_proj|w3"),
        experts=True,
    ),
    Stack(
        r"(?P<p>.+\.experts)\.(?P<e>\d+)\.(?P<m>down_proj|w2)\.weight",
        "{p}.routed_experts.w2_weight",
        ("down_proj|w2",),
        experts=True,
    ),
    Stack(
        r"(?P<p>.+\.self_attn)\.(?P<m>[qkv])_proj\.(?P<w>weight|bias)",
        "{p}.qkv_proj.{w}",
        ("q", "k", "v"),
    ),
    Stack(r"(?P<p>.+)\.(?P<m>gate|up)_proj\.weight", "{p}.gate_up_proj.weight", ("gate", "up")),
    Stack(  # Qwen3.5's DeltaNet inputs stored apart: [q; k; v] then z, and b then a
        r"(?P<p>.+\.linear_attn)\.(?P<m>in_proj_qkv|in_proj_z)\.weight",
        "{p}.in_proj_qkvz.weight",
        ("in_proj_qkv", "in_proj_z"),
    ),
    Stack(
        r"(?P<p>.+\.linear_attn)\.(?P<m>in_proj_b|in_proj_a)\.weight",
        "{p}.in_proj_ba.weight",
        ("in_proj_b", "in_proj_a"),
    ),
    Stack(  # DeepSeek MLA with q_lora_rank: [q_a; kv_a_with_mqa]
        r"(?P<p>.+\.self_attn)\.(?P<m>q_a_proj|kv_a_proj_with_mqa)\.weight",
        "{p}.fused_qkv_a_proj.weight",
        ("q_a_proj", "kv_a_proj_with_mqa"),
    ),
)
# Every attention layer: o_proj's module holds the attention whose scales vLLM keeps.
ATTENTION = re.compile(r"(?P<p>.+\.self_attn)\.o_proj\.weight$")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class VllmFormat:
    name: str = "vllm"

    def vocab_padded(self, vocab_size: int, tp: int) -> int:
        return -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING

    def check(self, hp, recipe) -> None:
        from .vllm_check import check_vllm_layout

        check_vllm_layout(hp, recipe, VERSIONS)

    def check_plan(self, layout, placements) -> None:
        from .vllm_check import check_vllm_plan

        check_vllm_plan(layout, placements)

    def rank_files(self, hp, layout, coord, tensors: list[OutTensor], max_size) -> list[OutFile]:
        stage = layout.stages[coord.pp_stage]
        family = family_of(hp)
        renames = tuple((re.compile(p + "$"), t) for p, t in family.vllm_renames)
        tensors = [_as_float32(t, family.vllm_float32) for t in tensors]
        out = vllm_tensors(
            tensors, tied_head=hp.tie_word_embeddings and stage.head, renames=renames
        )
        out = [_as_transposed(t, family.vllm_transposed) for t in out]
        if coord.etp_rank:  # vLLM adds these biases on an expert's first TP rank only
            out = [_as_zeros(t, family.vllm_first_rank_bias) for t in out]
        groups = group_by_size(out, max_size)
        stem = (
            f"model-rank-{coord.tp_rank}"
            if layout.pp == 1
            else f"model-pp-{coord.pp_stage}-tp-{coord.tp_rank}"
        )
        return [
            OutFile(f"{stem}-part-{i}.safetensors", coord.rank, tuple(g))
            for i, g in enumerate(groups)
        ]

    def side_files(self, plan) -> dict[str, bytes]:
        from .vllm_serve import SERVE_SCRIPT, serve_script

        return {SERVE_SCRIPT: serve_script(plan).encode()}

    def manifest_entry(self, layout) -> dict | None:
        return {"name": self.name, "vllm_version": layout.format_version}


VLLM = VllmFormat()


def _as_float32(t: OutTensor, patterns: tuple[str, ...]) -> OutTensor:
    """A tensor vLLM keeps in float32, written as F32 (cast from a 16-bit float)."""
    if t.dtype in ("BF16", "F16") and _matches(t.name, patterns):
        return replace(t, dtype="F32")
    return t


def _as_transposed(t: OutTensor, patterns: tuple[str, ...]) -> OutTensor:
    """A parameter vLLM keeps with its last two dims swapped, stored so; its pieces and parts
    keep their places in the untransposed tensor."""
    if not _matches(t.name, patterns):
        return t
    if len(t.shape) < 2 or t.padding or any(len(p.dest) != len(t.shape) for p in t.pieces):
        # internal invariant: a family marks only whole-rank expert stacks transposed
        raise AssertionError(f"vLLM's '{t.name}' {list(t.shape)} cannot be stored transposed")
    return replace(t, shape=swap_last(t.shape), transposed=True)


def _as_zeros(t: OutTensor, patterns: tuple[str, ...]) -> OutTensor:
    """A bias vLLM zeroes on this rank: a constant 0 with no source bytes, still holding its
    native part (the runtime then builds the same zeros, and never adds them)."""
    if not _matches(t.name, patterns):
        return t
    return replace(t, pieces=(), fill=0.0)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def vllm_tensors(tensors: list[OutTensor], *, tied_head: bool, renames=()) -> list[OutTensor]:
    """A rank's native tensors as vLLM's: stacked, renamed, with the attention scales."""
    members: dict[str, list[tuple[tuple[int, int], OutTensor]]] = {}
    stacks: dict[str, Stack] = {}
    order: list[str] = []
    names = {t.name for t in tensors}
    for t in tensors:
        name, stack, key = _target(t.name, renames)
        if tied_head and EMBED in names:  # one tied tensor, under the key vLLM keeps
            if t.name == HEAD:
                continue  # vLLM ties the head to the embedding: the embedding's bytes win
            name = _renamed(HEAD, renames) if t.name == EMBED else name
        if name not in members:
            order.append(name)
        members.setdefault(name, []).append((key, t))
        stacks[name] = stack
        if m := ATTENTION.match(t.name):
            for scale in SCALES:
                const = _renamed(f"{m['p']}.attn.{scale}", renames)
                order.append(const)
                members[const] = []
    return [_build(name, stacks.get(name), members[name]) for name in order]


def _target(name: str, renames) -> tuple[str, Stack | None, tuple[int, int]]:
    """The vLLM tensor a native tensor goes to, its rule, and its (expert, member) sort key."""
    for stack in STACKS:
        if m := stack.regex.match(name):
            groups = m.groupdict()
            expert = int(groups["e"]) if stack.experts else 0
            target = _renamed(stack.target.format(**groups), renames)
            return target, stack, (expert, stack.member_index(m["m"]))
    return _renamed(name, renames), None, (0, 0)


def _renamed(name: str, renames) -> str:
    """A family's own vLLM name (Family.vllm_renames), else the name as it is."""
    for pattern, target in renames:
        if m := pattern.match(name):
            return target.format(**m.groupdict())
    return name


def _build(name: str, stack: Stack | None, members) -> OutTensor:
    if not members:  # an attention scale: a constant, no source
        return OutTensor(name, "F32", "F32", (), (), 0, fill=1.0)
    if stack is None:
        (_, t), *more = members
        if more:
            raise LayoutError(
                f"vLLM {VERSIONS[-1]} keeps one tensor as '{name}', but this checkpoint has "
                f"{' and '.join(x.name for _, x in members)} for it (an untied head where "
                "vLLM's model ties it to the embedding?). Convert with --format native."
            )
        if t.name == name:
            return t
        return OutTensor(name, t.dtype, t.source_dtype, t.shape, t.pieces, t.padding,
                         (Part(t.name, t.shape, tuple(0 for _ in t.shape)),))  # fmt: skip
    members = sorted(members, key=lambda kt: kt[0])
    _check_members(name, stack, members)
    if stack.experts:
        return _stack_experts(name, members)
    return _concat(name, [t for _, t in members], lead=())


def _check_members(name: str, stack: Stack, members) -> None:
    got = {}
    for (expert, index), _ in members:
        got.setdefault(expert, set()).add(index)
    for expert, indices in got.items():
        if indices != set(range(len(stack.members))):
            missing = [stack.members[i] for i in range(len(stack.members)) if i not in indices]
            raise LayoutError(
                f"vLLM's '{name}' stacks {', '.join(stack.members)}, but this rank has no "
                f"{' / '.join(missing)}{f' for expert {expert}' if stack.experts else ''}. "
                "The checkpoint lacks a tensor vLLM needs; convert with --format native."
            )


def _stack_experts(name: str, members) -> OutTensor:
    by_expert: dict[int, list[OutTensor]] = {}
    for (expert, _), t in members:
        by_expert.setdefault(expert, []).append(t)
    slots = [_concat(name, ts, lead=(slot,)) for slot, ts in enumerate(by_expert.values())]
    first = slots[0]
    shape = (len(slots), *first.shape)
    if any(s.shape != first.shape for s in slots):
        raise LayoutError(f"vLLM's '{name}': experts of different shapes cannot be stacked.")
    pieces = tuple(p for s in slots for p in s.pieces)
    parts = tuple(p for s in slots for p in s.parts)
    return OutTensor(name, first.dtype, first.source_dtype, shape, pieces, 0, parts)


def _concat(name: str, tensors: list[OutTensor], *, lead: tuple[int, ...]) -> OutTensor:
    """Tensors stacked on dim 0 (after the `lead` indices of a stacked expert)."""
    first = tensors[0]
    rest = first.shape[1:]
    for t in tensors:
        if t.shape[1:] != rest or t.dtype != first.dtype or t.padding:
            raise LayoutError(
                f"vLLM's '{name}' stacks {', '.join(x.name for x in tensors)}, but "
                f"{t.name} has shape {list(t.shape)} and dtype {t.dtype} against "
                f"{list(first.shape)} {first.dtype}. config.json and the weights disagree."
            )
    pieces, parts, row = [], [], 0
    for t in tensors:
        at = (*lead, row, *(0 for _ in rest))
        parts.append(Part(t.name, t.shape, at))
        pieces.extend(shifted(p, at) for p in t.pieces)
        row += t.shape[0]
    shape = (row, *rest)
    return OutTensor(name, first.dtype, first.source_dtype, shape, tuple(pieces), 0, tuple(parts))


def shifted(p: Piece, at: tuple[int, ...]) -> Piece:
    """A piece of a native tensor placed at `at` in a stacked one (leading dims: indices)."""
    k = len(at) - len(p.dest)
    dest = (*at[:k], *(d + a for d, a in zip(p.dest, at[k:], strict=True)))
    return Piece(p.source, p.start, p.stop, dest)
