"""A manifest read back from OUT, as a typed value: what verify, the runtime, export and an
output read as a source look up, once the schema check (manifest_check.py) has passed. The
document itself (`doc`) stays beside it as written, for the seal and for io/ helpers that
walk its rank entries; nothing outside io/ needs to index it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.hparams import HParams


@dataclass(frozen=True)
class ManifestLayout:
    """The manifest's `layout`, as far as readers use it (docs/manifest.md)."""

    tp: int
    pp: int
    ep: int
    dp: int
    world_size: int
    dtype: str  # "keep" or a cast dtype
    experts: dict[str, Any] | None  # the expert maps of an EP output, as on disk

    @property
    def degrees(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp}


@dataclass(frozen=True)
class Manifest:
    doc: dict[str, Any] = field(repr=False, compare=False)  # as on disk, schema-checked
    hparams: HParams
    layout: ManifestLayout
    source: dict[str, Any]  # what the output was made from (model, path, files, made_from)
    files: dict[str, dict[str, Any]]  # rank file -> {size, rank, header_xxh3_128}
    side_files: dict[str, dict[str, Any]] | None  # None: a manifest from before side_files
    ranks: tuple[dict[str, Any], ...]  # one entry per global rank, in rank order
    dropped: frozenset[str]  # source tensors convert did not write (derivable, MTP)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Manifest:
        """A document that passed check_manifest (a test's edited one too)."""
        lay = doc["layout"]
        layout = ManifestLayout(
            *(int(lay[k]) for k in ("tp", "pp", "ep", "dp", "world_size")),
            dtype=lay.get("dtype", "keep"),
            experts=lay.get("experts"),
        )
        return cls(
            doc,
            HParams.from_dict(doc["hparams"]),
            layout,
            doc["source"],
            doc["files"],
            doc.get("side_files"),
            tuple(doc["ranks"]),
            frozenset(doc.get("dropped", ())),
        )

    @property
    def source_path(self) -> Path:
        """The original checkpoint's folder when convert ran."""
        return Path(self.source["path"])

    @property
    def made_from(self) -> dict[str, Any] | None:
        """A re-layout's record of the output it read ({path, manifest hash, layout})."""
        return self.source.get("made_from")

    @property
    def from_pickle(self) -> bool:
        """Converted from pytorch_model*.bin with --allow-pickle (re-read the same way)."""
        return bool(self.source.get("pickle"))

    @property
    def source_files(self) -> list[dict[str, Any]]:
        """The original's files in order, each with its tensors [name, dtype, shape]."""
        return self.source["files"]

    def tensor_entries(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(rank file, tensor name) -> its entry (dtype, shape, pieces, xxh3_128), all ranks."""
        return {
            (meta["file"], name): meta
            for entry in self.ranks
            for name, meta in (entry.get("tensors") or {}).items()
        }
