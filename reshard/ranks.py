"""The one global rank order, TP fastest: rank = (dp_index * pp + pp_stage) * tp + tp_rank.
The plan numbers its ranks with it, the manifest records and re-checks it. Plain ints only.
"""

from __future__ import annotations

RANK_ORDER = "rank = (dp_index * pp + pp_stage) * tp + tp_rank"  # recorded in the manifest


def global_rank(dp_index: int, pp_stage: int, tp_rank: int, *, tp: int, pp: int) -> int:
    """(dp_index, pp_stage, tp_rank) -> rank, as RANK_ORDER says."""
    return (dp_index * pp + pp_stage) * tp + tp_rank


def rank_coords(rank: int, *, tp: int, pp: int) -> tuple[int, int, int]:
    """rank -> (dp_index, pp_stage, tp_rank): the inverse of global_rank."""
    dp_index, rest = divmod(rank, tp * pp)
    pp_stage, tp_rank = divmod(rest, tp)
    return dp_index, pp_stage, tp_rank


def replica_base(rank: int, *, tp: int, pp: int) -> int:
    """The rank of replica 0 whose files `rank` loads (DP replicas share files)."""
    _, pp_stage, tp_rank = rank_coords(rank, tp=tp, pp=pp)
    return global_rank(0, pp_stage, tp_rank, tp=tp, pp=pp)
