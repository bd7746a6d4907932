"""One output tensor being filled, shared by every job that writes into it: the writer's
copies (io/writer.py), the pulls from a reshard output (io/pull.py) and the transposed bands
(io/transposed.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..layout.tensors import OutTensor
from .writeback import Writeback


@dataclass
class Target:
    """One output tensor being filled: where it lives and how much of it is hashed."""

    file: Path
    fd: int
    tensor: OutTensor
    offset: int  # absolute byte offset of the tensor's data in its file
    writeback: Writeback  # starts the file's writeback as it fills (shared by the files)
    hasher: xxhash.xxh3_128 = field(default_factory=xxhash.xxh3_128)
    hashed: int = 0  # bytes [0, hashed) are in the hash
    written: int = 0  # bytes written, checked against the plan at the end
    # A format's stacked tensor (vLLM's qkv_proj) takes bytes from several source tensors,
    # so several jobs may account for it at once.
    lock: threading.Lock = field(default_factory=threading.Lock)


def account(target: Target, rel: int, data) -> None:
    """`data` was written at `rel`: counted, hashed when in order, its writeback started."""
    with target.lock:
        target.written += len(data)
        if rel == target.hashed:  # in order: hash while streaming; else read back at the end
            target.hasher.update(data)
            target.hashed += len(data)
    target.writeback.wrote(target.fd, len(data))
