"""The plan: a pure function from (hparams, tensor roles, recipe, stages, expert placement) to
every rank's output files and every output tensor as pieces of source tensors.

No I/O. Infeasible layouts fail here, before a byte is read, with the numbers and a fix.
The writer executes a Plan without making a single decision of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..dtypes import CAST_DTYPES
from ..errors import LayoutError
from ..models.hparams import HParams
from ..models.rules import TensorRole
from ..quant import check_parts, logical_shape
from ..quant.slicing import stored_pieces
from ..ranks import rank_coords, replica_base
from .experts.place import Placement
from .formats import format_named
from .recipe import Recipe
from .tensors import OutFile, OutTensor, Piece


@dataclass(frozen=True)
class Stage:
    stage: int
    first_layer: int  # inclusive; first > last means a stage without decoder layers
    last_layer: int
    embed: bool
    head: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


@dataclass(frozen=True)
class Coord:
    rank: int
    dp_index: int
    pp_stage: int
    tp_rank: int
    ep_rank: int
    etp_rank: int


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    dp: int
    stages: tuple[Stage, ...]
    vocab_size: int
    vocab_padded: int
    dtype: str  # "keep" or a cast target
    keep_mtp: bool = False  # MTP layer written whole on the last stage's tp_rank 0
    format: str = "native"  # how rank files are named and filled (layout/formats/)
    format_version: str | None = None  # the engine version a format targets (vLLM: "0.32")

    @property
    def etp(self) -> int:
        return self.tp // self.ep

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def coord(self, rank: int) -> Coord:
        dp_index, pp_stage, tp_rank = rank_coords(rank, tp=self.tp, pp=self.pp)
        return Coord(rank, dp_index, pp_stage, tp_rank, tp_rank // self.etp, tp_rank % self.etp)


@dataclass(frozen=True)
class RankPlan:
    coord: Coord
    files: tuple[str, ...]
    replica_of: int | None  # DP replicas reuse the files of replica 0


@dataclass(frozen=True)
class ExpertSetup:
    """The recipe's expert placement settings, recorded beside the maps (manifest)."""

    redundant: int  # extra expert slots per layer
    placement: str  # "contiguous", "balanced", ...
    load: str | None  # the measured load the placement used


@dataclass(frozen=True)
class Plan:
    hparams: HParams  # quantization included (its scheme travels into the manifest)
    layout: Layout
    ranks: tuple[RankPlan, ...]
    files: tuple[OutFile, ...]  # replica 0's files only
    dropped: tuple[str, ...]  # source tensors deliberately not written (derivable)
    placements: Mapping[int, Placement]  # MoE layer -> where its experts went
    experts: ExpertSetup | None = None  # how they were placed (set with placements)

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def build_plan(
    hp: HParams,
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    roles: Mapping[str, TensorRole],
    recipe: Recipe,
    stages: tuple[Stage, ...],
    placements: Mapping[int, Placement] | None = None,
) -> Plan:
    """`tensors`: name -> (dtype, shape) in source file order; `roles` from match_tensors.
    The layout was checked by the caller (resolve.py, or the suggest loop)."""
    check_parts(hp.quantization, tensors, roles, where="the checkpoint")
    fmt = format_named(recipe.format)
    fmt.check(hp, recipe)
    padded = fmt.vocab_padded(hp.vocab_size, recipe.tp)
    layout = Layout(
        recipe.tp,
        recipe.pp,
        recipe.ep,
        recipe.dp,
        stages,
        hp.vocab_size,
        padded,
        recipe.dtype,
        recipe.keep_mtp,
        fmt.name,
        recipe.vllm_version if fmt.name == "vllm" else None,
    )
    placements = placements or {}
    fmt.check_plan(layout, placements)
    files: list[OutFile] = []
    ranks: list[RankPlan] = []
    for rank in range(layout.world_size):
        coord = layout.coord(rank)
        if coord.dp_index:
            replica = ranks[replica_base(rank, tp=layout.tp, pp=layout.pp)]
            ranks.append(RankPlan(coord, replica.files, replica.coord.rank))
            continue
        out = _rank_tensors(hp, tensors, roles, layout, coord, placements)
        rank_files = fmt.rank_files(hp, layout, coord, out, recipe.max_file_size)
        files.extend(rank_files)
        ranks.append(RankPlan(coord, tuple(f.name for f in rank_files), None))
    dropped = tuple(n for n, r in roles.items() if r.role == "drop" and not _kept_mtp(layout, r))
    setup = ExpertSetup(
        recipe.redundant, recipe.placement, str(recipe.load) if recipe.load else None
    )
    return Plan(
        hp, layout, tuple(ranks), tuple(files), dropped, placements, setup if placements else None
    )


def _stages_of(stages: tuple[Stage, ...], role: TensorRole) -> list[int]:
    """The stages that hold a tensor under its own name."""
    if role.layer is not None:
        return [s.stage for s in stages if role.layer in s.layers]
    if role.role == "vocab":
        return [s.stage for s in stages if s.embed]
    return [s.stage for s in stages if s.head]


def _rank_tensors(hp, tensors, roles, layout: Layout, coord: Coord, placements) -> list[OutTensor]:
    out: list[OutTensor] = []
    stage = layout.stages[coord.pp_stage]
    scheme = hp.quantization
    for name, (dtype, shape) in tensors.items():
        role = roles[name]
        out_dtype = _out_dtype(dtype, layout.dtype)
        if role.role == "vocab" and hp.tie_word_embeddings and stage.head and not stage.embed:
            # A last stage without the embedding gets its own copy of it to use as lm_head.
            _, pieces, local, padding = _slice_vocab(layout, coord, name, shape, "lm_head.weight")
            out.append(OutTensor("lm_head.weight", out_dtype, dtype, local, pieces, padding))
        if _kept_mtp(layout, role):
            if stage.head and coord.tp_rank == 0:
                out.append(OutTensor(name, out_dtype, dtype, shape, (_whole(name, shape),), 0))
            continue
        if role.role == "drop" or coord.pp_stage not in _stages_of(layout.stages, role):
            continue
        logical = logical_shape(scheme, role.logical, tensors) if role.part else shape
        for out_name, pieces, local, padding in slice_tensor(
            hp, layout, coord, role, logical, placements
        ):
            if role.part:  # the logical weight's slice, mapped onto this stored part
                pieces, local = stored_pieces(scheme, role, pieces, logical, shape)
            out.append(OutTensor(out_name, out_dtype, dtype, local, pieces, padding))
    return out


def _kept_mtp(layout: Layout, role: TensorRole) -> bool:
    """DeepSeek's multi-token-prediction layer, written only under --keep-mtp."""
    return role.rule.scope == "mtp" and layout.keep_mtp


def _out_dtype(dtype: str, target: str) -> str:
    if target == "keep" or dtype not in CAST_DTYPES.values():
        return dtype  # integers, fp8 and friends are never cast
    return CAST_DTYPES[target]


def slice_tensor(hp, layout: Layout, coord: Coord, role: TensorRole, shape, placements):
    """Yield (output name, pieces, local shape, padding rows) for one source tensor."""
    kind = role.role
    if kind == "replicate":
        yield role.name, (_whole(role.name, shape),), tuple(shape), 0
    elif kind in ("vocab", "head"):
        yield _slice_vocab(layout, coord, role.name, shape, role.name)
    elif kind == "column":
        lo, hi = _column_range(hp, layout.tp, coord.tp_rank, role.name, role.rule.heads, shape)
        yield role.name, (_rows(role.name, shape, lo, hi),), (hi - lo, *shape[1:]), 0
    elif kind == "fused_column":
        yield _slice_fused_column(hp, layout.tp, coord.tp_rank, role, shape)
    elif kind == "row":
        lo, hi = _split_range(role.name, shape, 1, layout.tp, coord.tp_rank, _unit(hp, role))
        yield role.name, (_cols(role.name, shape, lo, hi),), (shape[0], hi - lo, *shape[2:]), 0
    elif kind in ("expert_column", "expert_row"):
        if role.expert in _local_experts(placements, role.layer, coord, hp, layout):
            dim = 0 if kind == "expert_column" else 1
            lo, hi = _split_range(role.name, shape, dim, layout.etp, coord.etp_rank, 1)
            local = list(shape)
            local[dim] = hi - lo
            piece = _rows(role.name, shape, lo, hi) if dim == 0 else _cols(role.name, shape, lo, hi)
            yield role.name, (piece,), tuple(local), 0
    elif kind in ("fused_expert_column", "fused_expert_row"):
        yield _slice_fused(hp, layout, coord, role, shape, placements)
    elif kind == "stacked_expert":
        yield _slice_stacked(hp, layout, coord, role, shape, placements)
    else:  # pragma: no cover - ROLES is closed
        raise AssertionError(kind)


def _whole(name: str, shape) -> Piece:
    zeros = tuple(0 for _ in shape)
    return Piece(name, zeros, tuple(shape), zeros)


def _rows(name: str, shape, lo: int, hi: int) -> Piece:
    start = (lo, *(0 for _ in shape[1:]))
    return Piece(name, start, (hi, *shape[1:]), tuple(0 for _ in shape))


def _cols(name: str, shape, lo: int, hi: int) -> Piece:
    start = (0, lo, *(0 for _ in shape[2:]))
    return Piece(name, start, (shape[0], hi, *shape[2:]), tuple(0 for _ in shape))


def _unit(hp: HParams, role: TensorRole) -> int:
    """Rows (or columns) per head of a tensor split on head boundaries."""
    return _head_width(hp, role.rule.heads)


def _head_width(hp: HParams, heads: str | None) -> int:
    per_key = hp.linear_values_per_key
    widths = {
        "q": hp.head_dim,
        "kv": hp.head_dim,
        "qk": hp.qk_head_dim,
        "kv_b": hp.qk_nope_head_dim + hp.v_head_dim,
        "v": hp.v_head_dim,
        "head": 1,  # one entry per q head (gpt-oss attention sinks)
        "q_gated": 2 * hp.head_dim,  # [q_h; gate_h] per head
        # Gated DeltaNet, per key head: [q; k; v; z] and [b; a] rows of its group, the
        # group's value heads (A_log, dt_bias), its v channels (conv1d, out_proj), its k.
        "linear_qkvz": 2 * hp.linear_key_head_dim + 2 * per_key * hp.linear_value_head_dim,
        "linear_ba": 2 * per_key,
        "linear_group": per_key,
        "linear_v": per_key * hp.linear_value_head_dim,
        "linear_k": hp.linear_key_head_dim,
    }
    return widths[heads] if heads else 1


def _split_range(name, shape, dim: int, parts: int, index: int, unit: int) -> tuple[int, int]:
    size = shape[dim] if len(shape) > dim else 0
    if size % (parts * unit):
        raise LayoutError(
            f"tensor '{name}' has {size} along dim {dim}, which does not split into {parts} "
            f"equal parts of whole {unit}-wide units. Choose a degree that divides it."
        )
    step = size // parts
    return index * step, (index + 1) * step


def _column_range(hp: HParams, tp: int, tp_rank: int, name: str, heads: str | None, shape):
    if heads == "kv" and hp.num_kv_heads < tp:
        # tp % kv == 0 (checked): each kv head is replicated on tp // kv consecutive ranks,
        # so rank r holds kv head r * kv // tp, the one its query heads use.
        if shape[0] != hp.num_kv_heads * hp.head_dim:
            raise LayoutError(
                f"tensor '{name}' has {shape[0]} rows, expected num_key_value_heads x "
                f"head_dim = {hp.num_kv_heads * hp.head_dim}. config.json and weights disagree."
            )
        head = tp_rank * hp.num_kv_heads // tp
        return head * hp.head_dim, (head + 1) * hp.head_dim
    return _split_range(name, shape, 0, tp, tp_rank, _head_width(hp, heads))


def _fused_part_rows(hp: HParams, parts: tuple[str, ...]) -> tuple[int, ...]:
    """Rows of each part of a fused_column tensor: "q" and "kv" heads x head_dim, "mlp"
    intermediate_size."""
    rows = {
        "q": hp.q_size,
        "kv": hp.kv_size,
        "mlp": hp.intermediate_size,
        "linear_k": hp.linear_key_size,  # a linear layer's conv1d [q; k; v] channels
        "linear_v": hp.linear_value_size,
    }
    return tuple(rows[p] for p in parts)


def _slice_fused_column(hp: HParams, tp: int, tp_rank: int, role: TensorRole, shape):
    """[q; k; v] (or [gate; up]) rows: each part split as its own column tensor would be
    (kv heads replicated when fewer than tp), the rank's slices stacked in the same order."""
    sizes = _fused_part_rows(hp, role.rule.fused)
    if shape[0] != sum(sizes):
        raise LayoutError(
            f"tensor '{role.name}' has {shape[0]} rows, expected {' + '.join(map(str, sizes))} "
            f"= {sum(sizes)} ({' + '.join(role.rule.fused)} parts from config.json). "
            "config.json and weights disagree."
        )
    pieces, offset, dest = [], 0, 0
    for part, size in zip(role.rule.fused, sizes, strict=True):
        heads = None if part == "mlp" else part
        lo, hi = _column_range(hp, tp, tp_rank, role.name, heads, (size, *shape[1:]))
        start, stop = (offset + lo, *(0 for _ in shape[1:])), (offset + hi, *shape[1:])
        pieces.append(Piece(role.name, start, stop, (dest, *(0 for _ in shape[1:]))))
        offset, dest = offset + size, dest + hi - lo
    return role.name, tuple(pieces), (dest, *shape[1:]), 0


def _slice_vocab(layout: Layout, coord: Coord, source: str, shape, out_name: str):
    per = layout.vocab_padded // layout.tp
    lo = coord.tp_rank * per
    hi = min(lo + per, shape[0])
    pieces = (_rows(source, shape, lo, hi),) if hi > lo else ()
    return out_name, pieces, (per, *shape[1:]), per - max(hi - lo, 0)


def _local_experts(placements, layer, coord: Coord, hp: HParams, layout: Layout) -> tuple:
    placement = placements.get(layer)
    if placement is None:  # no EP placement computed: contiguous over ep ranks
        per = hp.num_experts // layout.ep
        return tuple(range(coord.ep_rank * per, (coord.ep_rank + 1) * per))
    return placement.rank_experts(coord.ep_rank)


def _slice_fused(hp, layout: Layout, coord: Coord, role: TensorRole, shape, placements):
    experts = _local_experts(placements, role.layer, coord, hp, layout)
    pieces = []
    if role.role == "fused_expert_column":  # [E, 2I, H]: gate rows then up rows
        half = shape[1] // 2
        lo, hi = _split_range(role.name, (shape[0], half), 1, layout.etp, coord.etp_rank, 1)
        width = hi - lo
        for slot, e in enumerate(experts):
            for part in (0, 1):
                start = (e, part * half + lo, 0)
                stop = (e + 1, part * half + hi, shape[2])
                pieces.append(Piece(role.name, start, stop, (slot, part * width, 0)))
        local = (len(experts), 2 * width, shape[2])
    else:  # [E, H, I]
        lo, hi = _split_range(role.name, shape, 2, layout.etp, coord.etp_rank, 1)
        for slot, e in enumerate(experts):
            pieces.append(Piece(role.name, (e, 0, lo), (e + 1, shape[1], hi), (slot, 0, 0)))
        local = (len(experts), shape[1], hi - lo)
    return role.name, tuple(pieces), local, 0


def _slice_stacked(hp, layout: Layout, coord: Coord, role: TensorRole, shape, placements):
    """[E, ...]: this rank's experts in slot order, each cut along Rule.expert_split."""
    experts = _local_experts(placements, role.layer, coord, hp, layout)
    lo, hi, dim = 0, 0, None
    if role.rule.expert_split:
        dim, unit = role.rule.expert_split
        lo, hi = _split_range(role.name, shape, dim, layout.etp, coord.etp_rank, unit)
    pieces = []
    for slot, e in enumerate(experts):
        start, stop = [e, *(0 for _ in shape[1:])], [e + 1, *shape[1:]]
        if dim is not None:
            start[dim], stop[dim] = lo, hi
        pieces.append(Piece(role.name, tuple(start), tuple(stop), (slot, *(0 for _ in shape[1:]))))
    local = [len(experts), *shape[1:]]
    if dim is not None:
        local[dim] = hi - lo
    return role.name, tuple(pieces), tuple(local), 0
