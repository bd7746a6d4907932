"""Output formats: how one planned rank's tensors are named, grouped and filed.

The plan decides which source bytes go to which rank, as native tensors (HF names, local
shapes). A format turns a rank's native tensors into the tensors and files an engine loads:
`native` keeps them as they are (rank-00000.safetensors); `vllm` writes vLLM's
`sharded_state` files (reshard/layout/formats/vllm.py). A format only renames, stacks and
regroups pieces (and may add constants); it never cuts differently, so every verify tier,
export and re-layout work whatever the format. One module per format; a third engine is one
new module and one line in FORMATS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ...errors import InputError

if TYPE_CHECKING:
    from ...models.hparams import HParams
    from ..plan import Coord, Layout, Plan
    from ..recipe import Recipe
    from ..tensors import OutFile, OutTensor


class OutputFormat(Protocol):
    name: str

    def vocab_padded(self, vocab_size: int, tp: int) -> int:
        """Rows of the embedding and lm_head over all TP ranks (zero rows past vocab_size)."""

    def check(self, hp: HParams, recipe: Recipe) -> None:
        """Refuse, before any write, what the format's loader cannot take."""

    def check_plan(self, layout: Layout, placements) -> None:
        """Refuse stages or an expert placement the format's loader cannot take."""

    def rank_files(
        self, hp: HParams, layout: Layout, coord: Coord, tensors: list[OutTensor], max_size
    ) -> list[OutFile]:
        """The rank's files, from its native tensors in plan order."""

    def side_files(self, plan: Plan) -> dict[str, bytes]:
        """Extra files written beside the shards (a launch script)."""

    def manifest_entry(self, recipe_or_layout) -> dict | None:
        """What the manifest's layout records about the format (None: the native format)."""


def format_named(name: str, *, where: str = "--format") -> OutputFormat:
    from .native import NATIVE
    from .vllm import VLLM

    formats = {f.name: f for f in (NATIVE, VLLM)}
    if name not in formats:
        raise InputError(f"{where} {name!r} is not one of {', '.join(formats)}.")
    return formats[name]


FORMAT_NAMES = ("native", "vllm")
