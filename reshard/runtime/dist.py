"""The communicator: the only place the runtime touches torch.distributed.

`Comm()` is the world-size-1 no-op version. `build_comm` creates the process groups of a
manifest layout (one TP group per (replica, stage), one group per DP replica) once the
default process group is up. It does not launch processes (see launch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import VerificationError
from ..io.manifest_value import ManifestLayout
from ..ranks import global_rank, rank_coords

_HEADER_LEN = 4  # ndim + up to 3 dims: hidden states are [B, S, H]


@dataclass
class Comm:
    """Coordinates of one rank and its groups. Defaults: a single process, nothing to do."""

    rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    pp: int = 1
    pp_stage: int = 0
    tp_group: Any = None
    replica_group: Any = None
    prev_rank: int | None = None  # same tp_rank on the previous stage
    next_rank: int | None = None  # same tp_rank on the next stage
    head_rank: int = 0  # global rank of tp_rank 0 on this replica's last stage

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer over the TP group (in place)."""
        if self.tp == 1:
            return x
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.tp_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every TP rank's x along the last dim, in tp_rank order."""
        if self.tp == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x, group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def send_hidden(self, x: torch.Tensor) -> None:
        """Send hidden states to the next stage: a shape header first, then the data."""
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=x.device)
        header[0] = x.dim()
        header[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
        dist.send(header, dst=self.next_rank)
        dist.send(x.contiguous(), dst=self.next_rank)

    def recv_hidden(
        self, expected: tuple[int, int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Receive [B, S, H] from the previous stage; the header must match `expected`."""
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
        dist.recv(header, src=self.prev_rank)
        shape = tuple(int(v) for v in header[1 : 1 + int(header[0])].tolist())
        if shape != tuple(expected):
            raise VerificationError(
                f"rank {self.rank} (stage {self.pp_stage}) expected hidden states of shape "
                f"{tuple(expected)} from rank {self.prev_rank}, got {shape}. The stages' shards "
                "disagree on hidden_size or the batch; re-run `reshard convert` into an empty "
                "folder."
            )
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.prev_rank)
        return x

    def broadcast_tokens(self, ids: torch.Tensor | None, batch: int, device: Any) -> torch.Tensor:
        """Next-token ids [B] from the last stage to every rank of this replica (pp > 1 only)."""
        if self.pp == 1:
            assert ids is not None  # with one stage every rank computes the (gathered) logits
            return ids
        if ids is None:
            ids = torch.empty(batch, dtype=torch.int64, device=device)
        dist.broadcast(ids, src=self.head_rank, group=self.replica_group)
        return ids


def build_comm(layout: ManifestLayout, rank: int) -> Comm:
    """Create every group of the layout (all ranks must call this, in the same order)."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    dp_index, pp_stage, tp_rank = rank_coords(rank, tp=tp, pp=pp)
    tp_group = _new_groups(_tp_group_ranks(tp, pp, dp), rank)
    replica_group = _new_groups(_replica_group_ranks(tp, pp, dp), rank)
    return Comm(
        rank=rank,
        tp=tp,
        tp_rank=tp_rank,
        pp=pp,
        pp_stage=pp_stage,
        tp_group=tp_group,
        replica_group=replica_group,
        prev_rank=rank - tp if pp_stage > 0 else None,
        next_rank=rank + tp if pp_stage < pp - 1 else None,
        head_rank=global_rank(dp_index, pp - 1, 0, tp=tp, pp=pp),
    )


def _tp_group_ranks(tp: int, pp: int, dp: int) -> list[list[int]]:
    return [
        [global_rank(d, s, t, tp=tp, pp=pp) for t in range(tp)]
        for d in range(dp)
        for s in range(pp)
    ]


def _replica_group_ranks(tp: int, pp: int, dp: int) -> list[list[int]]:
    return [list(range(d * tp * pp, (d + 1) * tp * pp)) for d in range(dp)]


def _new_groups(all_ranks: list[list[int]], rank: int) -> Any:
    """new_group is collective over the world: every rank creates every group, keeps its own."""
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = group
    return mine
