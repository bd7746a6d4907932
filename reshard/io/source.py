"""Resolve MODEL (a local folder or a hub repo id `org/name[@revision]`) into a validated
`Source`: config, hyper-parameters, and every safetensors header, checked against the index.

No tensor data is read here; the writer reads byte ranges itself. Pickle checkpoints are
refused unless the caller opts in, and then converted to safetensors in a scratch folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CheckpointError, InputError, RefusalError, ReshardIOError
from ..headers import Header, TensorInfo, read_header
from ..models.hparams import HParams, parse_hparams, read_config
from ..strict_json import read_json
from .hf_folder import HfFolder

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied next to the shards so the output folder is self-describing.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "hf_quant_config.json",  # ModelOpt's quantization config (models/hparams.py)
)
# A hub download fetches these first, then only the weight files the index names (or
# model.safetensors): Mistral repos also ship consolidated.safetensors, and `*.safetensors`
# would download the weights twice.
HUB_PATTERNS = [*SIDE_FILES, INDEX]
# org/name[@revision]; names start with a letter, digit or _ so "./x" and "../x" are paths.
REPO_ID = re.compile(r"^\w[\w.\-]*/\w[\w.\-]*(@[\w.\-/]+)?$")


class TensorSource(Protocol):
    """How one kind of source reads its tensors and records itself: an HF checkpoint folder
    (io/hf_folder.py) or a reshard output (io/output_source.py), as vLLM has one loader class
    per load format. `consumers`: source tensor name -> (target, piece) pairs."""

    def byte_jobs(self, source: Source, consumers: dict[str, list]) -> list:
        """The writer's jobs (objects with `run(buffers, stop)` and `nbytes`)."""

    def check_reads(self, source: Source, consumers: dict[str, list]) -> list[tuple]:
        """(file, TensorInfo, consumers, xxh3 to check or None) for the weights tier."""

    def stored_transposed(self, name: str) -> bool:
        """True when some of the tensor's bytes are stored transposed, so the weights tier
        reads it as boxes (read_box) rather than byte runs."""

    def read_box(self, source: Source, name: str, lo: tuple, hi: tuple) -> torch.Tensor:
        """tensor[lo:hi] (per dim), checked against any hash the source records."""

    def source_record(self, source: Source) -> dict[str, Any]:
        """The manifest's `source` entry."""

    def file_digests(self, source: Source) -> list[list]:
        """[name, size, digest] per source file, for --resume's record."""

    def describe(self, files: int) -> str:
        """Where plan's shapes came from."""

    def reads_from(self, folder: Path) -> bool:
        """True when writing into `folder` would delete what this source reads."""


@dataclass(frozen=True)
class Source:
    model: str  # what the user passed
    path: Path  # the folder that holds the files
    repo_id: str | None
    revision: str | None  # the commit sha a hub download resolved to
    config: dict
    hparams: HParams
    headers: tuple[Header, ...]  # in file-name order
    tensors: dict[str, tuple[Header, TensorInfo]]
    pickle: bool  # weights came from pytorch_model*.bin (opt-in, converted)
    # Its kind: HfFolder, or a reshard output's OutputReader (its headers are then virtual,
    # and the reader reassembles each tensor's row blocks from the rank files).
    reader: TensorSource

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def side_files(self) -> list[Path]:
        return [self.path / n for n in SIDE_FILES if (self.path / n).is_file()]


def open_source(model: str, *, allow_pickle: bool = False, scratch: Path | None = None) -> Source:
    """Resolve and validate MODEL. `scratch` is where pickle shards get converted."""
    path, repo_id, revision = resolve_model(model)
    config = read_config(path / "config.json")
    hparams = parse_hparams(config, where=str(path / "config.json"))
    files = list_weight_files(path, allow_pickle=allow_pickle, scratch=scratch)
    headers = tuple(read_header(f) for f in files)
    tensors = _check_index(path, headers)
    pickle = any(h.path.parent != path for h in headers)
    reader = HfFolder()
    return Source(model, path, repo_id, revision, config, hparams, headers, tensors, pickle, reader)


def resolve_model(model: str) -> tuple[Path, str | None, str | None]:
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve(), None, None
    if local.exists():
        raise InputError(f"{model}: is a file; MODEL must be a model folder or a hub repo id.")
    if not REPO_ID.match(model):
        raise InputError(
            f"{model}: no such folder, and not a hub repo id of the form org/name[@revision]."
        )
    return _download(model)


def _download(model: str) -> tuple[Path, str, str]:
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = model.partition("@")
    try:
        meta = Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS
            )
        )
        weights = _hub_weight_files(meta)
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=meta.name, allow_patterns=[*HUB_PATTERNS, *weights]
        )
    except HFValidationError:
        raise InputError(
            f"{model}: no such folder, and not a hub repo id of the form org/name[@revision]."
        ) from None
    except LocalEntryNotFoundError as e:
        raise ReshardIOError(
            f"{model}: not (completely) in the local Hugging Face cache and the hub cannot be "
            f"reached ({e.__class__.__name__}). Download it first, or unset HF_HUB_OFFLINE."
        ) from None
    except HfHubHTTPError as e:
        raise InputError(
            f"{model}: the hub refused the download ({e}). Check the repo id, the revision "
            "and your token (HF_TOKEN)."
        ) from None
    folder = Path(folder)
    # snapshot folders are named by the commit sha: that is the pinned revision we record.
    return folder, repo_id, folder.name


def _hub_weight_files(meta: Path) -> list[str]:
    """The weight files to fetch: those the index names, else model.safetensors."""
    index = meta / INDEX
    return sorted(set(_read_weight_map(index).values())) if index.is_file() else [SINGLE]


def list_weight_files(path: Path, *, allow_pickle: bool, scratch: Path | None) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        return sorted({path / n for n in _read_weight_map(index).values()})
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise RefusalError(
            f"{path}: holds only pickle weights ({pickles[0].name}); loading pickle can run "
            "arbitrary code, so reshard refuses it. Convert the model to safetensors, or pass "
            "--allow-pickle to load it with torch.load(weights_only=True)."
        )
    if pickles:
        return _convert_pickles(pickles, scratch or path / ".reshard-pickle")
    raise CheckpointError(
        f"{path}: no {SINGLE}, {INDEX} or pytorch_model*.bin. Is this a Hugging Face "
        "model folder? Download the weights too."
    )


def _read_weight_map(index: Path) -> dict[str, str]:
    fix = "Re-download the index."
    try:
        doc = read_json(index, what="the index", fix=fix)
    except OSError as e:
        raise ReshardIOError(
            f"{index}: cannot read ({e.strerror}). Check the file's permissions."
        ) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object. {fix}")
    for tensor, name in weight_map.items():
        _check_plain_name(index, tensor, name)
    return weight_map


def _check_plain_name(index: Path, tensor: str, name) -> None:
    # Only plain file names inside the folder: '../x' or '/etc/x' would read outside it.
    # The HF cache's own symlinks into blobs/ are fine: we check the name, not the target.
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(
            f"{index}: tensor '{tensor}' points to {name!r}, which is not a plain file name "
            "inside the model folder. Index entries must name files next to the index; fix "
            "or re-download the index."
        )
    if not (index.parent / name).is_file():
        raise CheckpointError(
            f"{index}: tensor '{tensor}' is in {name}, which is missing from "
            f"{index.parent}. Download the missing shard."
        )


def _check_index(path: Path, headers: tuple[Header, ...]) -> dict:
    tensors: dict[str, tuple[Header, TensorInfo]] = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor '{name}' is in both {tensors[name][0].path.name} and "
                    f"{h.path.name} under {path}. Remove the stale file."
                )
            tensors[name] = (h, info)
    index = path / INDEX
    if not index.is_file():
        return tensors
    weight_map = _read_weight_map(index)
    for name, fname in weight_map.items():
        where = tensors.get(name)
        if where is None or where[0].path.name != fname:
            found = where[0].path.name if where else "no file"
            raise CheckpointError(
                f"{index}: says tensor '{name}' is in {fname}, but it is in {found}. "
                "The index and the files disagree; re-download them."
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise CheckpointError(
            f"{index}: tensor '{extra[0]}' (in {tensors[extra[0]][0].path.name}) is missing "
            f"from the index ({len(extra)} such tensors). Re-download the index."
        )
    return tensors


def _convert_pickles(pickles: list[Path], scratch: Path) -> list[Path]:
    """Opt-in legacy path: each .bin shard is loaded with weights_only=True and re-saved."""
    import torch
    from safetensors.torch import save_file

    scratch.mkdir(parents=True, exist_ok=True)
    out = []
    for p in pickles:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{p}: cannot be loaded with weights_only=True ({e}).") from None
        target = scratch / (p.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
        out.append(target)
    return out


def open_config(model: str) -> tuple[dict, HParams, str]:
    """config.json alone, for commands that read no weights (`plan`, `profile layers`).
    MODEL may be a model folder, a config.json path, or a hub id (only config.json is fetched).
    Returns (config, hparams, where)."""
    local = Path(model).expanduser()
    if local.is_file():
        path = local
    elif local.is_dir():
        path = local / "config.json"
    elif REPO_ID.match(model):
        path = download_config(model)
    else:
        raise InputError(
            f"{model}: no such folder or file, and not a hub repo id of the form "
            "org/name[@revision]."
        )
    config = read_config(path)
    return config, parse_hparams(config, where=str(path)), str(path)


def download_config(model: str) -> Path:
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = model.partition("@")
    try:
        return Path(
            huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision or None)
        )
    except LocalEntryNotFoundError:
        raise ReshardIOError(
            f"{model}: config.json is not in the local Hugging Face cache and the hub cannot "
            "be reached. Download it first, or unset HF_HUB_OFFLINE."
        ) from None
    except HfHubHTTPError as e:
        raise InputError(
            f"{model}: the hub refused config.json ({e}). Check the repo id."
        ) from None
