"""Progress bars for the long steps (tqdm, on stderr). Shown only on a terminal: piped or
captured output stays clean. `enabled=False` is the commands' --quiet. Sizes use the decimal
units of reshard/units.py (MB/s = 10^6 bytes a second). tqdm is imported only for a bar that
shows: its import costs more than hashing a few hundred MB (verify --level hashes)."""

from __future__ import annotations

import sys


class SilentBar:
    """What a bar that does not show does: nothing, with tqdm's few methods used here."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> SilentBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: float, *, desc: str, unit: str = "B", enabled: bool = True):
    if not enabled or not sys.stderr.isatty():
        return SilentBar()
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1000,
        mininterval=0.5, dynamic_ncols=True,
    )  # fmt: skip
