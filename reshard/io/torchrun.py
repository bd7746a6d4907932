"""A torchrun world (`torchrun --nproc-per-node N -m reshard convert ...`): WORLD_SIZE and RANK
from the environment; the processes share the output ranks, whole files each, round robin
over the sorted file ranks; a gloo (CPU) barrier before global rank 0 writes the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    def barrier(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.size)
        dist.barrier()


def torchrun_world() -> World | None:
    """The world from torchrun's environment; None outside one (or a world of 1)."""
    size, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if size is None or rank is None:
        return None
    try:
        if len(size) > 9 or len(rank) > 9:  # int() of 5000 digits raises; no world is that big
            raise ValueError
        world = World(int(rank), int(size))
    except ValueError:
        raise InputError(
            f"WORLD_SIZE={size!r} RANK={rank!r}: not integers. Run under torchrun, or unset them."
        ) from None
    if not 0 <= world.rank < world.size:
        raise InputError(f"RANK={rank}: outside [0, WORLD_SIZE={size}). Run under torchrun.")
    if world.size == 1:
        return None
    # The barrier before the manifest needs a rendezvous: refuse now, before any rank is
    # written, not after (the files of this process would wait for a world that never meets).
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise InputError(
            f"WORLD_SIZE={size} RANK={rank} without {' and '.join(missing)}: the processes "
            "cannot meet. Run under torchrun (it sets all four), or unset WORLD_SIZE and RANK."
        )
    return world
