"""The native format: a rank's tensors under their HF names and local shapes, in
`rank-00000.safetensors` (or `rank-00000-part-001.safetensors`, ... past --max-file-size)."""

from __future__ import annotations

from dataclasses import dataclass

from ..tensors import OutFile, OutTensor


@dataclass(frozen=True)
class NativeFormat:
    name: str = "native"

    def vocab_padded(self, vocab_size: int, tp: int) -> int:
        return -(-vocab_size // tp) * tp

    def check(self, hp, recipe) -> None:
        return None

    def check_plan(self, layout, placements) -> None:
        return None

    def rank_files(self, hp, layout, coord, tensors: list[OutTensor], max_size) -> list[OutFile]:
        rank = coord.rank
        groups = group_by_size(tensors, max_size)
        if len(groups) == 1:
            return [OutFile(f"rank-{rank:05d}.safetensors", rank, tuple(groups[0]))]
        return [
            OutFile(f"rank-{rank:05d}-part-{i + 1:03d}.safetensors", rank, tuple(g))
            for i, g in enumerate(groups)
        ]

    def side_files(self, plan) -> dict[str, bytes]:
        return {}

    def manifest_entry(self, layout) -> dict | None:
        return None


def group_by_size(tensors: list[OutTensor], max_size: int | None) -> list[list[OutTensor]]:
    """Tensors in order, a new group whenever the next one would pass max_size bytes."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_size and groups[-1] and size + t.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


NATIVE = NativeFormat()
