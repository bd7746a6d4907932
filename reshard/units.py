"""The one convention for sizes in every report: decimal units (1 GB = 10^9 bytes, as GPU
memory and disks are sold), the same in progress bars, summaries and tables. Binary units
(GiB) only where a figure is copied from what CUDA, torch or vLLM report, and as input
spellings (--max-file-size 512MiB)."""

from __future__ import annotations

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
_STEPS = (("TB", TB), ("GB", GB), ("MB", MB), ("kB", KB))
# Size spellings accepted on input (upper-cased), e.g. --max-file-size 20GB or 512MiB.
SIZE_UNITS = {"": 1, "B": 1, "KB": KB, "MB": MB, "GB": GB, "TB": TB}
SIZE_UNITS |= {"KIB": KIB, "MIB": MIB, "GIB": GIB, "TIB": TIB}


def format_bytes(n: float) -> str:
    """12345678 -> '12.35 MB'; below 1 kB, whole bytes ('512 B')."""
    for unit, size in _STEPS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_gb(n: float, *, tiny: bool = False) -> str:
    """Always decimal GB, so a column of sizes compares at a glance: 12345678900 -> '12.35 GB'.
    `tiny`: below 0.01 GB in MB, below 10 kB in bytes (the tiny models of tests and demos)."""
    if not tiny or abs(n) >= 10 * MB:
        return f"{n / GB:.2f} GB"
    return f"{n / MB:.2f} MB" if abs(n) >= 10 * KB else f"{n:.0f} B"


def format_ns(ns: float) -> str:
    """A duration in nanoseconds -> '40 ns', '12.5 us', '2.214 ms', '1.500 s'."""
    if abs(ns) < 1e3:
        return f"{ns:.0f} ns"
    if abs(ns) < 1e6:
        return f"{ns / 1e3:.1f} us"
    if abs(ns) < 1e9:
        return f"{ns / 1e6:.3f} ms"
    return f"{ns / 1e9:.3f} s"
