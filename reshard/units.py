"""The one convention for sizes in every report: decimal units (1 GB = 10^9 bytes, as GPU
memory and disks are sold), the same in progress bars, summaries and tables."""

from __future__ import annotations

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
_STEPS = (("TB", TB), ("GB", GB), ("MB", MB), ("kB", KB))


def format_bytes(n: float) -> str:
    """12345678 -> '12.35 MB'; below 1 kB, whole bytes ('512 B')."""
    for unit, size in _STEPS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_ns(ns: float) -> str:
    """A duration in nanoseconds -> '40 ns', '12.5 us', '2.214 ms', '1.500 s'."""
    if abs(ns) < 1e3:
        return f"{ns:.0f} ns"
    if abs(ns) < 1e6:
        return f"{ns / 1e3:.1f} us"
    if abs(ns) < 1e9:
        return f"{ns / 1e6:.3f} ms"
    return f"{ns / 1e9:.3f} s"
