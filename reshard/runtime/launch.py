"""Run the sharded model on a torch.distributed world of the manifest's size.

Under torchrun (WORLD_SIZE/RANK set) this process joins that world; otherwise `run_world`
spawns one local process per rank (gloo on CPU, nccl on GPUs with rank r on cuda:r % count).
Each DP replica generates a disjoint subset of the prompts; results come back to the caller
ordered like the prompts. Errors raised on a rank are re-raised in the caller as the same
reshard error class. Spawned processes re-import the caller's main script, so scripts must
guard their entry point with `if __name__ == "__main__":` (and cannot be read from stdin).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import errors
from ..errors import InputError
from ..io.manifest import read_manifest
from ..io.manifest_value import Manifest
from ..io.tensor_bytes import all_gather_objects
from ..progress import progress_bar
from .dist import build_comm
from .generate import PromptResult, generate_greedy
from .load import load_rank, load_source_model

_TIMEOUT = timedelta(minutes=5)  # a hung collective fails instead of waiting 30 minutes


def generate_reference(
    source_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[PromptResult]:
    """Greedy results of the unsharded source model at world size 1, in this process."""
    model = load_source_model(source_dir, dtype=dtype, device=device or default_device())
    total = len(prompts) * max_new_tokens
    with progress_bar(total, desc="reference", unit="tok", enabled=progress) as bar:
        return generate_greedy(model, prompts, max_new_tokens, bar=bar)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_world(
    out_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> list[PromptResult]:
    """Join the torchrun world if there is one, else spawn `world_size` local processes.
    dtype: 'float32' upcasts every rank's weights as they load (None: as stored).
    progress: global rank 0 shows its replica's generated tokens."""
    manifest = read_manifest(out_dir)
    kind = "cuda" if (device or default_device()).startswith("cuda") else "cpu"
    job = Job(prompts, max_new_tokens, kind, dtype, progress)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return _run_in_torchrun(Path(out_dir), manifest, job)
    return _spawn_world(Path(out_dir), manifest, job)


generate_sharded = run_world


class Job(NamedTuple):
    """What every rank runs; a NamedTuple so that it pickles into spawned processes."""

    prompts: list[list[int]]
    max_new_tokens: int
    kind: str  # "cpu" (gloo) or "cuda" (nccl, rank r on cuda:r % count)
    dtype: str | None  # cast weights as they load; None: as stored
    progress: bool  # a token bar on global rank 0


def _spawn_world(out_dir: Path, manifest: Manifest, job: Job) -> list[PromptResult]:
    kind = job.kind
    world_size = manifest.layout.world_size
    if kind == "cuda" and world_size > torch.cuda.device_count():
        raise InputError(
            f"{out_dir} needs {world_size} ranks but this machine has "
            f"{torch.cuda.device_count()} GPUs (nccl needs one GPU per rank). Run it under "
            "torchrun across nodes, or on CPU processes with device 'cpu'."
        )
    with tempfile.TemporaryDirectory(prefix="reshard-world-") as tmp:
        args = (world_size, _free_port(), str(out_dir), job, tmp)
        try:
            with _quiet_children():
                mp.start_processes(
                    _spawned_rank, args=args, nprocs=world_size, start_method="spawn"
                )
        except mp.ProcessRaisedException:
            _raise_rank_error(Path(tmp))
            raise
        return _load_results(Path(tmp) / "results.pt")


@contextlib.contextmanager
def _quiet_children():
    """Spawned ranks import torch before reshard (the spawn target lives in torch), so
    reshard's filter for torch's numpy warning must reach them through the environment."""
    old = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [old, NUMPY_WARNING]))
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = old


NUMPY_WARNING = "ignore:Failed to initialize NumPy"


def _spawned_rank(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    job: Job,
    tmp: str,
) -> None:
    """Entry point of a spawned process (module-level so that `spawn` can import it)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        device = _init_world(job.kind, f"tcp://127.0.0.1:{port}", rank, world_size, rank)
        results = _generate_rank(Path(out_dir), rank, job, device)
        if rank == 0:
            torch.save([_to_dict(r) for r in results], Path(tmp) / "results.pt")
        dist.destroy_process_group()
    except errors.ReshardError as e:
        error = {"class": type(e).__name__, "message": f"rank {rank}: {e}"}
        (Path(tmp) / f"error-{rank}.json").write_text(json.dumps(error))
        raise


def _run_in_torchrun(out_dir: Path, manifest: Manifest, job: Job) -> list[PromptResult]:
    kind = job.kind
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != manifest.layout.world_size:
        raise InputError(
            f"torchrun started {world_size} processes but {out_dir} was converted for "
            f"world_size {manifest.layout.world_size}; use --nproc-per-node/--nnodes "
            "that multiply to it."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    owner = not dist.is_initialized()  # the caller may have started the world already
    if owner:
        device = _init_world(kind, "env://", rank, world_size, local_rank)
    else:
        device = _rank_device(kind, local_rank)
    try:
        return _generate_rank(out_dir, rank, job, device)
    finally:
        if owner:
            dist.destroy_process_group()


def _init_world(
    kind: str, init_method: str, rank: int, world_size: int, local_rank: int
) -> torch.device:
    """Start the default group; returns this rank's device."""
    device = _rank_device(kind, local_rank)
    backend = "nccl" if kind == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=_TIMEOUT
    )
    return device


def _rank_device(kind: str, local_rank: int) -> torch.device:
    if kind != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _generate_rank(out_dir: Path, rank: int, job: Job, device) -> list[PromptResult]:
    """Load this rank's stage, generate its replica's prompts, gather every result."""
    prompts, max_new_tokens = job.prompts, job.max_new_tokens
    manifest = read_manifest(out_dir)
    layout = manifest.layout
    comm = build_comm(layout, rank)
    gather_group = dist.new_group(backend="gloo")  # results travel as CPU objects
    stage = load_rank(out_dir, manifest, rank, comm=comm, device=device, dtype=job.dtype)
    dp, dp_index = layout.dp, rank // (layout.tp * layout.pp)
    indices = [i for i in range(len(prompts)) if i % dp == dp_index]
    mine = [prompts[i] for i in indices]
    show = job.progress and rank == 0
    with progress_bar(len(mine) * max_new_tokens, desc="sharded", unit="tok", enabled=show) as bar:
        results = (
            generate_greedy(stage, mine, max_new_tokens, indices=indices, bar=bar) if mine else []
        )
    results = results if comm.tp_rank == 0 else []  # one copy per replica
    gathered = all_gather_objects(results, group=gather_group)
    return sorted((r for part in gathered for r in part), key=lambda r: r.index)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_rank_error(tmp: Path) -> None:
    """Re-raise the first reshard error a rank recorded, as the same class."""
    for path in sorted(tmp.glob("error-*.json")):
        error = json.loads(path.read_text())
        cls = getattr(errors, error["class"], errors.ReshardError)
        raise cls(error["message"]) from None


def _to_dict(r: PromptResult) -> dict[str, Any]:
    return {"index": r.index, "prompt": r.prompt, "tokens": r.tokens, "logits": r.logits}


def _load_results(path: Path) -> list[PromptResult]:
    return [PromptResult(**d) for d in torch.load(path, weights_only=True)]
