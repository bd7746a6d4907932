"""The commit of an output (manifest written, rank markers dropped) runs to its end: a SIGINT
that arrives meanwhile is held, and raised once the commit is done as an interrupt that says
the output is complete. Without this, Ctrl-C just after the manifest is written would leave
stale markers and a message claiming nothing was committed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C arrived during a commit, which finished: the output is complete."""


@contextmanager
def hold_interrupts(out_dir: Path) -> Iterator[None]:
    """Hold SIGINT for the block (main thread only: elsewhere signals never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise InterruptedAfterCommit(
            f"the output in {out_dir} was committed (its manifest is written) before the "
            f"interrupt took effect; check it with reshard verify {out_dir}."
        )
