"""Byte views of CPU tensors without numpy (numpy is not a dependency of reshard, and torch's
own `.numpy()` and object collectives fail without it)."""

from __future__ import annotations

import ctypes
import pickle
from typing import Any

import torch
import torch.distributed as dist


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory: a ctypes array over its data
    that also holds the tensor alive, so the view stays valid while it is referenced."""
    assert t.is_contiguous() and t.device.type == "cpu"  # internal invariant
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array.owner = t
    return memoryview(array).cast("B")


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    """dist.all_gather_object without numpy: pickle, gather the lengths, gather the padded
    byte tensors (CPU tensors: use a gloo group), unpickle."""
    data = pickle.dumps(obj)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [
        pickle.loads(bytes(tensor_bytes(p)[: int(s.item())]))  # noqa: S301 - our own ranks
        for p, s in zip(parts, sizes, strict=True)
    ]
