"""Progress bars for the long steps (tqdm, on stderr). Shown only on a terminal: piped or
captured output stays clean. `enabled=False` is the commands' --quiet. Sizes use the decimal
units of reshard/units.py (MB/s = 10^6 bytes a second)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: float, *, desc: str, unit: str = "B", enabled: bool = True) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1000,
        disable=None if enabled else True, mininterval=0.5, dynamic_ncols=True,
    )  # fmt: skip
